from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from deepliif.label_stats import LabelledPixels, components, four_connected, grey_levels


def _labels(seed: int, shape=(120, 150)) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    return ndimage.label(rng.random(shape) < 0.45, structure=np.ones((3, 3)))


@pytest.mark.parametrize("seed, threads", [(0, 1), (1, 1), (2, 1), (0, 3), (1, 2), (2, 7)])
def test_reductions_equal_the_ndimage_and_unique_forms(seed: int, threads: int) -> None:
    """On one band or several (labels crossing band edges), the same figures."""
    labels, count = _labels(seed)
    values = np.random.default_rng(seed + 10).integers(0, 256, labels.shape).astype(np.uint8)
    mask = np.random.default_rng(seed + 20).random(labels.shape) < 0.5
    pixels = LabelledPixels.of(labels, count, threads)
    assert len(pixels.bands) == threads
    index = np.arange(1, count + 1)
    assert np.array_equal(pixels.sizes(), np.bincount(labels.ravel(), minlength=count + 1))
    assert np.array_equal(pixels.count_true(mask)[1:], ndimage.sum(mask, labels, index).astype(int))
    assert np.array_equal(pixels.maximum(values)[1:], ndimage.maximum(values, labels, index).astype(int))
    present, first = np.unique(labels.ravel(), return_index=True)
    assert np.array_equal(pixels.first_pixels()[present[1:]], first[1:])
    assert np.array_equal(pixels.image_sums(values)[1:], ndimage.sum(values.astype(np.int64), labels, index))
    rows, cols = np.indices(labels.shape)
    ys, xs = np.nonzero(labels == 1)
    assert pixels.image_sums(cols)[1] == xs.sum() and pixels.image_sums(rows)[1] == ys.sum()


def test_first_pixels_of_labels_not_numbered_in_raster_order() -> None:
    """Labels from elsewhere (relabelled, merged) take the general path and give the same answer."""
    labels, count = _labels(3)
    shuffled = np.concatenate([[0], np.random.default_rng(4).permutation(count) + 1])[labels]
    present, first = np.unique(shuffled.ravel(), return_index=True)
    for threads in (1, 4):
        assert np.array_equal(LabelledPixels.of(shuffled, count, threads).first_pixels()[present[1:]], first[1:])


def test_grey_levels_are_the_channel_maximum() -> None:
    image = np.random.default_rng(5).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    assert np.array_equal(grey_levels(image), image.max(axis=2))
    assert np.array_equal(grey_levels(image[:, :, 1]), image[:, :, 1])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_components_number_and_measure_as_ndimage_does(threads: int) -> None:
    """OpenCV's labelling gives ndimage's labels (raster order of first pixels), boxes, sizes and exact
    coordinate sums, on one thread or several (its parallel form labels row stripes and merges them)."""
    rng = np.random.default_rng(threads)
    shapes = [(1, 1), (1, 40), (40, 1), (300, 7)] + [tuple(rng.integers(2, 90, 2)) for _ in range(60)]
    for shape in shapes:
        mask = rng.random(shape) < rng.uniform(0.05, 0.95)
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        found = components(mask, threads)
        assert found.count == count and np.array_equal(found.labels, labels), shape
        assert np.array_equal(found.sizes, np.bincount(labels.ravel(), minlength=count + 1))
        boxes = ndimage.find_objects(labels)
        assert [(b[1].start, b[0].start, b[1].stop, b[0].stop) for b in boxes] == \
            list(zip(found.x0[1:].tolist(), found.y0[1:].tolist(), found.x1[1:].tolist(), found.y1[1:].tolist()))
        ys, xs = np.nonzero(labels)
        for sums, coordinate in ((found.sum_x, xs), (found.sum_y, ys)):
            assert np.array_equal(sums[1:], np.bincount(labels[ys, xs], weights=coordinate, minlength=count + 1)[1:])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_four_connected_numbers_as_ndimage_does(threads: int) -> None:
    """OpenCV's 4-connected scan gives exactly ndimage's labels, so slide bands and whole images agree."""
    from deepliif.workers import opencv
    opencv(threads)
    rng = np.random.default_rng(10 + threads)
    for shape in [(1, 1), (1, 40), (40, 1)] + [tuple(rng.integers(2, 90, 2)) for _ in range(60)]:
        mask = rng.random(shape) < rng.uniform(0.05, 0.95)
        labels, count = ndimage.label(mask)  # ndimage's default structure: 4-connected
        found, found_count = four_connected(mask)
        assert found_count == count and np.array_equal(found, labels), shape
    assert four_connected(np.zeros((0, 3), bool))[1] == 0


def test_components_of_full_and_empty_masks() -> None:
    full = components(np.ones((4, 5), bool))
    assert full.count == 1 and full.sizes.tolist() == [0, 20] and (full.sum_x[1], full.sum_y[1]) == (40, 30)
    assert components(np.zeros((0, 5), bool)).count == 0
    assert components(np.zeros((3, 5), bool)).count == 0
