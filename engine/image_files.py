"""`infer` on image files as a pipeline: read ahead, tile loop, encode while postprocessing, publish.

The stages overlap so the network is never the one waiting:
- the next image is decoded on a reader thread while the current one is in the tile loop (one ahead);
- each image's network outputs are handed to the encoder pool band by band as the tile loop makes their
  rows final, so they are encoded while the network runs the later tiles and while its cells are found and
  its overlays drawn; the overlays are handed on band by band as they are drawn, and the cells files are
  written on a thread of their own as the cells' outlines are traced; every PNG is encoded in row bands,
  each a task of its own, so one image spreads over the pool;
- an image's `<stem>.json` is written last, after every file of that image is published (by rename), and
  only after the next image has gone through the tile loop, so at most two images' outputs are held.
Outputs that were not asked for are neither drawn nor encoded. A failure anywhere stops the run: pools
are shut down after their running tasks end, and the image without its JSON is the one that failed.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from deepliif.cell_data import cell_data_file_name, write_cell_data
from deepliif.cells import Cell, Outline, cells_file_names, write_cells
from deepliif.errors import DeepLIIFError
from deepliif.imageio import DEFAULT_MAX_PIXELS, prepare_out_dir, read_image, write_atomically, write_json
from deepliif.inference import OVERLAY_NAMES, ImageSink, InferenceOptions, InferenceResult
from deepliif.logs import project_logger
from deepliif.png_bands import BandedPng, band_edges, check_png_image
from deepliif.slides import is_slide, read_whole_slide
from deepliif.workers import resolve_threads

logger = project_logger("engine")


class ImageSession(Protocol):
    """What `infer` needs of a session (an `engine.Session`, or the replay stand-in of `engine.replay`)."""

    startup: dict[str, float]

    def infer_many(self, images, options=None, progress=None, run=None,
                   sink: ImageSink | None = None) -> list[InferenceResult]: ...


@dataclass
class _Finishing:
    """One image whose files are being written: what its JSON will say once they all are."""

    record: dict
    path: Path
    writes: list[Future] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # every file the JSON names, checked before it is written


class Encoders:
    """A pool that encodes and publishes files, and a thread of its own for the cells files (a long serial
    task that waits for cells as they are traced, so it must not hold a pool thread or queue behind PNG
    bands); each task's future gives the seconds it ran."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")
        self.cells_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cells-file")

    def png(self, path: Path, image: np.ndarray) -> list[Future]:
        """One PNG in row bands, each a task of its own, so a large image spreads over the pool; the task
        that compresses the last band writes the file."""
        return self.bands(banded_png(path, image), image, 0)

    def bands(self, png: BandedPng, rows: np.ndarray, top: int) -> list[Future]:
        """Rows `top` to `top + len(rows)` of a PNG, in bands of `png_bands.BAND_ROWS` rows, a task each."""
        return [self.pool.submit(self._timed, lambda start=start, end=end: png.add(rows[start:end], top + start))
                for start, end in band_edges(len(rows))]

    def call(self, function: Callable[[], object]) -> Future:
        return self.pool.submit(self._timed, function)

    def cells(self, function: Callable[[], object]) -> Future:
        """`function` on the cells files' own thread."""
        return self.cells_writer.submit(self._timed, function)

    def _timed(self, function: Callable[[], object]) -> float:
        """Runs one task; its seconds (the future's result)."""
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)
        self.cells_writer.shutdown(wait=True, cancel_futures=cancel)


def banded_png(path: Path, rows: np.ndarray, height: int | None = None) -> BandedPng:
    """The PNG file that bands are added to, shaped like `rows` (the whole image, or its first band with
    the image's `height`)."""
    rows_height, width, channels = check_png_image(rows)
    return BandedPng(path, width, rows_height if height is None else height, channels, write_atomically)


class StreamedFiles:
    """One image's files written as its results are made (an `ImageSink` for a call with one image): the
    network outputs band by band as the tile loop makes their rows final, so they are encoded while the
    network runs the later tiles; the overlays band by band as they are drawn; the cells files as the
    cells' outlines are traced. `writes` are the futures of every file's tasks. Overlay bands arrive from
    several drawing threads at once, so making a file and adding tasks are done under a lock."""

    def __init__(self, encoders: Encoders, out: Path, stem: str, names: list[str], height: int) -> None:
        self.encoders, self.out, self.stem, self.names, self.height = encoders, out, stem, names, height
        self.files: dict[str, BandedPng] = {}
        self.writes: list[Future] = []
        self.encoded = 0  # network output rows handed to the encoders
        self._lock = threading.Lock()

    def rows_final(self, _index: int, outputs: dict[str, np.ndarray], final: int) -> None:
        if final <= self.encoded:
            return
        for name in self.names:
            if name in outputs:
                self._encode(name, outputs[name][self.encoded:final], self.encoded)
        self.encoded = final

    def postprocessed(self, _index: int) -> StreamedFiles:
        return self

    def overlay_rows(self, top: int, overlaid: np.ndarray, refined: np.ndarray) -> None:
        for name, rows in zip(OVERLAY_NAMES, (overlaid, refined)):
            if name in self.names:
                self._encode(name, rows, top)

    def cells(self, cells: Iterable[Cell], outlines: Mapping[int, Outline] | None) -> None:
        self.writes.append(self.encoders.cells(lambda: write_cells(self.out, self.stem, cells, outlines=outlines)))

    def _encode(self, name: str, rows: np.ndarray, top: int) -> None:
        """Rows `top` on of output `name`; its PNG is made on the first rows that arrive (once: two drawing
        threads must not each make one, or neither would ever hold every band)."""
        with self._lock:
            if name not in self.files:
                self.files[name] = banded_png(self.out / f"{self.stem}_{name}.png", rows, self.height)
            self.writes.extend(self.encoders.bands(self.files[name], rows, top))


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
    streamed = StreamedFiles(encoders, out, stem, list(options.outputs.names + options.intermediate_names),
                             len(image))
    (result,) = session.infer_many([image], options, progress=progress, sink=streamed)
    writes = streamed.writes
    for name, array in result.images.items():
        if name not in streamed.files:
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
    files = [out / f"{stem}_{name}.png" for name in result.images] + [out / name for name in cell_files]
    return _Finishing(record, out / f"{stem}.json", writes, files)


def _publish(finishing: _Finishing, encoders: Encoders) -> Path:
    """Wait for every file of one image (re-raising the first failure), check that each file its JSON names
    was published, then write the JSON."""
    start = time.perf_counter()
    encode_seconds = sum(write.result() for write in finishing.writes)
    missing = [path.name for path in finishing.files if not path.is_file()]
    if missing:
        raise DeepLIIFError(f"{finishing.path.stem}: every write ended but {', '.join(missing)} was not published")
    finishing.record["timings"].update({"encode_seconds": encode_seconds,  # busy time, overlapping the rest
                                        "encode_wait_seconds": time.perf_counter() - start})
    write_json(finishing.path, finishing.record)
    return finishing.path
