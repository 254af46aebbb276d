"""Slide scoring in row bands equals whole-image postprocessing of the same pixels, cell for cell."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepliif.imageio import read_image
from deepliif.postprocessing import PostprocessOptions, postprocess
from deepliif.slide_scoring import UnionFind, array_bands, percentile_from_histogram, score_slide

from .test_postprocessing import ARGUMENT_SETS, _load, _tiles


def on_glass(deepliif_fixtures: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real DeepLIIF outputs of every fixture tile placed at unaligned offsets on a larger canvas; the
    rest is no cell (black Seg), as glass around tissue is."""
    tiles = [_load(tile) for tile in _tiles(deepliif_fixtures)]
    height, width = 1210, 1105
    orig = np.full((height, width, 3), 240, np.uint8)
    seg, marker = np.zeros_like(orig), np.zeros_like(orig)
    for (ihc, tile_seg, tile_marker), (y, x) in zip(tiles, [(37, 61), (611, 533)]):
        h, w = tile_seg.shape[:2]
        orig[y: y + h, x: x + w], seg[y: y + h, x: x + w], marker[y: y + h, x: x + w] = ihc, tile_seg, tile_marker
    return orig, seg, marker


@pytest.mark.parametrize("variant", sorted(ARGUMENT_SETS))
@pytest.mark.parametrize("rows", [97, 512])
def test_band_scoring_equals_whole_image_postprocessing(deepliif_fixtures: Path, variant: str, rows: int) -> None:
    orig, seg, marker = on_glass(deepliif_fixtures)
    options = PostprocessOptions(**ARGUMENT_SETS[variant])
    whole = postprocess(orig, seg, marker, 512, options)
    scoring, cells = score_slide(array_bands(seg, marker, rows), seg.shape[1], seg.shape[0], 512, True, options)
    assert scoring == whole.scoring and whole.scoring["num_total"] > 100
    assert cells == whole.cells  # every counted cell: centroid, box, area, class, marker


def test_fixture_counts_survive_band_edges_through_every_cell(deepliif_fixtures: Path) -> None:
    """Bands of 5 rows cut through nearly every cell: the merged counts still equal DeepLIIF's own."""
    tile = _tiles(deepliif_fixtures)[0]
    _, seg, marker = _load(tile)
    expected = json.loads((tile / "scoring_marker_thresh_default.json").read_text())["scoring"]
    scoring, _ = score_slide(array_bands(seg, marker, 5), seg.shape[1], seg.shape[0], 512, True,
                             PostprocessOptions(marker_thresh="default"))
    assert scoring == expected


def test_background_joins_across_bands_only_through_touching_pixels() -> None:
    """A ring of cell pixels encloses no-cell pixels that are not background (they do not reach the border)."""
    seg = np.zeros((40, 40, 3), np.uint8)
    seg[5:35, 5:35, 0] = 255   # a square of positive cell pixels ...
    seg[10:30, 10:30] = 0      # ... with a hole: no-cell pixels enclosed by it
    seg[18:22, 18:22, 2] = 255  # and a negative cell inside the hole
    whole = postprocess(np.full_like(seg, 255), seg, None, 512, PostprocessOptions(size_thresh=0))
    for rows in (1, 3, 7, 40):
        scoring, cells = score_slide(array_bands(seg, None, rows), 40, 40, 512, False, PostprocessOptions(size_thresh=0))
        assert scoring == whole.scoring and cells == whole.cells, rows
    assert whole.scoring["num_total"] == 1  # the hole is not background: ring, hole and inner cell are one


def test_percentiles_from_a_histogram_equal_numpys() -> None:
    values = np.random.default_rng(4).integers(1, 256, 5001)
    counts = np.bincount(values, minlength=256)
    for q in (0.1, 50, 99.9):
        assert percentile_from_histogram(counts, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-9)


def test_union_find_grows_and_joins() -> None:
    sets = UnionFind()
    first = sets.grow(3000)
    sets.union_pairs(np.array([first + 5, first + 2999]), np.array([first + 2999, first + 7]))
    roots = sets.roots()
    assert roots[first + 7] == roots[first + 5] == first + 5 and roots[first + 6] == first + 6


def test_reading_the_real_seg_as_a_slide_matches(deepliif_fixtures: Path) -> None:
    tile = _tiles(deepliif_fixtures)[1]
    seg, marker = read_image(tile / "Seg.png"), read_image(tile / "Marker.png")
    whole = postprocess(read_image(tile / "IHC.png"), seg, marker, 512)
    assert score_slide(array_bands(seg, marker, 64), 512, 512, 512, True)[0] == whole.scoring


def test_scoring_read_back_from_written_pyramids_equals_the_whole_image(deepliif_fixtures: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from deepliif import slide_scoring
    from deepliif.slide_scoring import pyramid_bands

    from .test_slides import write_ome_pyramid
    orig, seg, marker = on_glass(deepliif_fixtures)
    write_ome_pyramid(tmp_path / "s_Seg.ome.tif", seg)
    write_ome_pyramid(tmp_path / "s_Marker.ome.tif", marker)
    monkeypatch.setattr(slide_scoring, "BAND_PIXELS", 150 * seg.shape[1])  # bands of 150 rows
    bands = pyramid_bands(tmp_path / "s_Seg.ome.tif", tmp_path / "s_Marker.ome.tif", seg.shape[1])
    assert [len(band[1]) for band in bands()][:2] == [150, 150]
    options = PostprocessOptions(marker_thresh="default")
    whole = postprocess(orig, seg, marker, 512, options)
    assert score_slide(bands, seg.shape[1], seg.shape[0], 512, True, options) == (whole.scoring, whole.cells)
