"""A stand-in for the network that hands back real DeepLIIF outputs, for benchmarks of the CPU stages.

On the kernel's GPU the network is no longer the cost; what is around it (decoding, tiling, stitching,
postprocessing, encoding, pyramids) is. `ReplaySession` behaves as an `engine.Session` to `infer`'s own
code: its `run` answers each tile of a batch with the next folder of a replay directory (one folder per
tile holding `Hema.png DAPI.png Lap2.png Marker.png Seg.png`, 512², cycled in sorted order), optionally
paced to a chosen tiles-per-second as a GPU would deliver them. It only benchmarks: `auto` never picks it
and it is not a `BackendKind`.
"""
from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np

from deepliif.contract import NETWORK_TILE, OUTPUT_NAMES, check_tile_batch
from deepliif.errors import ArgumentError
from deepliif.imageio import read_image
from deepliif.inference import ImageSink, InferenceOptions, InferenceResult, infer_images

from .backends import BackendInfo
from .backends.precision import Precision


def read_replay(directory: Path) -> list[dict[str, np.ndarray]]:
    """Every tile folder of a replay directory, in sorted order, checked for the five 512² outputs."""
    folders = sorted(p for p in Path(directory).iterdir() if p.is_dir()) if Path(directory).is_dir() else []
    if not folders:
        raise ArgumentError(f"--replay {directory}: expected a folder of tile folders, each with "
                            f"{', '.join(f'{n}.png' for n in OUTPUT_NAMES)}")
    tiles = []
    for folder in folders:
        missing = [name for name in OUTPUT_NAMES if not (folder / f"{name}.png").is_file()]
        if missing:
            raise ArgumentError(f"--replay {folder}: missing {', '.join(f'{n}.png' for n in missing)}")
        tile = {name: read_image(folder / f"{name}.png") for name in OUTPUT_NAMES}
        if any(image.shape != (NETWORK_TILE, NETWORK_TILE, 3) for image in tile.values()):
            raise ArgumentError(f"--replay {folder}: outputs must be {NETWORK_TILE}x{NETWORK_TILE} RGB")
        tiles.append(tile)
    return tiles


class _ModelFiles:
    """What `infer` records of the model: here, where the replayed outputs came from."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def describe(self) -> str:
        return f"{self.directory}: replayed DeepLIIF outputs (no network)"


class ReplaySession:
    """Answers tile batches with replayed outputs; `busy_seconds` is the time its `run` was busy (the
    stand-in's 'GPU time'), `tiles` how many it answered. `tiles_per_second` paces it: each batch takes
    at least `len(batch) / tiles_per_second` seconds from its start, as a GPU that fast would."""

    def __init__(self, replay: Path, tiles_per_second: float | None = None, batch_size: int = 8) -> None:
        if tiles_per_second is not None and tiles_per_second <= 0:
            raise ArgumentError(f"--network-tiles-per-s must be positive; got {tiles_per_second}")
        self.replayed = read_replay(replay)
        self.tiles_per_second = tiles_per_second
        self.batch_size = batch_size
        self.files = _ModelFiles(replay)
        self.startup: dict[str, float] = {}
        self.info = BackendInfo("replay", "cpu", Precision.FP32, None,
                                f"paced to {tiles_per_second} tiles/s" if tiles_per_second else "unpaced")
        self.busy_seconds, self.tiles = 0.0, 0
        self._next = itertools.cycle(range(len(self.replayed)))
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        check_tile_batch(batch)
        start = time.perf_counter()
        with self._lock:
            picks = [self.replayed[next(self._next)] for _ in range(len(batch))]
        outputs = {name: np.stack([tile[name] for tile in picks]) for name in OUTPUT_NAMES}
        if self.tiles_per_second:
            remaining = len(batch) / self.tiles_per_second - (time.perf_counter() - start)
            if remaining > 0:
                time.sleep(remaining)
        with self._lock:
            self.busy_seconds += time.perf_counter() - start
            self.tiles += len(batch)
        return outputs

    def infer_many(self, images, options: InferenceOptions | None = None, progress=None, run=None,
                   sink: ImageSink | None = None) -> list[InferenceResult]:
        options = options or InferenceOptions(batch_size=self.batch_size)
        return infer_images(run or self.run, images, options, progress=progress, sink=sink)

    def close(self) -> None:
        """Nothing to release; here so the stand-in is used as a Session is."""

    def __enter__(self) -> ReplaySession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
