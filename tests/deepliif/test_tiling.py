from __future__ import annotations

import numpy as np
import pytest

from deepliif.errors import ArgumentError
from deepliif.tiling import Stitcher, TileGrid, check_tile_size, extend_by_mirroring, is_empty_tile, resize_tile


def _starts(grid: TileGrid) -> tuple[list[int], list[int]]:
    return sorted({t.x for t in grid}), sorted({t.y for t in grid})


def test_positions_stride_and_edge_shift() -> None:
    grid = TileGrid(1000, 900, 512)  # overlap 32, stride 448
    assert _starts(grid) == ([0, 448, 488], [0, 388])
    assert [(t.x, t.y) for t in grid][:4] == [(0, 0), (448, 0), (488, 0), (0, 388)]  # row by row


def test_axis_equal_to_tile_has_no_overlap() -> None:
    grid = TileGrid(512, 1200, 512)
    assert len(grid) == 3 and all(t.keep[0] == 0 and t.keep[2] == 512 for t in grid)


def test_kept_regions_cover_every_pixel_and_later_tiles_win() -> None:
    grid = TileGrid(1000, 900, 512)
    owner = np.full((900, 1000), -1)
    for tile in grid:
        x0, y0, x1, y1 = tile.keep
        owner[tile.y + y0: tile.y + y1, tile.x + x0: tile.x + x1] = tile.index
    assert (owner >= 0).all()
    assert owner[0, 470] == 0 and owner[0, 500] == 1 and owner[0, 530] == 2  # centre, then edge tile's margin


def test_mirroring_small_images() -> None:
    image = np.arange(3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 3)
    extended = extend_by_mirroring(image, 8)
    assert extended.shape == (8, 8, 3)
    assert np.array_equal(extended[:2, 3:6], image[:, ::-1])
    assert np.array_equal(extended[2:4, :3], image[::-1])
    assert np.array_equal(extend_by_mirroring(np.zeros((600, 700, 3), np.uint8), 512).shape, (600, 700, 3))


def test_stitcher_crops_back_to_original_size() -> None:
    grid = TileGrid(512, 512, 512)
    stitcher = Stitcher(grid, ("Seg",), (300, 200))
    stitcher.paste(grid.tiles[0], {"Seg": np.full((512, 512, 3), 7, np.uint8)})
    assert stitcher.results()["Seg"].shape == (200, 300, 3)


def test_empty_tile_rule() -> None:
    flat = np.full((64, 64, 3), 230, np.uint8)
    assert is_empty_tile(flat)
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[::2] = 255
    assert is_empty_tile(stripes)  # only pure black and white: nothing left to measure
    tissue = flat.copy()
    tissue[::4, ::4] = (90, 60, 140)
    assert not is_empty_tile(tissue)


@pytest.mark.parametrize("value", [63, 4097, 512.0, "512", True, None])
def test_tile_size_is_checked(value: object) -> None:
    with pytest.raises(ArgumentError, match="tile_size"):
        check_tile_size(value)


def test_resize_is_pil_bicubic_and_identity_at_same_size() -> None:
    tile = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    assert resize_tile(tile, 300) is tile
    assert resize_tile(tile, 512).shape == (512, 512, 3)


def test_emptiness_from_the_histogram_is_deepliifs_variance_rule() -> None:
    """Tiles whose variance lies on both sides of 9 and right next to it, and a band's grey sliced per tile:
    the same verdicts as `np.var` of the pixels that are neither black nor white."""
    from deepliif.tiling import EMPTY_VARIANCE, grey_of, is_empty_grey
    rng = np.random.default_rng(3)
    verdicts = []
    for spread in (0.0, 2.0, 2.9, 3.0, 3.1, 4.0, 60.0):
        tile = np.clip(rng.normal(128, spread, (64, 64, 3)), 0, 255).astype(np.uint8)
        tile[:5] = 0
        tile[5:9] = 255
        grey = grey_of(tile)
        kept = grey[(grey != 0) & (grey != 255)]
        expected = kept.size == 0 or float(np.var(kept)) < EMPTY_VARIANCE
        assert is_empty_grey(grey) == expected == is_empty_tile(tile), spread
        verdicts.append(expected)
    assert True in verdicts and False in verdicts
    band = rng.integers(0, 256, (32, 200, 3), np.uint8)
    np.testing.assert_array_equal(grey_of(band)[:, 50:90], grey_of(band[:, 50:90]))


@pytest.mark.parametrize("size", [(512, 512), (1000, 900), (1300, 2100), (512, 1500)])
def test_rows_said_final_after_a_tile_row_never_change_again(size: tuple[int, int]) -> None:
    width, height = size
    grid = TileGrid(width, height, 512)
    stitcher = Stitcher(grid, ("Seg",), (width, height))
    snapshots = []
    for tile in grid:
        stitcher.paste(tile, {"Seg": np.full((512, 512, 3), tile.index + 1, np.uint8)})
        final = grid.rows_final_after(tile)
        assert (final is None) == bool((tile.index + 1) % grid.columns)
        if final is not None:
            snapshots.append(stitcher.cropped()["Seg"][:final].copy())
    assert len(snapshots) == len(grid) // grid.columns and len(snapshots[-1]) == height
    result = stitcher.results()["Seg"]
    for earlier, later in zip(snapshots, snapshots[1:]):
        assert len(earlier) < len(later)
        assert np.array_equal(earlier, result[:len(earlier)])
        assert not (later[len(earlier):] == 0).all()  # each tile row makes rows final
