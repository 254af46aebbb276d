"""SegOverlaid and SegRefined of a whole slide, drawn band by band, equal to `postprocess` of the same pixels.

A pixel's outline depends only on pixels at most `OUTLINE_REACH` rows away (see `overlays.outline`),
so each band is drawn from a window of its rows plus that many rows of halo on each side, and only the
band's own rows are kept. Which cell each pixel belongs to, and whether that cell is counted and positive,
comes from the slide's scoring (`SlideScore`): labels are made again band by band exactly as scoring made
them, so no label image of the slide is ever held.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .cell_outlines import OutlineTracer
from .overlays import NONE, OUTLINE_REACH, cell_codes, outline, paint
from .slide_cell_data import SlideCellData
from .slide_scoring import Band, Bands, SlideScore
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
        ready = self.height if self.bottom >= self.height else self.bottom - OUTLINE_REACH
        if ready > self.drawn:
            draw(self.drawn, ready)
            self.drawn = ready
            self.drop_above(ready - OUTLINE_REACH)

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
    """One band's masks (background, the counted cells' codes); with owners, the id
    of the counted cell each pixel is in (0: none); with labels, the band's own labels and their cells."""
    top: int
    masks: list[np.ndarray]
    owner: np.ndarray | None
    labels: tuple[np.ndarray, np.ndarray] | None


def _band_cells(score: SlideScore, index: int, band: Band, owners: bool, labelled: bool) -> _BandCells:
    labels, cell_of = score.labels.band_labels(index, band.seg)
    cell = cell_of[labels]
    in_cell = cell >= 0
    codes = np.zeros(cell.shape, np.uint8)
    codes[in_cell] = cell_codes(score.counted, score.counted & score.is_positive)[cell[in_cell]]
    owner = None
    if owners:
        owner = np.zeros(cell.shape, np.int32)
        in_counted = codes != NONE
        owner[in_counted] = score.counted_ids[cell[in_counted]]
    return _BandCells(band.top, [~in_cell, codes], owner, (labels, cell_of) if labelled else None)


def draw_slide(bands: Bands, rows: Rows, score: SlideScore, width: int, height: int, sink: OverlaySink,
               threads: int = 1, tracer: OutlineTracer | None = None, cell_data: SlideCellData | None = None) -> None:
    """Hands `sink` the SegOverlaid and SegRefined rows of the whole slide, top to bottom, band by band,
    `tracer` (if any) each band's counted cells and `cell_data` (if any) each band's labels. `bands` must
    be the bands the slide was scored with. The next bands' masks are made on `threads` threads while a
    band is drawn."""
    window = MaskWindow(height)
    made = ordered_map(lambda item: _band_cells(score, item[0], item[1], tracer is not None, cell_data is not None),
                       enumerate(bands()), threads)
    for band in made:
        if tracer is not None:
            tracer.add(band.top, band.owner)
        if cell_data is not None:
            cell_data.add(band.top, *band.labels)
        window.add(band.masks, lambda first, stop: _draw(window, rows, score, first, stop, width, sink))


def _draw(window: MaskWindow, rows: Rows, score: SlideScore, first: int, stop: int, width: int,
          sink: OverlaySink) -> None:
    """Rows [first, stop) from the window, which holds at least `OUTLINE_REACH` rows beyond them on each
    side, or the slide's edge."""
    background, codes = window.masks
    low, high = np.searchsorted(score.seeds, [window.top * width, window.bottom * width])
    border = outline(background, codes, score.seeds[low:high] - window.top * width, score.seeds_positive[low:high])
    keep = slice(first - window.top, stop - window.top)
    overlaid, refined = paint(rows(first, stop - first), border[keep], codes[keep])
    sink(first, overlaid, refined)
