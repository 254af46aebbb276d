"""Cell outlines as polygons QuPath accepts: closed, simple, tracing each counted cell's pixels.

An outline is the 0.5 iso-line of the cell's mask (marching squares, `skimage.measure.find_contours`): it
runs through the midpoints between the cell's boundary pixels and their outside neighbours, so it never
crosses or touches itself, even where the cell is one pixel wide. Cells are 8-connected, so diagonal
neighbours join (`fully_connected="high"`). Coordinates are QuPath's: pixel (x, y) of level 0 covers
[x, x+1) x [y, y+1), so a pixel's centre is (x + 0.5, y + 0.5).

Images and slides trace the same way: a `OutlineTracer` is handed, band by band from the top, which
counted cell owns each pixel; a cell is traced once the bands have passed its bottom row, so a slide
holds only the masks of the cells that cross the current band's edge.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .cells import Cell, Outline, Ring


class OutlineTracer:
    """Outlines of `cells` (numbered 1.. in order), from owner bands handed over top to bottom."""

    def __init__(self, cells: list[Cell]) -> None:
        self.cells = cells
        self.outlines: dict[int, Outline] = {}
        self._pending: dict[int, np.ndarray] = {}

    def add(self, top: int, owner: np.ndarray) -> None:
        """`owner`: per pixel of rows [top, top + len(owner)), the id of the counted cell it is in, 0 if none."""
        bottom = top + len(owner)
        for index, found in enumerate(ndimage.find_objects(owner)):
            if found is None:
                continue
            cell = self.cells[index]
            mask = self._pending.get(cell.id)
            if mask is None:
                mask = self._pending[cell.id] = np.zeros((cell.bbox_y1 - cell.bbox_y0, cell.bbox_x1 - cell.bbox_x0),
                                                         bool)
            rows, cols = found
            inside = owner[rows, cols] == cell.id
            mask[rows.start + top - cell.bbox_y0: rows.stop + top - cell.bbox_y0,
                 cols.start - cell.bbox_x0: cols.stop - cell.bbox_x0] |= inside
        for cell_id in [c for c in self._pending if self.cells[c - 1].bbox_y1 <= bottom]:
            cell = self.cells[cell_id - 1]
            self.outlines[cell_id] = trace(self._pending.pop(cell_id), cell.bbox_x0, cell.bbox_y0)


def trace(mask: np.ndarray, x0: int, y0: int) -> Outline:
    """The outline of the pixels of `mask`, whose pixel (0, 0) is level-0 pixel (x0, y0)."""
    from skimage.measure import find_contours
    contours = find_contours(np.pad(mask, 1).astype(np.uint8), 0.5, fully_connected="high")
    rings = [_ring(contour, x0, y0) for contour in contours]
    rings.sort(key=lambda ring: -abs(_area(ring)))
    return rings


def _ring(contour: np.ndarray, x0: int, y0: int) -> Ring:
    """(row, column) of the padded mask to level-0 (x, y), without the vertices that lie on a straight line."""
    points = np.column_stack([contour[:, 1] + (x0 - 0.5), contour[:, 0] + (y0 - 0.5)])
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    body = points[:-1]
    before, after = np.roll(body, 1, axis=0), np.roll(body, -1, axis=0)
    cross = (body[:, 0] - before[:, 0]) * (after[:, 1] - body[:, 1]) - \
        (body[:, 1] - before[:, 1]) * (after[:, 0] - body[:, 0])
    kept = body[cross != 0]
    kept = np.vstack([kept, kept[:1]])
    return [(float(x), float(y)) for x, y in kept]


def _area(ring: Ring) -> float:
    xs, ys = np.array(ring).T
    return float(np.dot(xs[:-1], ys[1:]) - np.dot(xs[1:], ys[:-1])) / 2
