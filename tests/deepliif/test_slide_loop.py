"""Slides through the one tile loop: the same rows whatever the strategy and batch size, batches that span
tile rows, rows handed over in order, and a failure that stops every stage."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from deepliif.contract import OUTPUT_NAMES
from deepliif.slide_loop import run_slide
from deepliif.slides import Slide, SlideInfo
from deepliif.tile_loop import Strategy

from .test_slides import glass_with_tissue


class ArraySlide(Slide):
    """An in-memory slide: level 0 is the array."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.info = SlideInfo(None, "array", image.shape[1], image.shape[0], ((image.shape[1], image.shape[0]),),
                              None, None)

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self.image[y: y + height, x: x + width].copy()

    def close(self) -> None:
        pass


def echo(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A network stand-in: every output is the input tile, made a little different per output."""
    return {name: batch // (k + 1) for k, name in enumerate(OUTPUT_NAMES)}


def collected(strategy: Strategy, batch_size: int, run=echo):
    slide = ArraySlide(glass_with_tissue())
    rows, tops, positions, calls = {n: [] for n in OUTPUT_NAMES}, [], [], []

    def sink(top: int, band: dict[str, np.ndarray]) -> None:
        tops.append(top)
        for name in OUTPUT_NAMES:
            rows[name].append(band[name].copy())  # the rows are views of a buffer the loop reuses

    def counted(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        return run(batch)
    record = run_slide(counted, slide, 256, batch_size, sink, row_done=positions.append, strategy=strategy)
    return {n: np.concatenate(r) for n, r in rows.items()}, tops, positions, calls, record


def test_strategies_and_batch_sizes_give_the_same_rows_and_batches_span_tile_rows() -> None:
    serial, tops, positions, calls, record = collected(Strategy.SERIAL, 1)
    threaded, tops_t, positions_t, calls_t, record_t = collected(Strategy.THREADED, 5)
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(serial[name], threaded[name], err_msg=name)
        assert serial[name].shape == (1300, 1500, 3)
    assert tops == tops_t == sorted(tops) and tops[0] == 0  # handed over top to bottom
    assert positions == positions_t and positions[-1].rows_done == 1300 and positions[-1].tiles_done == record.tiles
    assert sum(calls) == sum(calls_t) == record.tiles - record.empty_tiles > 0
    assert max(calls_t) == 5 and len(calls_t) == -(-sum(calls_t) // 5)  # only the last batch is short: rows span
    assert record_t.empty_tiles == record.empty_tiles > 0


def test_a_network_failure_mid_slide_stops_every_stage() -> None:
    failures = []

    def broken(batch: np.ndarray) -> dict[str, np.ndarray]:
        failures.append(len(batch))
        if len(failures) == 3:
            raise RuntimeError("device lost")
        return echo(batch)

    with pytest.raises(RuntimeError, match="device lost"):
        collected(Strategy.THREADED, 2, broken)
    assert not [t.name for t in threading.enumerate() if t.name in ("tile-split", "tile-merge")]
