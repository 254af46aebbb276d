"""Pyramidal OME-TIFF outputs: every level visible to OpenSlide, tiffslide and tifffile, level 0 stored once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from deepliif.errors import ImageError
from deepliif.pyramid import (LevelRows, PyramidWriter, StreamedLevel, assemble_pyramid, average_2x2, level_sizes,
                              region_levels)

TILE = 128


def random_image(height: int = 700, width: int = 1100) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)


def expected_levels(image: np.ndarray) -> list[np.ndarray]:
    """Each level the 2x2 mean of the one above, its odd last row and column dropped (floor division)."""
    levels = [image]
    while max(levels[-1].shape[:2]) > TILE:
        above = levels[-1]
        height, width = above.shape[0] // 2 * 2, above.shape[1] // 2 * 2
        wide = above[:height, :width].astype(np.uint16)
        levels.append(((wide[0::2, 0::2] + wide[1::2, 0::2] + wide[0::2, 1::2] + wide[1::2, 1::2] + 2) // 4)
                      .astype(np.uint8))
    return levels


def streamed_regions(image: np.ndarray, folder: Path, bounds: list[tuple[int, int]], band: int) -> list[Path]:
    paths = []
    for index, (top, bottom) in enumerate(bounds):
        region = StreamedLevel(folder / f".l0.{index}.tif", image.shape[1], bottom - top, tile=TILE)
        for y in range(top, bottom, band):
            region.add(image[y: min(y + band, bottom)])
        region.close()
        paths.append(region.path)
    return paths


def region_pyramids(image: np.ndarray, folder: Path, bounds: list[tuple[int, int]], band: int) -> list[list[Path]]:
    """Every level of `image` written region by region as a slide run's checkpoint writes them: each
    level's files, top to bottom."""
    sizes = level_sizes(*image.shape[:2], TILE)
    levels: list[list[Path]] = [[] for _ in sizes]
    for index, (top, bottom) in enumerate(bounds):
        writer = PyramidWriter(folder / f".r{index}", region_levels(top, bottom, sizes), tile=TILE)
        for y in range(top, bottom, band):
            writer.add(image[y: min(y + band, bottom)])
        for level, path in enumerate(writer.close()):
            levels[level].append(path)
    return levels


def assert_every_reader_sees_every_level(path: Path, levels: list[np.ndarray], mpp: float) -> None:
    dimensions = tuple((level.shape[1], level.shape[0]) for level in levels)
    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        assert tiff.is_ome and len(tiff.series) == 1 and f'PhysicalSizeX="{mpp}"' in tiff.ome_metadata
        for stored, level in zip(series.levels, levels, strict=True):
            np.testing.assert_array_equal(stored.asarray(), level)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == dimensions
        last = len(levels) - 1
        region = np.asarray(slide.read_region((0, 0), last, dimensions[last]).convert("RGB"))
        np.testing.assert_array_equal(region, levels[last])
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == dimensions
        assert float(slide.properties[tiffslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)


def test_levels_halve_by_floor_division_down_to_one_tile() -> None:
    assert level_sizes(700, 1100, TILE) == [(700, 1100), (350, 550), (175, 275), (87, 137), (43, 68)]
    assert level_sizes(100, 90, TILE) == [(100, 90)]
    rows = np.array([[[0], [1]], [[1], [1]]], np.uint8)  # mean 0.75 rounds to 1
    assert average_2x2(rows).tolist() == [[[1]]]


def test_the_2x2_average_is_the_rounded_mean_of_every_block() -> None:
    rows = np.random.default_rng(4).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    wide = rows.astype(np.int32)
    blocks = wide[0::2, 0::2] + wide[1::2, 0::2] + wide[0::2, 1::2] + wide[1::2, 1::2]
    assert np.array_equal(average_2x2(rows), (blocks + 2) // 4)
    assert average_2x2(rows[:0]).shape == (0, 5, 3)


def test_a_pyramid_from_unaligned_regions_is_whole_and_every_reader_sees_its_levels(tmp_path: Path) -> None:
    """Regions whose levels do not end on a TIFF tile row are re-tiled there; the file is still exact."""
    image = random_image()
    levels = region_pyramids(image, tmp_path, [(0, 336), (336, 700)], band=150)
    assert [len(paths) for paths in levels] == [2, 2, 2, 2, 2]
    assert assemble_pyramid(levels, tmp_path / "out.ome.tif", 0.5, tile=TILE) == 5
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".r")] == ["out.ome.tif"]  # no partial
    assert_every_reader_sees_every_level(tmp_path / "out.ome.tif", expected_levels(image), 0.5)


def test_regions_make_the_reduced_levels_of_the_whole_image(tmp_path: Path) -> None:
    """Region by region, every level is the whole image's: rows halve by floor division in each region as
    in the image, and a last region too small for the smallest levels makes no rows there."""
    image = random_image(653, 1100)
    levels = region_pyramids(image, tmp_path, [(0, 256), (256, 640), (640, 653)], band=77)
    assert [len(paths) for paths in levels] == [3, 3, 3, 3, 2]
    for paths, expected in zip(levels, expected_levels(image)):
        with LevelRows(paths) as rows:
            np.testing.assert_array_equal(rows.rows(0, rows.height), expected)
    with pytest.raises(ImageError, match="does not halve evenly"):
        region_levels(100, 200, level_sizes(653, 1100, TILE))


def test_aligned_regions_are_copied_as_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Levels in regions of whole tile rows go into the pyramid without being decoded or compressed again;
    only the levels whose regions are not whole tile rows are re-tiled."""
    from deepliif import pyramid
    image = random_image()
    levels = region_pyramids(image, tmp_path, [(0, 512), (512, 700)], band=100)
    stored_bytes = sum(len(path.read_bytes()) for path in levels[0])
    recompressed = []
    retile = pyramid._level_tiles
    monkeypatch.setattr(pyramid, "_level_tiles", lambda paths, tile: recompressed.append(paths) or retile(paths, tile))
    assemble_pyramid(levels, tmp_path / "out.ome.tif", 0.25, tile=TILE)
    assert recompressed == levels[3:]  # 512 rows halve to whole 128-row tiles down to level 2
    assert_every_reader_sees_every_level(tmp_path / "out.ome.tif", expected_levels(image), 0.25)
    with tifffile.TiffFile(tmp_path / "out.ome.tif") as tiff:
        assert sum(tiff.pages[0].databytecounts) <= stored_bytes


def test_a_streamed_pyramid_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    image = random_image(400, 520)
    writer = PyramidWriter(tmp_path / ".x", level_sizes(400, 520, TILE), tile=TILE)
    for y in range(0, 400, 90):
        writer.add(image[y: y + 90])
    assert writer.publish(tmp_path / "x.ome.tif", 0.5) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.tif"]  # every temporary removed
    assert_every_reader_sees_every_level(tmp_path / "x.ome.tif", expected_levels(image), 0.5)

    broken = PyramidWriter(tmp_path / ".y", level_sizes(400, 520, TILE), tile=TILE)
    broken.add(image[:90])
    broken.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.tif"]


@pytest.mark.parametrize("band", [1, 37, 244, 256, 300])
def test_level_rows_read_in_any_band_height_are_the_image(tmp_path: Path, band: int) -> None:
    """Bands that straddle tile rows and regions read back exactly; rows of one region cannot be written
    to (they are views of the tile rows kept for the next band)."""
    image = random_image()
    regions = streamed_regions(image, tmp_path, [(0, 512), (512, 700)], band=150)
    with LevelRows(regions) as rows:
        for y in range(0, rows.height, band):
            part = rows.rows(y, min(band, rows.height - y))
            np.testing.assert_array_equal(part, image[y: y + band])
        np.testing.assert_array_equal(rows.rows(3, 600), image[3:603])  # backwards, across both regions
        assert not rows.rows(5, 10).flags.writeable
