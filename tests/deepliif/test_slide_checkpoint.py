from __future__ import annotations

import pytest

from deepliif.pyramid import TIFF_TILE, level_sizes, region_levels
from deepliif.slide_checkpoint import region_ends


@pytest.mark.parametrize("height, width", [(16_384, 16_384), (300_000, 2_000), (5_000, 150_000), (700, 900)])
def test_regions_are_whole_tile_rows_that_halve_through_every_level(height: int, width: int) -> None:
    """Every region but the last starts on a row each reduced level halves exactly, so its levels are the
    slide's rows there; together the regions cover every row of every level once."""
    ends = region_ends(height, width)
    sizes = level_sizes(height, width)
    assert ends[-1] == height and ends == sorted(set(ends))
    tops = [0, *ends[:-1]]
    assert all(top % TIFF_TILE == 0 and top % (1 << (len(sizes) - 1)) == 0 for top in tops)
    regions = [region_levels(top, bottom, sizes) for top, bottom in zip(tops, ends)]
    for level, (rows, columns) in enumerate(sizes):
        assert sum(region[level][0] for region in regions if level < len(region)) == rows
        assert all(region[level][1] == columns for region in regions if level < len(region))
