"""Cell outlines as polygons QuPath accepts: closed, simple, tracing each counted cell's pixels.

An outline is the 0.5 iso-line of the cell's mask (marching squares, `marching_squares.iso_rings`, the
lines scikit-image's `find_contours` gives): it runs through the midpoints between the cell's boundary
pixels and their outside neighbours, so it never crosses or touches itself, even where the cell is one
pixel wide. Cells are 8-connected, so diagonal neighbours join. Coordinates are QuPath's: pixel (x, y) of level 0 covers
[x, x+1) x [y, y+1), so a pixel's centre is (x + 0.5, y + 0.5).

Images and slides trace the same way: an `OutlineTracer` is handed, band by band from the top, which
object owns each pixel (a slide: its counted cells; an image: every labelled component, traced before
the thresholds decide which are counted). Two cells are never 8-adjacent (they would be one component), so
one marching-squares pass over a band's mask separates every cell lying wholly inside it, and a cell's
rings depend on its own pixels only; each contour is given to the cell that owns the pixel beside its
first vertex. A cell that crosses a band edge is gathered into a mask of its own until the bands have
passed its bottom row; the cells a band completes are then traced together, so a slide holds only the
masks of the cells that cross the current band's edges.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .cells import Cell, Outline
from .errors import DeepLIIFError
from .label_stats import Components
from .marching_squares import iso_lines
from .workers import ordered_map, row_bands

_CANVAS_COLUMNS = 4096  # the cells traced on one canvas start in the same this many columns
TRACE_BAND_ROWS = 512  # rows per band an image's labels are traced in, handed over as each is done


@dataclass
class TracedBand:
    """What tracing one band found, before it is handed to the tracer: the rings of the cells lying wholly
    inside it with their owners, and the ids of the cells that cross its edges."""
    top: int
    owner: np.ndarray
    crossing: np.ndarray
    rings: list[np.ndarray]
    owners: list[int]


class OutlineTracer:
    """Outlines of objects 1..n with the bounding boxes `x0`, `y0`, `x1`, `y1` (exclusive ends; index k is
    object k + 1), from owner bands handed over top to bottom. `trace_band` touches nothing of the tracer's,
    so bands may be traced on several threads and handed over in order."""

    def __init__(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> None:
        self._x0, self._y0, self._x1, self._y1 = (np.asarray(edge, np.int64) for edge in (x0, y0, x1, y1))
        self.outlines: dict[int, Outline] = {}
        self._pending: dict[int, np.ndarray] = {}

    @classmethod
    def for_cells(cls, cells: list[Cell]) -> OutlineTracer:
        """The tracer of counted cells numbered 1.. in order."""
        boxes = np.array([(c.bbox_x0, c.bbox_y0, c.bbox_x1, c.bbox_y1) for c in cells], np.int64).reshape(-1, 4)
        return cls(*boxes.T)

    def add(self, top: int, owner: np.ndarray) -> None:
        """`owner`: per pixel of rows [top, top + len(owner)), the id of the object it is in, 0 if none."""
        self.hand_over(self.trace_band(top, owner))

    def trace_band(self, top: int, owner: np.ndarray) -> TracedBand:
        """An object is connected, so it is in every row of its box, and its box says whether it crosses
        an edge."""
        bottom = top + len(owner)
        crossing = np.flatnonzero((self._y0 < bottom) & (self._y1 > top) & ((self._y0 < top) | (self._y1 > bottom)))
        whole = owner > 0
        if len(crossing):
            is_crossing = np.zeros(len(self._y0) + 1, bool)
            is_crossing[crossing + 1] = True
            whole &= ~is_crossing[owner]
        rings, owners = trace_mask(whole, owner, top)
        return TracedBand(top, owner, crossing + 1, rings, owners)

    def hand_over(self, band: TracedBand) -> None:
        """A band traced by `trace_band`; bands must come top to bottom."""
        for object_id in band.crossing.tolist():
            self._gather(object_id, band.top, band.owner)
        for object_id, ring in zip(band.owners, band.rings):
            self.outlines.setdefault(object_id, []).append(ring)
        bottom = band.top + len(band.owner)
        self._trace_gathered([object_id for object_id in self._pending if self._y1[object_id - 1] <= bottom])

    def trace_whole(self, labels: np.ndarray, ids: Iterable[int]) -> None:
        """Objects `ids` traced from a whole image's labels (object k is label k), each within its box."""
        ids = list(ids)
        for object_id in ids:
            self._gather(object_id, 0, labels)
        self._trace_gathered(ids)

    def _trace_gathered(self, ids: list[int]) -> None:
        by_column: dict[int, list[int]] = {}
        for object_id in ids:
            by_column.setdefault(int(self._x0[object_id - 1]) // _CANVAS_COLUMNS, []).append(object_id)
        for column_ids in by_column.values():
            self._trace_together(np.array(column_ids))

    def _gather(self, object_id: int, top: int, owner: np.ndarray) -> None:
        x0, y0, x1, y1 = (int(edge[object_id - 1]) for edge in (self._x0, self._y0, self._x1, self._y1))
        mask = self._pending.get(object_id)
        if mask is None:
            mask = self._pending[object_id] = np.zeros((y1 - y0, x1 - x0), bool)
        low, high = max(y0, top), min(y1, top + len(owner))
        mask[low - y0: high - y0] |= owner[low - top: high - top, x0: x1] == object_id

    def _trace_together(self, ids: np.ndarray) -> None:
        """Objects gathered across band edges, traced in one marching-squares pass over a canvas holding
        each at its place (a few calls per band, not one per object): they are never 8-adjacent, so their
        contours stay apart, and each ring goes to the object beside its first vertex, as in a band. The
        objects of one canvas start in the same `_CANVAS_COLUMNS` columns, so a canvas stays small on a
        wide slide."""
        x0s, y0s, x1s, y1s = (edge[ids - 1] for edge in (self._x0, self._y0, self._x1, self._y1))
        x0, y0 = int(x0s.min()), int(y0s.min())
        canvas = np.zeros((int(y1s.max()) - y0, int(x1s.max()) - x0), np.int32)
        for object_id, left, top, right, bottom in zip(ids.tolist(), x0s.tolist(), y0s.tolist(), x1s.tolist(),
                                                       y1s.tolist()):
            canvas[top - y0: bottom - y0, left - x0: right - x0][self._pending.pop(object_id)] = object_id
        rings, owners = trace_mask(canvas > 0, canvas, y0, x0)
        for object_id, ring in zip(owners, rings):
            self.outlines.setdefault(object_id, []).append(ring)


class LabelOutlines:
    """Every label's outline of an image's label image, traced on a thread of its own from the moment the
    labels exist, so tracing overlaps the per-cell measures, the thresholds and the overlays instead of
    waiting for the thresholds that say which labels are counted cells (a label's rings depend on its own
    pixels only). Bands of about `TRACE_BAND_ROWS` rows are traced on `threads` threads and handed to the
    tracer top to bottom; `follow` hears how far they have come. Use it as a context manager: leaving
    stops the tracing and waits for its threads, whatever happened."""

    def __init__(self, found: Components, threads: int) -> None:
        self.tracer = OutlineTracer(found.x0[1:], found.y0[1:], found.x1[1:], found.y1[1:])
        self._labels, self._threads = found.labels, threads
        self._rows, self._listener = 0, None
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outlines")
        self._done = self._pool.submit(self._trace)

    @property
    def outlines(self) -> dict[int, Outline]:
        """Label -> its rings, filled as the bands are handed over."""
        return self.tracer.outlines

    def follow(self, passed: Callable[[int], None]) -> None:
        """`passed(bottom)` now for the rows traced so far, and after each band from now on (calls may
        repeat a row already passed, never one not yet traced)."""
        with self._lock:
            self._listener, rows = passed, self._rows
        passed(rows)

    def wait(self) -> dict[int, Outline]:
        """Every label's rings, once all are traced; the tracing's error, if it failed."""
        self._done.result()
        return self.tracer.outlines

    def _trace(self) -> None:
        height = len(self._labels)
        bands = row_bands(height, max(self._threads, -(-height // TRACE_BAND_ROWS)))
        traced = ordered_map(lambda rows: self.tracer.trace_band(rows[0], self._labels[rows[0]:rows[1]]),
                             bands, self._threads)
        with contextlib.closing(traced):
            for (_, bottom), band in zip(bands, traced):
                if self._stop.is_set():
                    return
                self.tracer.hand_over(band)
                with self._lock:
                    self._rows, listener = bottom, self._listener
                if listener is not None:
                    listener(bottom)

    def __enter__(self) -> LabelOutlines:
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)


def trace_mask(mask: np.ndarray, owner: np.ndarray, top: int, left: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """The rings of the objects in `mask` (no two 8-adjacent), placed at row `top`, column `left` of
    level 0, and each ring's object: `owner` (the mask's shape) says which object owns each pixel."""
    rings, firsts = _rings_of(mask, left, top)
    return rings, _owners_beside(firsts, owner).tolist()


class TracedOutlines:
    """Outlines traced as the cells were found, behind `LabelOutlines`' interface: `outlines` is filled in
    place, its last rings perhaps still on another thread until `done`."""

    def __init__(self, outlines: dict[int, Outline], height: int, done: Future) -> None:
        self.outlines, self._height, self._done = outlines, height, done

    def follow(self, passed: Callable[[int], None]) -> None:
        """`passed(height)` once every ring is traced (never, if the tracing failed: `wait` raises)."""
        self._done.add_done_callback(lambda done: None if done.cancelled() or done.exception() is not None
                                     else passed(self._height))

    def wait(self) -> dict[int, Outline]:
        self._done.result()
        return self.outlines


def _rings_of(mask: np.ndarray, x0: int, y0: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The mask's iso-lines as closed level-0 (x, y) rings without the vertices that lie on a straight
    line, largest first (a cell's shell before any hole: the rings of one mask never cross); and each
    ring's first vertex before that, as (row, column) of the padded mask."""
    points, lengths = iso_lines(mask)
    if not len(lengths):
        return [], np.zeros((0, 2))
    count, ring_of = len(lengths), np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    firsts = points[starts]
    xy = np.column_stack([points[:, 1] + (x0 - 0.5), points[:, 0] + (y0 - 0.5)])
    index = np.arange(len(xy))
    before = np.where(index == starts[ring_of], index + lengths[ring_of] - 1, index - 1)
    after = np.where(index == starts[ring_of] + lengths[ring_of] - 1, starts[ring_of], index + 1)
    turn = (xy[:, 0] - xy[before, 0]) * (xy[after, 1] - xy[:, 1]) - (xy[:, 1] - xy[before, 1]) * (xy[after, 0] - xy[:, 0])
    area = np.abs(np.bincount(ring_of, xy[:, 0] * xy[after, 1] - xy[after, 0] * xy[:, 1], minlength=count)) / 2
    kept = turn != 0
    xy, ring_of = xy[kept], ring_of[kept]
    kept_lengths = np.bincount(ring_of, minlength=count)
    closed = np.insert(xy, np.cumsum(kept_lengths), xy[np.cumsum(kept_lengths) - kept_lengths], axis=0)
    rings = np.split(closed, np.cumsum(kept_lengths + 1)[:-1])
    order = np.argsort(-area, kind="stable")
    return [rings[k] for k in order], firsts[order]


def _owners_beside(firsts: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per ring, the owner of the inside pixel next to its first vertex, which lies midway between two
    pixels of one row (padded coordinates)."""
    row = firsts[:, 0].astype(np.int64) - 1
    left = np.floor(firsts[:, 1]).astype(np.int64) - 1
    right = left + 1
    width = owner.shape[1]
    at_left = np.where(left >= 0, owner[row, np.clip(left, 0, width - 1)], 0)
    at_right = np.where(right < width, owner[row, np.clip(right, 0, width - 1)], 0)
    return np.maximum(at_left, at_right)


class CellsInOrder:
    """Counted cells handed out in order as a pass over an image or slide completes them (traces their
    outlines), to a consumer on another thread (the cells files' writer, which then runs beside the pass
    instead of after it). A cell is complete once every band down to its last row has been handed over
    (`passed`). Cells are numbered by their first pixel, so they complete nearly in order: a tall cell
    holds back those after it until its last row has passed."""

    def __init__(self, cells: list[Cell]) -> None:
        self.cells = cells
        last_rows = np.array([cell.bbox_y1 for cell in cells], np.int64)
        self._complete_below = np.maximum.accumulate(last_rows) if len(last_rows) else last_rows
        self._ready, self._abandoned = 0, False
        self._changed = threading.Condition()

    def passed(self, bottom: int) -> None:
        """Every row above `bottom` has been handed over: the cells lying wholly above it are complete."""
        ready = int(np.searchsorted(self._complete_below, bottom, side="right"))
        with self._changed:
            self._ready = max(self._ready, ready)
            self._changed.notify_all()

    def abandon(self) -> None:
        """The pass failed: the consumer stops at the first cell not yet complete."""
        with self._changed:
            self._abandoned = True
            self._changed.notify_all()

    def __iter__(self) -> Iterator[Cell]:
        """The cells in order, each once it is complete; the lock is taken once per run of cells found
        complete together, not per cell (an image's cells mostly complete in a few runs)."""
        index = 0
        while index < len(self.cells):
            with self._changed:
                self._changed.wait_for(lambda: self._ready > index or self._abandoned)
                ready = self._ready
            if ready <= index:
                raise DeepLIIFError(f"the outline pass stopped before cell {self.cells[index].id} was complete")
            yield from self.cells[index:ready]
            index = ready
