from __future__ import annotations

import numpy as np
import pytest

from deepliif.overlays import (NEGATIVE, NONE, POSITIVE, RASTER_FOUR_NEIGHBOURS, RASTER_NEIGHBOURS, cell_codes,
                               outline, paint, reach)


def _reach_pixel_by_pixel(codes: np.ndarray, allowed: np.ndarray, priority) -> np.ndarray:
    """The rule as stated: an allowed pixel without a code takes the code of its first coded neighbour."""
    height, width = codes.shape
    out = np.zeros_like(codes)
    for y in range(height):
        for x in range(width):
            if not allowed[y, x] or codes[y, x] != NONE:
                continue
            for dy, dx in priority:
                if 0 <= y + dy < height and 0 <= x + dx < width and codes[y + dy, x + dx] != NONE:
                    out[y, x] = codes[y + dy, x + dx]
                    break
    return out


def _random_case(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    background = rng.random((height, width)) < rng.uniform(0.2, 0.8)
    codes = np.where(background, NONE, rng.integers(NONE, POSITIVE + 1, (height, width))).astype(np.uint8)
    return background, codes


@pytest.mark.parametrize("priority", [RASTER_NEIGHBOURS, RASTER_NEIGHBOURS[::-1], RASTER_FOUR_NEIGHBOURS,
                                      RASTER_FOUR_NEIGHBOURS[::-1]])
def test_reach_gives_each_pixel_its_first_coded_neighbour(priority) -> None:
    rng = np.random.default_rng(7)
    shapes = [(1, 1), (1, 9), (9, 1), (2, 2), (5, 17)] + [tuple(rng.integers(1, 24, 2)) for _ in range(40)]
    contested = 0
    for height, width in shapes:
        background, codes = _random_case(rng, height, width)
        expected = _reach_pixel_by_pixel(codes, background, priority)
        assert np.array_equal(reach(codes, background, priority), expected), (height, width)
        by_class = [_reach_pixel_by_pixel(np.where(codes == code, codes, NONE), background, priority) != NONE
                    for code in (NEGATIVE, POSITIVE)]
        contested += int(np.sum(by_class[0] & by_class[1]))
    assert contested, "no pixel was reached by both classes: the cases test nothing of the order"


def test_outline_is_one_step_then_two_growths_then_the_seeds() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        background, codes = _random_case(rng, *rng.integers(3, 30, 2))
        seeds = rng.choice(np.flatnonzero(codes), size=min(3, np.count_nonzero(codes)), replace=False)
        seeds_positive = rng.random(len(seeds)) < 0.5
        border = _reach_pixel_by_pixel(codes, background, RASTER_FOUR_NEIGHBOURS[::-1])
        for _ in range(2):
            border = border + _reach_pixel_by_pixel(border, background, RASTER_NEIGHBOURS)
        border.ravel()[seeds] = np.where(seeds_positive, POSITIVE, NEGATIVE)
        assert np.array_equal(outline(background, codes, seeds, seeds_positive), border)


def test_paint_colours_outlines_and_interiors() -> None:
    rng = np.random.default_rng(5)
    orig = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    in_cell = rng.random((6, 7)) < 0.6
    cells = cell_codes(in_cell, in_cell & (rng.random((6, 7)) < 0.5))
    border = np.where(~in_cell & (rng.random((6, 7)) < 0.7), rng.integers(1, 3, (6, 7)), 0).astype(np.uint8)
    border[0, 0] = POSITIVE  # a seed: an outline pixel inside a cell
    overlaid, refined = paint(orig, border, cells)
    for y in range(6):
        for x in range(7):
            colour = {NONE: tuple(orig[y, x]), NEGATIVE: (0, 0, 255), POSITIVE: (255, 0, 0)}[border[y, x]]
            assert tuple(overlaid[y, x]) == colour
            inside = {NONE: (0, 0, 0), NEGATIVE: (0, 0, 255), POSITIVE: (255, 0, 0)}[cells[y, x]]
            assert tuple(refined[y, x]) == ((0, 255, 0) if border[y, x] else inside)


def test_empty_rows_are_drawn_as_nothing() -> None:
    empty = np.zeros((0, 5), np.uint8)
    assert reach(empty, empty.astype(bool), RASTER_NEIGHBOURS).shape == (0, 5)
    overlaid, refined = paint(np.zeros((0, 5, 3), np.uint8), empty, empty)
    assert overlaid.shape == refined.shape == (0, 5, 3)
