"""Re-scoring a whole slide from its cell data alone (DeepLIIF 1.2.7's `cells_to_final_results`), band by
band, equal to re-scoring the same pixels as one image.

The scoring needs only the cells. The images need which pixels no boundary encloses (4-connected to the
slide's border), a slide-wide question answered as slide scoring answers it: pass one labels each
full-width band's pixels that no boundary covers and joins labels across band edges (`border_components`);
pass two fills each band (row by row, so exactly) and draws its outlines from a window of its rows plus
`OUTLINE_REACH` rows of halo each side, keeping only the band's own rows. The boundaries are held as their
pixels sorted by row (`BoundaryPixels`), so no image of the slide is ever held.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from .overlays import cell_codes
from .rescore import BoundaryPixels, RescoredCells, outline_and_paint, positive_pixels
from .slide_overlays import MaskWindow, OverlaySink
from .label_stats import background_of, border_components
from .slide_scoring import band_rows, unknown_labels
from .workers import ordered_map

Rows = Callable[[int, int], np.ndarray]  # (top, count) -> the input slide's rows (RGB)


def draw_rescored_slide(rescored: RescoredCells, width: int, height: int, rows: Rows, sink: OverlaySink,
                        threads: int = 1, band_height: int | None = None) -> None:
    """Hands `sink` the SegOverlaid and SegRefined rows of the whole slide, top to bottom. `band_height`:
    rows per band (default: about 4 megapixels)."""
    boundaries = BoundaryPixels(rescored.counted, rescored.positive, width, height)
    step = band_height or band_rows(width)
    bands = [(top, min(step, height - top)) for top in range(0, height, step)]

    def labelled(band: tuple[int, int]) -> tuple[int, np.ndarray, int]:
        return (band[0], *unknown_labels(boundaries.rows(*band) == 0))

    firsts, is_background = border_components(bands, height, labelled, threads)

    def masks(item: tuple[int, tuple[int, int]]) -> list[np.ndarray]:
        index, band = item
        drawn = boundaries.rows(*band)
        background = background_of(unknown_labels(drawn == 0), firsts[index], is_background)
        return [background, cell_codes(~background, positive_pixels(drawn, background))]

    window = MaskWindow(height)

    def draw(first: int, stop: int) -> None:
        background, codes = window.masks
        overlaid, refined = outline_and_paint(rows(window.top, window.bottom - window.top), background, codes)
        keep = slice(first - window.top, stop - window.top)
        sink(first, overlaid[keep], refined[keep])

    with contextlib.closing(ordered_map(masks, enumerate(bands), threads)) as made:
        for band_masks in made:
            window.add(band_masks, draw)
