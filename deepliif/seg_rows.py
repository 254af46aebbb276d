"""A Seg labelled band by band while the tile loop stitches it."""
from __future__ import annotations

import numpy as np

from .label_stats import components, four_connected
from .postprocessing import LabelledSeg, background_of_bands, classify_pixels, label_cells


class SegRows:
    """A Seg's pixels classified, and its unknown pixels labelled (4-connected), band by band as the tile
    loop makes its rows final, so that of DeepLIIF's labelling only the join across bands, the background
    look-up and the cells' 8-connected labelling are left once the last tile is pasted. Any full-width
    banding joins to the same background, so `labelled` equals `label_cells` on the whole Seg."""

    def __init__(self, seg_thresh: int) -> None:
        self.seg_thresh = seg_thresh
        self._positive: np.ndarray | None = None
        self._negative: np.ndarray | None = None
        self._bands: list[tuple[int, np.ndarray, int]] = []
        self._done = 0

    def rows_final(self, seg: np.ndarray, final: int) -> None:
        """Rows above `final` of `seg` (the whole image's Seg, being stitched) will not change."""
        if final <= self._done:
            return
        if self._positive is None:
            self._positive, self._negative = (np.empty(seg.shape[:2], bool) for _ in range(2))
        rows = slice(self._done, final)
        self._positive[rows], self._negative[rows] = classify_pixels(seg[rows], self.seg_thresh)
        self._bands.append((self._done, *four_connected(~(self._positive[rows] | self._negative[rows]))))
        self._done = final

    def labelled(self, seg: np.ndarray, threads: int = 1) -> LabelledSeg:
        """`label_cells(seg, seg_thresh)`, from the bands made so far and the rows left."""
        self.rows_final(seg, len(seg))
        if self._positive is None:  # an image without rows
            return label_cells(seg, self.seg_thresh, threads)
        background = background_of_bands(self._bands, seg.shape, threads)
        return LabelledSeg(self._positive, self._negative, background, components(~background, threads),
                           self.seg_thresh)
