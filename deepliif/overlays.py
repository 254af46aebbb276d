"""Cell outlines grown into the background, and the SegOverlaid / SegRefined images painted from them.

DeepLIIF outlines each counted cell with the background pixels 4-adjacent to it, then grows that outline
twice through the 8-neighbourhood into the background; where cells of both classes reach one pixel, the
neighbour its in-place raster scan meets first (or last) gives the class. Images, slide bands and
re-scoring all draw this way, on per-pixel codes (`NONE`, `NEGATIVE`, `POSITIVE`). Each growth step is one
OpenCV dilation of the codes (the largest neighbouring code wins, so a positive neighbour does), and only
the few pixels that both classes reach are decided neighbour by neighbour in the scan's order.
"""
from __future__ import annotations

import numpy as np

from .workers import opencv

NONE, NEGATIVE, POSITIVE = 0, 1, 2  # per-pixel codes: not in (the outline of) a counted cell, its class
Offsets = tuple[tuple[int, int], ...]  # (dy, dx) of a source pixel relative to its target
# Neighbour offsets in raster order.
RASTER_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
RASTER_FOUR_NEIGHBOURS = ((-1, 0), (0, -1), (0, 1), (1, 0))
OUTLINE_REACH = 3  # rows an outline pixel depends on each way: one step to the background, two growth steps
_OUTLINE_GROWTH = 2
_OUTLINE_KEY = 3  # SegRefined's code of an outline pixel, above every cell code


def cell_codes(in_cell: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """`NEGATIVE` in a cell, `POSITIVE` in its positive pixels (a subset of `in_cell`), else `NONE`."""
    return in_cell.view(np.uint8) + positive.view(np.uint8)


def reach(codes: np.ndarray, allowed: np.ndarray, priority: Offsets) -> np.ndarray:
    """Codes of the `allowed` pixels without one that a coded neighbour at one of the `priority` offsets
    reaches (`NONE` elsewhere). Where neighbours of both classes reach a pixel, the first offset in
    `priority` with a coded neighbour gives its class."""
    if not codes.size:
        return np.zeros(codes.shape, np.uint8)
    cv2 = opencv()
    kernel = np.zeros((3, 3), np.uint8)
    for dy, dx in priority:
        kernel[1 + dy, 1 + dx] = 1  # dilate reads the source at target + (dy, dx); nothing beyond the image
    codes = np.ascontiguousarray(codes)
    reached = cv2.dilate(codes, kernel)
    np.multiply(reached, allowed & (codes == NONE), out=reached)
    near_negative = cv2.dilate((codes == NEGATIVE).view(np.uint8), kernel).view(bool)
    contested = np.flatnonzero((reached == POSITIVE) & near_negative)
    if len(contested):
        reached.ravel()[contested] = _first_code(codes, contested, priority)
    return reached


def _first_code(codes: np.ndarray, targets: np.ndarray, priority: Offsets) -> np.ndarray:
    """For flat indices `targets`, the code of the first neighbour in `priority` order that has one."""
    height, width = codes.shape
    rows, cols = np.divmod(targets, width)
    found = np.zeros(len(targets), np.uint8)
    for dy, dx in priority:
        at_rows, at_cols = rows + dy, cols + dx
        open_ = (found == NONE) & (at_rows >= 0) & (at_rows < height) & (at_cols >= 0) & (at_cols < width)
        found[open_] = codes[at_rows[open_], at_cols[open_]]
    return found


def outline(background: np.ndarray, cells: np.ndarray, seeds: np.ndarray | None = None,
            seeds_positive: np.ndarray | None = None, first_step: Offsets = RASTER_FOUR_NEIGHBOURS[::-1]) -> np.ndarray:
    """Outline codes: background pixels 4-adjacent to a coded cell pixel (`first_step`: the neighbours'
    order of precedence; DeepLIIF's images let the later neighbour in raster order win), grown twice into
    background, each new pixel taking the class of the first outline pixel next to it in raster order, as
    DeepLIIF's in-place raster scan decides. `seeds` (flat indices, the cells' first pixels: DeepLIIF's
    flood-fill seeds), if given, are outline too, of class `seeds_positive`. A pixel's outline depends on pixels at most
    `OUTLINE_REACH` rows away, so a band with that many rows of halo each side is drawn exactly."""
    border = reach(cells, background, first_step)
    for _ in range(_OUTLINE_GROWTH):
        border += reach(border, background, RASTER_NEIGHBOURS)
    if seeds is not None:
        border.ravel()[seeds] = np.where(seeds_positive, POSITIVE, NEGATIVE)
    return border


def paint(orig: np.ndarray, border: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SegOverlaid (outlines on the input: red positive, blue negative) and SegRefined (green outlines,
    red/blue interiors on black), from outline and cell codes of the same rows. Each colour plane is one
    OpenCV comparison (255 where true), merged into RGB: NumPy's per-pixel colour lookups were measured
    several times slower."""
    if not border.size:
        return orig.copy(), np.zeros_like(orig)
    cv2 = opencv()
    border, cells = np.ascontiguousarray(border), np.ascontiguousarray(cells)
    outlined = cv2.compare(border, NONE, cv2.CMP_NE)
    overlaid = orig.copy()
    colours = cv2.merge([cv2.compare(border, POSITIVE, cv2.CMP_EQ), np.zeros_like(border),
                         cv2.compare(border, NEGATIVE, cv2.CMP_EQ)])
    cv2.copyTo(colours, outlined, overlaid)
    interior = np.maximum(cells, outlined & np.uint8(_OUTLINE_KEY))  # the cell's code, or _OUTLINE_KEY
    refined = cv2.merge([cv2.compare(interior, POSITIVE, cv2.CMP_EQ), outlined,
                         cv2.compare(interior, NEGATIVE, cv2.CMP_EQ)])
    return overlaid, refined
