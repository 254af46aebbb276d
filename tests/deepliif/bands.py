"""In-memory images as the row bands the slide scoring reads (tests only: slides stream their bands)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from deepliif.slide_scoring import Band, Bands


def array_bands(seg: np.ndarray, marker: np.ndarray | None, rows: int, ihc: np.ndarray | None = None) -> Bands:
    def part(image: np.ndarray | None, top: int) -> np.ndarray | None:
        return None if image is None else image[top: top + rows]

    def bands(measuring: bool = True) -> Iterator[Band]:
        for top in range(0, seg.shape[0], rows):
            yield Band(top, seg[top: top + rows], part(marker, top) if measuring else None,
                       part(ihc, top) if measuring else None)
    return bands
