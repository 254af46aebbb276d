"""Pass one of scoring made from the Seg's rows as the tile loop hands them over."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from deepliif import slide_scoring
from deepliif.errors import ImageError
from deepliif.scoring_rules import PostprocessOptions
from deepliif.slide_background import StreamedBackground
from deepliif.slide_scoring import background_labels, score_slide

from .bands import array_bands


def cells_and_holes(height: int = 90, width: int = 50) -> np.ndarray:
    """Cells with holes (not background) and unknown pixels joined to the border only through band edges."""
    rng = np.random.default_rng(7)
    seg = np.zeros((height, width, 3), np.uint8)
    seg[..., 0] = np.where(rng.random((height, width)) < 0.45, 255, 0)
    seg[20:40, 10:30] = (255, 0, 0)
    seg[25:35, 15:25] = 0  # a hole: unknown, not touching the border
    return seg


def no_pass_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith(("background-pass", "read-ahead", "cpu-stage"))]


@pytest.mark.parametrize("chunks, threads", [((7, 13, 1, 30, 39), 1), ((45, 45), 2), ((90,), 3)])
def test_rows_handed_over_in_any_chunks_give_pass_ones_result(monkeypatch: pytest.MonkeyPatch,
                                                               chunks: tuple[int, ...], threads: int) -> None:
    """Bands of 16 rows, whatever the chunks the rows come in, and rows handed over twice (a resumed run)
    are skipped: the same first ids and verdicts as pass one over the bands, and the same score."""
    monkeypatch.setattr(slide_scoring, "BAND_PIXELS", 16 * 50)
    seg = cells_and_holes()
    bands = array_bands(seg, None, 16)
    expected = background_labels(bands, 90, 120, 1)
    streamed = StreamedBackground(50, 90, 120, threads)
    top = 0
    for count in chunks:
        streamed.add(max(0, top - 3), seg[max(0, top - 3): top + count])  # three rows again each time
        top += count
    firsts, verdicts = streamed.finish()
    assert firsts == expected[0]
    np.testing.assert_array_equal(verdicts, expected[1])
    assert verdicts.any() and not verdicts.all()
    options = PostprocessOptions(size_thresh=0)
    assert score_slide(bands, 50, 90, 512, False, options, 2, (firsts, verdicts)).scoring == \
        score_slide(bands, 50, 90, 512, False, options, 2).scoring
    assert no_pass_threads()


def test_missing_rows_are_refused_and_an_abandoned_pass_leaves_no_thread() -> None:
    seg = cells_and_holes()
    streamed = StreamedBackground(50, 90, 120, 2)
    streamed.add(0, seg[:30])
    with pytest.raises(ImageError, match="rows from 40 but has only 30"):
        streamed.add(40, seg[40:])
    with pytest.raises(ImageError, match="30 of the Seg's 90 rows"):
        streamed.finish()
    assert no_pass_threads()
    abandoned = StreamedBackground(50, 90, 120, 2)
    abandoned.add(0, seg[:50])
    abandoned.abandon()
    assert no_pass_threads()
