"""Several images through one backend, with tiling and stitching overlapping the backend calls.

A producer thread cuts tiles (mirror extension, empty-tile test, resize) from every image in turn; the
calling thread batches non-empty tiles across image boundaries (EDI hands the kernel several requests
per call) and runs the backend; a stitching thread resizes results back, pastes them in DeepLIIF's tile
order and postprocesses each image as soon as its last tile lands. numpy, PIL and the backends release
the GIL in their heavy parts, so the three overlap. Results equal `deepliif.inference.infer_image`.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from deepliif.inference import (InferenceOptions, InferenceResult, OrderedPaster, check_image_array, finish_image,
                                start_image)
from deepliif.contract import NETWORK_TILE, OUTPUT_NAMES
from deepliif.tiling import Tile, TileGrid, is_empty_tile, resize_tile

Run = Callable[[np.ndarray], dict[str, np.ndarray]]
_DONE = object()


@dataclass
class _ImageState:
    original: np.ndarray
    extended: np.ndarray
    grid: TileGrid
    paster: OrderedPaster
    remaining: int
    start: float
    empty: int = 0
    result: InferenceResult | None = None


@dataclass
class StageTimes:
    """Seconds spent in each stage, summed over the call (stages overlap, so they add up to more than
    the wall time when the overlap works)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("tiling", "inference", "stitching", "postprocess"), 0.0))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, since: float) -> None:
        with self.lock:
            self.seconds[stage] += time.perf_counter() - since


def infer_images(run: Run, images: Sequence[np.ndarray], options: InferenceOptions,
                 progress: Callable[[int], None] | None = None) -> list[InferenceResult]:
    for image in images:
        check_image_array(image)
    times = StageTimes()
    states = [_new_state(image, options.tile_size, progress) for image in images]
    tiles: queue.Queue = queue.Queue(maxsize=4 * options.batch_size)
    producer = threading.Thread(target=_produce, args=(states, options.tile_size, tiles, times), daemon=True)
    producer.start()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stitch") as stitcher:
        futures = []

        def stitch(items: list, outputs: dict[str, np.ndarray] | None) -> None:
            futures.append(stitcher.submit(_stitch, states, items, outputs, options, times))

        pending: list = []
        while (item := tiles.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            if item[2] is None:
                stitch([item], None)
                continue
            pending.append(item)
            if len(pending) == options.batch_size:
                stitch(pending, _run_batch(run, pending, times))
                pending = []
        if pending:
            stitch(pending, _run_batch(run, pending, times))
        for future in futures:
            future.result()  # re-raises a stitching error here
    stages = {f"{stage}_seconds": s for stage, s in times.seconds.items() if stage != "postprocess"}
    for state in states:  # stage sums of the whole call: one image's own figures when called with one
        state.result.timings.update(stages)
    return [state.result for state in states]


def _new_state(image: np.ndarray, tile_size: int, progress) -> _ImageState:
    extended, grid, paster = start_image(image, tile_size, progress)
    return _ImageState(image, extended, grid, paster, len(grid), time.perf_counter())


def _produce(states: list[_ImageState], tile_size: int, out: queue.Queue, times: StageTimes) -> None:
    try:
        for index, state in enumerate(states):
            for tile in state.grid:
                start = time.perf_counter()
                crop = state.grid.crop(state.extended, tile)
                network_tile = None if is_empty_tile(crop) else resize_tile(crop, NETWORK_TILE)
                times.add("tiling", start)
                out.put((index, tile, network_tile))
        out.put(_DONE)
    except BaseException as exc:  # handed to the consumer, which re-raises it in the caller's thread
        out.put(exc)


def _run_batch(run: Run, pending: list, times: StageTimes) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    outputs = run(np.stack([network_tile for _, _, network_tile in pending]))
    times.add("inference", start)
    return outputs


def _stitch(states: list[_ImageState], items: list[tuple[int, Tile, np.ndarray | None]],
            outputs: dict[str, np.ndarray] | None, options: InferenceOptions, times: StageTimes) -> None:
    for position, (index, tile, _) in enumerate(items):
        start = time.perf_counter()
        state = states[index]
        results = None if outputs is None else \
            {name: resize_tile(outputs[name][position], options.tile_size) for name in OUTPUT_NAMES}
        state.paster.add(tile, results)
        state.empty += results is None
        state.remaining -= 1
        times.add("stitching", start)
        if state.remaining == 0:
            _finish(state, options, times)


def _finish(state: _ImageState, options: InferenceOptions, times: StageTimes) -> None:
    start = time.perf_counter()
    images, scoring = finish_image(state.original, state.paster.stitcher.results(), options)
    times.add("postprocess", start)
    state.result = InferenceResult(
        images=images, scoring=scoring,
        timings={"total_seconds": time.perf_counter() - state.start,
                 "postprocess_seconds": time.perf_counter() - start},
        tiles=len(state.grid), empty_tiles=state.empty)
