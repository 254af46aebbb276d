"""SegOverlaid and SegRefined of a whole slide, drawn band by band, equal to `postprocess` of the same pixels.

A pixel's outline depends only on pixels at most `OUTLINE_REACH` rows away (see `overlays.outline`),
so each band is drawn from a window of its rows plus that many rows of halo on each side, and only the
band's own rows are kept. Which cell each pixel belongs to, and whether that cell is counted and positive,
comes from the slide's scoring (`SlideScore`): the bands' labels as scoring made them, kept compressed, so
no label image of the slide is ever held and the Seg is not read again.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .cell_outlines import OutlineTracer, TracedBand
from .errors import ImageError
from .overlays import OUTLINE_REACH, cell_codes, outline, paint
from .slide_cell_data import SlideCellData
from .slide_scoring import SlideScore, StoredBand
from .workers import ordered_map

Rows = Callable[[int, int], np.ndarray]  # (top, count) -> the input image's rows (RGB), for SegOverlaid
OverlaySink = Callable[[int, np.ndarray, np.ndarray], None]  # (top, SegOverlaid rows, SegRefined rows)


class MaskWindow:
    """Per-pixel masks of consecutive rows of a slide (here: background, and the cells' codes), extended
    band by band below and dropped above once drawn. `add` hands over the rows that have `OUTLINE_REACH`
    rows of halo below (or reach the slide's bottom) and keeps that many above."""

    def __init__(self, height: int) -> None:
        self.top, self.height, self.drawn = 0, height, 0
        self.masks: list[np.ndarray] = []

    def add(self, masks: list[np.ndarray], draw: Callable[[int, int], None]) -> None:
        """Extends the window by a band's masks; `draw(first, stop)` the rows that can now be drawn exactly."""
        self.extend(masks)
        ready = self.ready(self.bottom)
        if ready > self.drawn:
            draw(self.drawn, ready)
            self.drawn = ready
            self.drop_above(ready - OUTLINE_REACH)

    def ready(self, bottom: int) -> int:
        """The rows above which can be drawn once the window reaches row `bottom`."""
        return self.height if bottom >= self.height else max(0, bottom - OUTLINE_REACH)

    @property
    def bottom(self) -> int:
        return self.top + (len(self.masks[0]) if self.masks else 0)

    def extend(self, masks: list[np.ndarray]) -> None:
        self.masks = [np.concatenate([old, new]) for old, new in zip(self.masks, masks)] if self.masks else masks

    def drop_above(self, row: int) -> None:
        cut = max(0, row - self.top)
        self.masks = [mask[cut:] for mask in self.masks]
        self.top += cut


@dataclass
class _BandCells:
    """One band's masks (background, the counted cells' codes); with a tracer, its counted cells traced
    (`OutlineTracer.trace_band`); with labels, the band's own labels and their cells."""
    top: int
    masks: list[np.ndarray]
    traced: TracedBand | None
    labels: tuple[np.ndarray, np.ndarray] | None
    pixels: np.ndarray  # the input's rows that adding this band to the window draws


def _band_cells(score: SlideScore, cell_code: np.ndarray, index: int, band: StoredBand, pixels: np.ndarray,
                tracer: OutlineTracer | None, labelled: bool) -> _BandCells:
    """Each pixel's code (`cell_code`: per merged cell) and owner through per-label tables (one gather each,
    not boolean-mask indexing), and the band's outlines traced here, on a band thread."""
    top = band[0]
    labels, cell_of = score.labels.band_labels(index, *band[1:])
    in_cell = cell_of >= 0
    code_of = np.zeros(len(cell_of), np.uint8)
    code_of[in_cell] = cell_code[cell_of[in_cell]]
    traced = None
    if tracer is not None:
        owner_of = np.zeros(len(cell_of), np.int32)
        owner_of[in_cell] = score.counted_ids[cell_of[in_cell]]
        traced = tracer.trace_band(top, owner_of[labels])
    return _BandCells(top, [~in_cell[labels], code_of[labels]], traced, (labels, cell_of) if labelled else None,
                      pixels)


def draw_slide(rows: Rows, score: SlideScore, width: int, height: int, sink: OverlaySink, threads: int = 1,
               tracer: OutlineTracer | None = None, cell_data: SlideCellData | None = None,
               passed: Callable[[int], None] = lambda bottom: None) -> None:
    """Hands `sink` the SegOverlaid and SegRefined rows of the whole slide, top to bottom, band by band of
    scoring's, `tracer` (if any) each band's counted cells and `cell_data` (if any) each band's labels;
    `passed` hears the bottom row of each band handed over. The next bands' masks are made on `threads`
    threads while a band is drawn."""
    window = MaskWindow(height)

    def with_pixels() -> Iterator[tuple[int, StoredBand, np.ndarray]]:
        """Each band with the input's rows it will draw, read in order as the bands are (off this thread)."""
        for index, band in enumerate(score.labels.stored.read()):
            top, (count, _) = band[0], band[1]
            first, stop = window.ready(top), window.ready(top + count)
            yield index, band, rows(first, stop - first) if stop > first else np.zeros((0, width, 3), np.uint8)

    cell_code = cell_codes(score.counted, score.counted & score.is_positive)  # once per pass, not per band
    made = ordered_map(lambda item: _band_cells(score, cell_code, *item, tracer, cell_data is not None),
                       with_pixels(), threads)
    with contextlib.closing(made):  # a failure here stops the band threads and the read-ahead at once
        for band in made:
            if band.traced is not None:
                tracer.hand_over(band.traced)
            if cell_data is not None:
                cell_data.add(band.top, *band.labels)
            passed(band.top + len(band.masks[0]))
            window.add(band.masks, lambda first, stop: _draw(window, band.pixels, score, first, stop, width, sink))


def _draw(window: MaskWindow, pixels: np.ndarray, score: SlideScore, first: int, stop: int, width: int,
          sink: OverlaySink) -> None:
    """Rows [first, stop) (the input's `pixels`) from the window, which holds at least `OUTLINE_REACH` rows
    beyond them on each side, or the slide's edge."""
    if len(pixels) != stop - first:
        raise ImageError(f"the overlay pass read {len(pixels)} input rows to draw rows {first}-{stop}")
    background, codes = window.masks
    low, high = np.searchsorted(score.seeds, [window.top * width, window.bottom * width])
    border = outline(background, codes, score.seeds[low:high] - window.top * width, score.seeds_positive[low:high])
    keep = slice(first - window.top, stop - window.top)
    overlaid, refined = paint(pixels, border[keep], codes[keep])
    sink(first, overlaid, refined)
