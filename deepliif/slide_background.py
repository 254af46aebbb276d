"""Pass one of a slide's scoring (its background) made as the tile loop hands the Seg over.

Pass one needs nothing but the Seg, top to bottom, so it need not wait for the stream to end and read the
Seg back: `StreamedBackground` takes the rows the slide loop releases, cuts them into scoring's bands and
labels them on a thread of its own while the network and the encoders work on the next rows. On a 2-CPU
machine the stream leaves about a sixth of the CPUs idle, which is about what pass one needs once it does
not decode the Seg (measured: pass one alone, reading the Seg, 2.9 s of a 16k slide's scoring). Its result
is exactly `background_labels` of the same bands: the bands are cut at the same rows.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from .errors import DeepLIIFError, ImageError
from .slide_scoring import Background, Band, background_labels, band_rows
from .workers import hand_to

_END, _ABANDONED = object(), object()


class StreamedBackground:
    """`add(top, seg_rows)` with the Seg's rows in order from row 0 (rows handed over again, as a resumed
    run does, are skipped); `finish()` returns pass one's result, `abandon()` stops it. The rows are copied,
    so the caller may reuse its buffer."""

    def __init__(self, width: int, height: int, seg_thresh: int, threads: int = 1) -> None:
        self.width, self.height, self.band_height = width, height, band_rows(width)
        self._next, self._band, self._held = 0, None, 0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._result: Background | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(seg_thresh, threads), name="background-pass",
                                        daemon=True)
        self._thread.start()

    def add(self, top: int, seg: np.ndarray) -> None:
        if top > self._next:
            raise ImageError(f"pass one got rows from {top} but has only {self._next}: rows are missing")
        seg = seg[self._next - top:]
        while len(seg):
            if self._band is None:
                rows = min(self.band_height, self.height - self._next)
                self._band, self._held = np.empty((rows, self.width, 3), np.uint8), 0
            taken = min(len(seg), len(self._band) - self._held)
            self._band[self._held: self._held + taken] = seg[:taken]
            self._held, self._next, seg = self._held + taken, self._next + taken, seg[taken:]
            if self._held == len(self._band):
                self._put(Band(self._next - self._held, self._band, None))
                self._band = None

    def finish(self) -> Background:
        if self._next != self.height:
            self.abandon()
            raise ImageError(f"pass one got {self._next} of the Seg's {self.height} rows")
        self._put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def abandon(self) -> None:
        """The stream failed: the pass stops and its threads end (nothing is kept)."""
        self._put(_ABANDONED)
        self._thread.join()

    def _put(self, item: object) -> None:
        if not hand_to(self._thread, self._queue, item) and self._error is not None and item is not _ABANDONED:
            raise self._error

    def _bands(self) -> Iterator[Band]:
        while (item := self._queue.get()) is not _END:
            if item is _ABANDONED:
                raise DeepLIIFError("the tile loop stopped before the Seg was whole")
            yield item

    def _run(self, seg_thresh: int, threads: int) -> None:
        try:
            self._result = background_labels(lambda measuring: self._bands(), self.height, seg_thresh, threads)
        except BaseException as exc:  # raised by finish(), or ignored after abandon()
            self._error = exc
