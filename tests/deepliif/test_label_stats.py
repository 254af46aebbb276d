from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from deepliif.label_stats import LabelledPixels, grey_levels


def _labels(seed: int, shape=(120, 150)) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    return ndimage.label(rng.random(shape) < 0.45, structure=np.ones((3, 3)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reductions_equal_the_ndimage_and_unique_forms(seed: int) -> None:
    labels, count = _labels(seed)
    values = np.random.default_rng(seed + 10).integers(0, 256, labels.shape).astype(np.uint8)
    mask = np.random.default_rng(seed + 20).random(labels.shape) < 0.5
    pixels = LabelledPixels.of(labels, count)
    index = np.arange(1, count + 1)
    assert np.array_equal(pixels.sizes(), np.bincount(labels.ravel(), minlength=count + 1))
    assert np.array_equal(pixels.count_true(mask)[1:], ndimage.sum(mask, labels, index).astype(int))
    assert np.array_equal(pixels.maximum(values)[1:], ndimage.maximum(values, labels, index).astype(int))
    present, first = np.unique(labels.ravel(), return_index=True)
    assert np.array_equal(pixels.first_pixels()[present[1:]], first[1:])
    rows, cols = pixels.coordinates()
    ys, xs = np.nonzero(labels == 1)
    assert pixels.sums(cols)[1] == xs.sum() and pixels.sums(rows)[1] == ys.sum()


def test_first_pixels_of_labels_not_numbered_in_raster_order() -> None:
    """Labels from elsewhere (relabelled, merged) take the general path and give the same answer."""
    labels, count = _labels(3)
    shuffled = np.concatenate([[0], np.random.default_rng(4).permutation(count) + 1])[labels]
    present, first = np.unique(shuffled.ravel(), return_index=True)
    assert np.array_equal(LabelledPixels.of(shuffled, count).first_pixels()[present[1:]], first[1:])


def test_grey_levels_are_the_channel_maximum() -> None:
    image = np.random.default_rng(5).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    assert np.array_equal(grey_levels(image), image.max(axis=2))
    assert np.array_equal(grey_levels(image[:, :, 1]), image[:, :, 1])
