"""The one tile loop, for images and whole slides: tiles cut in DeepLIIF's grid, non-empty ones batched
through a backend's `run`, results pasted back in DeepLIIF's tile order.

Shaped like MONAI's `PatchInferer(splitter, merger)`: `run_tiles` takes a splitter (an iterator of tiles
with their network-size crops) and a `Merger` (what `add` does with each batch's results). Images use
`split` and `ImageMerger` (mirror extension, whole-image stitching, finish an image when its last tile
lands); slides use `slide_loop`'s row-band splitter and band merger. A `Strategy` says how the three
stages run: `SERIAL` in the caller's thread (the accuracy gate, reference runs), `THREADED` with splitting,
merging and finishing (postprocessing) on threads of their own so they overlap the backend calls and each
other: the tiles of the next images are stitched, and the network kept fed, while an image is postprocessed
(serving: numpy, PIL and the backends release the GIL in their heavy parts). Both give the same pixels,
whatever the batch size, because the networks normalise per sample and tiles are pasted in DeepLIIF's order.
"""
from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from .contract import NETWORK_TILE, OUTPUT_NAMES
from .tiling import Stitcher, Tile, TileGrid, extend_by_mirroring, is_empty_grey, is_empty_tile, resize_tile

Run = Callable[[np.ndarray], dict[str, np.ndarray]]
Result = TypeVar("Result")
Item = tuple[int, Tile, "np.ndarray | None"]  # image index, tile, network tile (None: empty)
# (image index, views of its network outputs at its size, how many rows of them are final): heard after each
# tile row is pasted, so finished rows can be encoded while the network runs the rest; the last call says all.
RowsFinal = Callable[[int, dict[str, np.ndarray], int], None]
_DONE = object()


class Strategy(enum.Enum):
    SERIAL = "serial"
    THREADED = "threaded"


@dataclass
class TileTimings:
    """Seconds per stage, summed over the call (with `THREADED` the stages overlap, so they add up to
    more than the wall time when the overlap works)."""

    tiling: float = 0.0
    inference: float = 0.0
    stitching: float = 0.0
    postprocess: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, stage: str, since: float) -> None:
        with self._lock:
            setattr(self, stage, getattr(self, stage) + time.perf_counter() - since)

    def as_dict(self) -> dict[str, float]:
        return {f"{stage}_seconds": getattr(self, stage) for stage in ("tiling", "inference", "stitching",
                                                                          "postprocess")}


@dataclass
class StitchedImage:
    """One image's five network outputs at its own size, and how many of its tiles there were."""

    index: int
    images: dict[str, np.ndarray]
    tiles: int
    empty: int
    started: float


class _ImageState:
    def __init__(self, image: np.ndarray, tile_size: int, names: Sequence[str] = OUTPUT_NAMES) -> None:
        height, width = image.shape[:2]
        self.extended = extend_by_mirroring(image, tile_size)
        self.grid = TileGrid(self.extended.shape[1], self.extended.shape[0], tile_size)
        self.names = tuple(names)
        self.stitcher = Stitcher(self.grid, self.names, (width, height))
        self.ready: dict[int, tuple[Tile, dict[str, np.ndarray] | None]] = {}
        self.next_index = 0
        self.empty = 0
        self.started = time.perf_counter()


def network_tile(crop: np.ndarray, grey: np.ndarray | None = None) -> np.ndarray | None:
    """A tile's crop at the network's size, or None for an empty tile (DeepLIIF does not run it); `grey`:
    the crop's `grey_of`, where it was made for a whole band at once."""
    empty = is_empty_tile(crop) if grey is None else is_empty_grey(grey)
    return None if empty else resize_tile(crop, NETWORK_TILE)


def split(states: Sequence[_ImageState], timings: TileTimings) -> Iterator[Item]:
    """Every tile of every image in turn, with its network-size crop (None for an empty tile)."""
    for index, state in enumerate(states):
        for tile in state.grid:
            start = time.perf_counter()
            item = index, tile, network_tile(state.grid.crop(state.extended, tile))
            timings.add("tiling", start)
            yield item


class Merger(Protocol):
    """Where a batch's results go: `outputs[name][k]` belongs to `items[k]`; `outputs` is None for a run
    of empty tiles, which the network never sees."""

    def add(self, items: Sequence[Item], outputs: dict[str, np.ndarray] | None) -> None: ...


class ImageMerger(Generic[Result]):
    """Pastes results strictly in tile order however batches complete (DeepLIIF's overwrite order) and
    finishes each image as soon as its last tile is pasted: on `finishing` (a one-thread executor) when
    given, so the tiles of the next images are stitched, and the network kept fed, while an image is
    postprocessed; at most `FINISH_BACKLOG` more stitched images wait for it before stitching waits too."""

    def __init__(self, states: Sequence[_ImageState], tile_size: int, timings: TileTimings,
                 finish: Callable[[StitchedImage], Result], progress: Callable[[int], None] | None,
                 rows_final: RowsFinal | None = None, finishing: Executor | None = None) -> None:
        self.states, self.tile_size, self.timings = states, tile_size, timings
        self.finish, self.progress, self.rows_final = finish, progress, rows_final
        self.finishing = finishing
        self.results: list[Future] = []

    def add(self, items: Sequence[Item], outputs: dict[str, np.ndarray] | None) -> None:
        self._raise_failed()
        for position, (index, tile, _) in enumerate(items):
            start = time.perf_counter()
            state = self.states[index]
            results = None if outputs is None else \
                {name: resize_tile(outputs[name][position], self.tile_size) for name in state.names}
            state.ready[tile.index] = (tile, results)
            self._paste_ready(index, state)
            self.timings.add("stitching", start)
            if state.next_index == len(state.grid):
                self._finish(index, state)

    def collect(self) -> list[Result]:
        """Every image's result, in order, once all are finished (the first failure is raised)."""
        return [future.result() for future in self.results]

    def cancel(self) -> None:
        """Drop the images not yet being finished (the loop failed)."""
        for future in self.results:
            future.cancel()

    def _paste_ready(self, index: int, state: _ImageState) -> None:
        while state.next_index in state.ready:
            tile, results = state.ready.pop(state.next_index)
            if results is None:
                state.stitcher.paste_empty(tile)
                state.empty += 1
            else:
                state.stitcher.paste(tile, results)
            state.next_index += 1
            if self.progress:
                self.progress(1)
            final = state.grid.rows_final_after(tile)
            if final is not None and self.rows_final is not None:
                self.rows_final(index, state.stitcher.cropped(), min(final, state.stitcher.original_height))

    def _finish(self, index: int, state: _ImageState) -> None:
        stitched = StitchedImage(index, state.stitcher.results(), len(state.grid), state.empty, state.started)
        if self.finishing is None:
            future: Future = Future()
            future.set_result(self._timed_finish(stitched))
        else:
            waiting = [f for f in self.results if not f.done()]
            if len(waiting) > FINISH_BACKLOG:  # stitching waits: memory stays bounded
                waiting[0].result()
            future = self.finishing.submit(self._timed_finish, stitched)
        self.results.append(future)

    def _timed_finish(self, stitched: StitchedImage) -> Result:
        start = time.perf_counter()
        try:
            return self.finish(stitched)
        finally:
            self.timings.add("postprocess", start)

    def _raise_failed(self) -> None:
        """An image's postprocessing failed: stop the loop with its error."""
        for future in self.results:
            if future.done() and future.exception() is not None:
                raise future.exception()


FINISH_BACKLOG = 1  # stitched images that may wait for postprocessing while later tiles are stitched


def run_tile_loop(run: Run, images: Sequence[np.ndarray], tile_size: int, batch_size: int,
                  finish: Callable[[StitchedImage], Result], strategy: Strategy = Strategy.THREADED,
                  progress: Callable[[int], None] | None = None,
                  names: Sequence[Sequence[str]] | None = None,
                  rows_final: RowsFinal | None = None) -> tuple[list[Result], TileTimings]:
    """`finish(stitched)` for every image, in order, and the stage timings of the whole call. `batch_size`
    is the number of tiles per `run` call; tiles of several images share a batch. `names[k]`: the outputs
    stitched for image k (default: the fused graph's five); `run` must give at least those. `rows_final`
    hears each image's rows as they become final, the last time before its `finish`."""
    timings = TileTimings()
    states = [_ImageState(image, tile_size, OUTPUT_NAMES if names is None else names[k])
              for k, image in enumerate(images)]
    threaded = strategy is Strategy.THREADED
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-finish") if threaded else \
            contextlib.nullcontext() as finishing:
        merger = ImageMerger(states, tile_size, timings, finish, progress, rows_final, finishing)
        try:
            run_tiles(run, split(states, timings), merger, batch_size, timings, strategy)
            results = merger.collect()
        except BaseException:
            merger.cancel()
            raise
    return results, timings


def run_tiles(run: Run, items: Iterator[Item], merger: Merger, batch_size: int, timings: TileTimings,
              strategy: Strategy = Strategy.THREADED) -> None:
    """Every item from the splitter `items` through `run` in batches of `batch_size` non-empty tiles, and
    each batch's results into `merger`."""
    loop = _serial if strategy is Strategy.SERIAL else _threaded
    loop(run, items, merger, batch_size, timings)


def run_batch(run: Run, pending: list[Item], timings: TileTimings) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    outputs = run(np.stack([network_tile for _, _, network_tile in pending]))
    timings.add("inference", start)
    return outputs


def batches(items: Iterator[Item], batch_size: int) -> Iterator[tuple[list[Item], bool]]:
    """Runs of items to hand on together: (empty tiles, False) at once, (non-empty tiles, True) per batch."""
    pending: list[Item] = []
    for item in items:
        if item[2] is None:
            yield [item], False
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield pending, True
            pending = []
    if pending:
        yield pending, True


def _serial(run: Run, items: Iterator[Item], merger: Merger, batch_size: int, timings: TileTimings) -> None:
    for group, to_run in batches(items, batch_size):
        merger.add(group, run_batch(run, group, timings) if to_run else None)


def _threaded(run: Run, items: Iterator[Item], merger: Merger, batch_size: int, timings: TileTimings) -> None:
    """Splitting, the network (this thread) and stitching overlap, with bounded hand-offs: at most
    `4 * batch_size` tiles wait for the network and `STITCH_BACKLOG` batches of outputs for stitching, so
    memory does not grow when one stage outruns another. A failure in any stage stops the others; every
    thread has ended, and dropped what it held, before this returns or raises."""
    stop = threading.Event()
    tiles: queue.Queue = queue.Queue(maxsize=4 * batch_size)
    outputs: queue.Queue = queue.Queue(maxsize=STITCH_BACKLOG)
    failure: list[BaseException] = []
    splitter = threading.Thread(target=_produce, args=(items, tiles, stop), daemon=True, name="tile-split")
    stitcher = threading.Thread(target=_stitch, args=(outputs, merger, stop, failure), daemon=True,
                                name="tile-merge")
    splitter.start()
    stitcher.start()
    try:
        for group, to_run in batches(_drain(tiles, stop), batch_size):
            if not _put(outputs, (group, run_batch(run, group, timings) if to_run else None), stop):
                break  # stitching failed: its error is raised below
        _put(outputs, _DONE, stop)
    except BaseException:
        stop.set()
        raise
    finally:
        stitcher.join()
        stop.set()  # releases a splitter blocked on a full queue
        splitter.join()
    if failure:
        raise failure[0]


STITCH_BACKLOG = 2  # batches of network outputs that may wait for stitching
_POLL_SECONDS = 0.05


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put, waiting for room unless `stop` is set; False when it was."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _get(source: queue.Queue, stop: threading.Event) -> object:
    """The next item, or _DONE once `stop` is set."""
    while not stop.is_set():
        try:
            return source.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            continue
    return _DONE


def _produce(items: Iterator[Item], out: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            if not _put(out, item, stop):
                return
        _put(out, _DONE, stop)
    except BaseException as exc:  # handed to the consumer, which re-raises it in the caller's thread
        _put(out, exc, stop)


def _drain(tiles: queue.Queue, stop: threading.Event) -> Iterator[Item]:
    while (item := _get(tiles, stop)) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        yield item  # type: ignore[misc]


def _stitch(outputs: queue.Queue, merger: Merger, stop: threading.Event, failure: list[BaseException]) -> None:
    try:
        while (item := _get(outputs, stop)) is not _DONE:
            merger.add(*item)  # type: ignore[misc]
    except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
        failure.append(exc)
        stop.set()
