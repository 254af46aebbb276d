from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.tiles import CalibrationSet, choose_tiles, non_empty_tiles
from deepliif.errors import ArgumentError, ImageError
from deepliif.imageio import write_png
from engine.samples import synthetic_ihc


@pytest.fixture(scope="module")
def half_blank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1024x1024: tissue on the left half, white on the right; tiles at x 0, 448, 512 in each of 3 rows."""
    image = synthetic_ihc(1024, 1024, seed=4)
    image[:, 512:] = 255
    path = tmp_path_factory.mktemp("half") / "half.png"
    write_png(path, image)
    return path


def test_empty_tiles_are_left_out_as_inference_leaves_them_out(half_blank: Path) -> None:
    tiles = non_empty_tiles(half_blank, 512)
    assert sorted({t.x for t in tiles}) == [0, 448]  # the all-white column at x=512 is dropped
    assert len(tiles) == 6 and all(t.tile_size == 512 for t in tiles)


def test_the_sample_is_reproducible_and_depends_on_the_seed(half_blank: Path, ihc_images: list[Path]) -> None:
    images = [half_blank, *ihc_images]
    first, again = choose_tiles(images, 5, seed=3), choose_tiles(images, 5, seed=3)
    assert first == again and first.candidates == 9 and len(first.tiles) == 5
    assert choose_tiles(images, 5, seed=4).tiles != first.tiles
    assert np.array_equal(first.arrays(), again.arrays())


def test_fewer_candidates_than_asked_takes_them_all(ihc_images: list[Path]) -> None:
    chosen = choose_tiles(ihc_images, 50)
    assert len(chosen.tiles) == 3 and chosen.candidates == 3


def test_the_list_round_trips_through_its_file_and_reads_the_same_pixels(half_blank: Path, tmp_path: Path) -> None:
    chosen = choose_tiles([half_blank], 4, seed=1)
    chosen.write(tmp_path / "calibration.json")
    read = CalibrationSet.read(tmp_path / "calibration.json")
    assert read == chosen
    arrays = read.arrays()
    assert arrays.shape == (4, 512, 512, 3) and arrays.dtype == np.uint8
    first = read.tiles[0]
    from deepliif.imageio import read_image
    assert np.array_equal(arrays[0], read_image(half_blank)[first.y: first.y + 512, first.x: first.x + 512])


def test_a_source_changed_since_calibration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    write_png(path, synthetic_ihc(seed=1))
    chosen = choose_tiles([path], 1)
    write_png(path, synthetic_ihc(seed=2))
    with pytest.raises(ImageError, match="changed since"):
        chosen.arrays()


def test_images_without_tissue_are_refused_by_name(blank_image: Path) -> None:
    with pytest.raises(ArgumentError, match=r"no non-empty tiles.*white\.png"):
        choose_tiles([blank_image], 4)


def test_bad_arguments_and_unreadable_images(tmp_path: Path, ihc_images: list[Path]) -> None:
    with pytest.raises(ArgumentError, match="positive integer; got 0"):
        choose_tiles(ihc_images, 0)
    with pytest.raises(ArgumentError, match="no calibration images"):
        choose_tiles([], 4)
    with pytest.raises(ArgumentError, match="tile_size"):
        choose_tiles(ihc_images, 4, tile_size=8)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="junk.png"):
        choose_tiles([junk], 4)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ArgumentError, match="not a readable calibration list"):
        CalibrationSet.read(bad)
