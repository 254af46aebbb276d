"""`infer` on image files as a pipeline: read ahead, tile loop, encode while postprocessing, publish.

The stages overlap so the network is never the one waiting:
- the next image is decoded on a reader thread while the current one is in the tile loop (one ahead);
- each image's network outputs are handed to the encoder pool band by band as the tile loop makes their
  rows final, so they are encoded while the network runs the later tiles and while its cells are found and
  its overlays drawn; the overlays and the cells files follow; every PNG is encoded in row bands, each a
  task of its own, so one image spreads over the pool;
- an image's `<stem>.json` is written last, after every file of that image is published (by rename), and
  only after the next image has gone through the tile loop, so at most two images' outputs are held.
Outputs that were not asked for are neither drawn nor encoded. A failure anywhere stops the run: pools
are shut down after their running tasks end, and the image without its JSON is the one that failed.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from deepliif.cell_data import cell_data_file_name, write_cell_data
from deepliif.cells import cells_file_names, write_cells
from deepliif.contract import OUTPUT_NAMES
from deepliif.imageio import DEFAULT_MAX_PIXELS, prepare_out_dir, read_image, write_atomically, write_json
from deepliif.inference import InferenceOptions, InferenceResult
from deepliif.logs import project_logger
from deepliif.png_bands import BandedPng, band_edges, check_png_image
from deepliif.slides import is_slide, read_whole_slide
from deepliif.tile_loop import RowsFinal
from deepliif.workers import resolve_threads

logger = project_logger("engine")


class ImageSession(Protocol):
    """What `infer` needs of a session (an `engine.Session`, or the replay stand-in of `engine.replay`)."""

    startup: dict[str, float]

    def infer_many(self, images, options=None, progress=None, run=None,
                   stitched: RowsFinal | None = None) -> list[InferenceResult]: ...


@dataclass
class _Finishing:
    """One image whose files are being written: what its JSON will say once they all are."""

    record: dict
    path: Path
    writes: list[Future] = field(default_factory=list)


class Encoders:
    """A pool that encodes and publishes files; each task's future gives the seconds it ran."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")

    def png(self, path: Path, image: np.ndarray) -> list[Future]:
        """One PNG in row bands, each a task of its own, so a large image spreads over the pool; the task
        that compresses the last band writes the file."""
        png = banded_png(path, image)
        return [self.band(png, image[top:bottom], top) for top, bottom in band_edges(len(image))]

    def band(self, png: BandedPng, rows: np.ndarray, top: int) -> Future:
        return self.pool.submit(self._timed, lambda: png.add(rows, top))

    def call(self, function: Callable[[], object]) -> Future:
        return self.pool.submit(self._timed, function)

    def _timed(self, function: Callable[[], object]) -> float:
        """Runs one task; its seconds (the future's result)."""
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)


def banded_png(path: Path, image: np.ndarray) -> BandedPng:
    """The PNG file of an image (or of the rows it will hold) that bands are added to."""
    height, width, channels = check_png_image(image)
    return BandedPng(path, width, height, channels, write_atomically)


class StreamedPngs:
    """An image's network outputs encoded band by band as the tile loop makes their rows final (its
    `RowsFinal` hook), so they are encoded while the network runs the later tiles."""

    def __init__(self, encoders: Encoders, out: Path, stem: str, names: list[str]) -> None:
        self.encoders, self.out, self.stem, self.names = encoders, out, stem, names
        self.files: dict[str, BandedPng] = {}
        self.writes: list[Future] = []
        self.encoded = 0  # rows handed to the encoders

    def __call__(self, _index: int, outputs: dict[str, np.ndarray], final: int) -> None:
        if final <= self.encoded:
            return
        for name in self.names:
            if name not in self.files:
                self.files[name] = banded_png(self.out / f"{self.stem}_{name}.png", outputs[name])
            self.writes.append(self.encoders.band(self.files[name], outputs[name][self.encoded:final], self.encoded))
        self.encoded = final


def describe_session(session) -> dict:
    """What each image's JSON record says of the session that made it."""
    return {"model": session.files.describe(), "startup_seconds": session.startup,
            "backend": session.info.as_dict()}


def infer_image_files(session: ImageSession, images: list[Path], out: Path, options: InferenceOptions,
                      describe: dict, max_pixels: int = DEFAULT_MAX_PIXELS,
                      progress: Callable[[int], None] | None = None,
                      on_image: Callable[[Path], None] | None = None) -> list[Path]:
    """Writes `OUT/<stem>_<Name>.png` for the selected outputs, `<stem>_cells.csv/.geojson` and
    `<stem>.json` (with `describe` merged in) for each image; returns the JSON paths."""
    prepare_out_dir(out)
    threads = resolve_threads(options.threads)
    encoders = Encoders(threads)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
    written: list[Path] = []
    finishing: _Finishing | None = None
    ok = False
    try:
        upcoming = reader.submit(_decode, images[0], max_pixels) if images else None
        for index, path in enumerate(images):
            image, decode_seconds = upcoming.result()
            upcoming = reader.submit(_decode, images[index + 1], max_pixels) if index + 1 < len(images) else None
            if on_image:
                on_image(path)
            current = _infer_one(session, path, image, decode_seconds, out, options, describe, encoders, progress)
            if finishing is not None:
                written.append(_publish(finishing, encoders))
            finishing = current
        if finishing is not None:
            written.append(_publish(finishing, encoders))
        ok = True
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        encoders.close(cancel=not ok)
    return written


def _decode(path: Path, max_pixels: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    image = read_whole_slide(path, max_pixels) if is_slide(path) else read_image(path, max_pixels=max_pixels)
    return image, time.perf_counter() - start


def _infer_one(session: ImageSession, path: Path, image: np.ndarray, decode_seconds: float, out: Path,
               options: InferenceOptions, describe: dict, encoders: Encoders,
               progress: Callable[[int], None] | None) -> _Finishing:
    stem = path.stem
    network_names = [name for name in options.outputs.names if name in OUTPUT_NAMES] + list(options.intermediate_names)
    streamed = StreamedPngs(encoders, out, stem, network_names)
    (result,) = session.infer_many([image], options, progress=progress, stitched=streamed)
    writes = streamed.writes
    # the cells files first: one serial task, the longest left, so it does not queue behind the PNG bands
    cells = encoders.call(lambda: write_cells(out, stem, result.cells, outlines=result.outlines))
    for name, array in result.images.items():
        if name not in network_names:
            writes.extend(encoders.png(out / f"{stem}_{name}.png", array))
    cell_files = list(cells_file_names(stem).values())
    if result.cell_data is not None:
        writes.append(encoders.call(lambda: write_cell_data(out, stem, result.cell_data)))
        cell_files.append(cell_data_file_name(stem))
    record = {"image": str(path), **describe, "tile_size": options.tile_size, "batch_size": options.batch_size,
              "tiles": result.tiles, "empty_tiles": result.empty_tiles, "outputs": list(result.images),
              "cells": cell_files, "scoring": result.scoring,
              "timings": {"decode_seconds": decode_seconds, **result.timings}}
    logger.info("%s: %s", path.name, json.dumps(result.scoring))
    return _Finishing(record, out / f"{stem}.json", writes + [cells])


def _publish(finishing: _Finishing, encoders: Encoders) -> Path:
    """Wait for every file of one image (re-raising the first failure), then write its JSON."""
    start = time.perf_counter()
    encode_seconds = sum(write.result() for write in finishing.writes)
    finishing.record["timings"].update({"encode_seconds": encode_seconds,  # busy time, overlapping the rest
                                        "encode_wait_seconds": time.perf_counter() - start})
    write_json(finishing.path, finishing.record)
    return finishing.path
