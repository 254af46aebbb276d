"""Cell outlines as polygons QuPath accepts: closed, simple, tracing each counted cell's pixels.

An outline is the 0.5 iso-line of the cell's mask (marching squares, `skimage.measure.find_contours`): it
runs through the midpoints between the cell's boundary pixels and their outside neighbours, so it never
crosses or touches itself, even where the cell is one pixel wide. Cells are 8-connected, so diagonal
neighbours join (`fully_connected="high"`). Coordinates are QuPath's: pixel (x, y) of level 0 covers
[x, x+1) x [y, y+1), so a pixel's centre is (x + 0.5, y + 0.5).

Images and slides trace the same way: an `OutlineTracer` is handed, band by band from the top, which
counted cell owns each pixel. Two cells are never 8-adjacent (they would be one component), so one
marching-squares pass over a band's mask separates every cell lying wholly inside it; each contour is
given to the cell that owns the pixel beside its first vertex. A cell that crosses a band edge is
gathered into a mask of its own until the bands have passed its bottom row, then traced alone, so a slide
holds only the masks of the cells that cross the current band's edges.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .cells import Cell, Outline

Ring = np.ndarray  # (n, 2) float64 (x, y), closed: the last point is the first


class OutlineTracer:
    """Outlines of `cells` (numbered 1.. in order), from owner bands handed over top to bottom."""

    def __init__(self, cells: list[Cell]) -> None:
        self.cells = cells
        self.outlines: dict[int, Outline] = {}
        self._pending: dict[int, np.ndarray] = {}

    def add(self, top: int, owner: np.ndarray) -> None:
        """`owner`: per pixel of rows [top, top + len(owner)), the id of the counted cell it is in, 0 if none."""
        bottom = top + len(owner)
        crossing = []
        for index, found in enumerate(ndimage.find_objects(owner)):
            cell = None if found is None else self.cells[index]
            if cell is not None and (cell.bbox_y0 < top or cell.bbox_y1 > bottom):
                crossing.append(cell.id)
                self._gather(cell, top, owner, found)
        whole = owner > 0
        if crossing:
            whole &= ~np.isin(owner, crossing)
        self._trace_band(whole, owner, top)
        for cell_id in [c for c in self._pending if self.cells[c - 1].bbox_y1 <= bottom]:
            cell = self.cells[cell_id - 1]
            self.outlines[cell_id] = _rings(_contours(self._pending.pop(cell_id)), cell.bbox_x0, cell.bbox_y0)

    def _gather(self, cell: Cell, top: int, owner: np.ndarray, found: tuple[slice, slice]) -> None:
        mask = self._pending.get(cell.id)
        if mask is None:
            shape = (cell.bbox_y1 - cell.bbox_y0, cell.bbox_x1 - cell.bbox_x0)
            mask = self._pending[cell.id] = np.zeros(shape, bool)
        rows, cols = found
        mask[rows.start + top - cell.bbox_y0: rows.stop + top - cell.bbox_y0,
             cols.start - cell.bbox_x0: cols.stop - cell.bbox_x0] |= owner[rows, cols] == cell.id

    def _trace_band(self, whole: np.ndarray, owner: np.ndarray, top: int) -> None:
        by_cell: dict[int, list[np.ndarray]] = {}
        for contour in _contours(whole):
            by_cell.setdefault(_owner_beside(contour[0], owner), []).append(contour)
        for cell_id, contours in by_cell.items():
            self.outlines[cell_id] = _rings(contours, 0, top)


def trace(mask: np.ndarray, x0: int, y0: int) -> Outline:
    """The outline of the pixels of `mask` (one cell), whose pixel (0, 0) is level-0 pixel (x0, y0)."""
    return _rings(_contours(mask), x0, y0)


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    """Marching-squares contours of a mask, as (row, column) of the mask padded by one pixel."""
    from skimage.measure import find_contours
    return find_contours(np.pad(mask, 1).astype(np.uint8), 0.5, fully_connected="high")


def _owner_beside(vertex: np.ndarray, owner: np.ndarray) -> int:
    """The owner of the inside pixel next to a contour vertex, which lies midway between two pixels."""
    row, column = vertex - 1  # the contour is of the padded mask
    pixels = [(int(row), int(np.floor(column))), (int(row), int(np.ceil(column)))] if row == int(row) else \
        [(int(np.floor(row)), int(column)), (int(np.ceil(row)), int(column))]
    return max(int(owner[y, x]) for y, x in pixels if 0 <= y < owner.shape[0] and 0 <= x < owner.shape[1])


def _rings(contours: list[np.ndarray], x0: int, y0: int) -> Outline:
    """Contours to closed level-0 (x, y) rings without the vertices on straight lines, shell first."""
    rings = [_ring(contour, x0, y0) for contour in contours]
    rings.sort(key=lambda ring: -abs(_area(ring)))
    return rings


def _ring(contour: np.ndarray, x0: int, y0: int) -> Ring:
    points = np.column_stack([contour[:, 1] + (x0 - 0.5), contour[:, 0] + (y0 - 0.5)])
    body = points[:-1] if np.array_equal(points[0], points[-1]) else points
    before, after = np.roll(body, 1, axis=0), np.roll(body, -1, axis=0)
    cross = (body[:, 0] - before[:, 0]) * (after[:, 1] - body[:, 1]) - \
        (body[:, 1] - before[:, 1]) * (after[:, 0] - body[:, 0])
    kept = body[cross != 0]
    return np.vstack([kept, kept[:1]])


def _area(ring: Ring) -> float:
    xs, ys = ring[:, 0], ring[:, 1]
    return float(np.dot(xs[:-1], ys[1:]) - np.dot(xs[1:], ys[:-1])) / 2
