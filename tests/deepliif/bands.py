"""In-memory images as the row bands the slide scoring reads (tests only: slides stream their bands)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from deepliif.slide_scoring import Band, Bands


def array_bands(seg: np.ndarray, marker: np.ndarray | None, rows: int) -> Bands:
    def bands() -> Iterator[Band]:
        for top in range(0, seg.shape[0], rows):
            yield top, seg[top: top + rows], None if marker is None else marker[top: top + rows]
    return bands
