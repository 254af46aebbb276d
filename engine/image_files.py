"""`infer` on image files as a pipeline: read ahead, tile loop, encode while postprocessing, publish.

The stages overlap so the network is never the one waiting:
- consecutive small images share one tile loop call until their tiles fill `CALL_BATCHES` batches, so a
  folder of 512² tiles runs the network in full batches, not one tile per call (`plan_calls`); a slide, or an
  image that fills them alone, has a call of its own;
- the next call's images are decoded on a reader thread while the current call is in the tile loop;
- each image's network outputs are handed to the encoder pool band by band as the tile loop makes their
  rows final, so they are encoded while the network runs the later tiles and while its cells are found and
  its overlays drawn; the overlays are handed on band by band as they are drawn, and the cells files are
  written on a thread of their own as the cells' outlines are traced; every PNG is encoded in row bands,
  each a task of its own, so one image spreads over the pool;
- an image's `<stem>.json` is written last, after every file of that image is published (by rename), and
  only after the next call has gone through the tile loop, so at most two calls' outputs are held.
Outputs that were not asked for are neither drawn nor encoded. A failure anywhere stops the run: pools
are shut down after their running tasks end, and the images without their JSON are those not finished.
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
from deepliif.imageio import DEFAULT_MAX_PIXELS, prepare_out_dir, probe_image, read_image, write_atomically, write_json
from deepliif.inference import OVERLAY_NAMES, ImageSink, InferenceOptions, InferenceResult, tile_count
from deepliif.logs import project_logger
from deepliif.png_bands import BandedPng, band_edges, check_png_image
from deepliif.slides import is_slide, read_whole_slide
from deepliif.workers import resolve_threads

logger = project_logger("engine")

CALL_BATCHES = 4  # small images share a tile loop call until their tiles fill this many batches


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
    """One image's files written as its results are made (its `PostprocessSink`, and what `CallFiles`
    hands its network rows to): the network outputs band by band as the tile loop makes their rows final,
    so they are encoded while the network runs the later tiles; the overlays band by band as they are
    drawn; the cells files as the cells' outlines are traced. `writes` are the futures of every file's
    tasks. Overlay bands arrive from several drawing threads at once, so making a file and adding tasks
    are done under a lock."""

    def __init__(self, encoders: Encoders, out: Path, stem: str, names: list[str], height: int) -> None:
        self.encoders, self.out, self.stem, self.names, self.height = encoders, out, stem, names, height
        self.files: dict[str, BandedPng] = {}
        self.writes: list[Future] = []
        self.encoded = 0  # network output rows handed to the encoders
        self._lock = threading.Lock()

    def rows_final(self, outputs: dict[str, np.ndarray], final: int) -> None:
        if final <= self.encoded:
            return
        for name in self.names:
            if name in outputs:
                self._encode(name, outputs[name][self.encoded:final], self.encoded)
        self.encoded = final

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


class CallFiles:
    """The `ImageSink` of one tile loop call: each image's `StreamedFiles`, by its index in the call."""

    def __init__(self, files: list[StreamedFiles]) -> None:
        self.files = files

    def rows_final(self, index: int, outputs: dict[str, np.ndarray], final: int) -> None:
        self.files[index].rows_final(outputs, final)

    def postprocessed(self, index: int) -> StreamedFiles:
        return self.files[index]


@dataclass(frozen=True)
class PlannedImage:
    path: Path
    slide: bool  # decided once, from the file's content (`is_slide` may ask OpenSlide)


@dataclass(frozen=True)
class _Decoded:
    path: Path
    image: np.ndarray
    seconds: float


def plan_calls(images: list[Path], tile_size: int, batch_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> list[list[PlannedImage]]:
    """The images in order, cut into tile loop calls: consecutive images share a call until their tiles
    would pass `CALL_BATCHES` batches (each image's size read from its header); a slide has a call of its
    own."""
    limit = CALL_BATCHES * batch_size
    calls: list[list[PlannedImage]] = []
    tiles = 0
    for path in images:
        slide = is_slide(path)
        count = limit if slide else tile_count(*probe_image(path, max_pixels), tile_size)
        if not calls or tiles + count > limit:
            calls.append([])
            tiles = 0
        calls[-1].append(PlannedImage(path, slide))
        tiles += count
    return calls


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
    calls = plan_calls(images, options.tile_size, options.batch_size, max_pixels)  # every header read first
    prepare_out_dir(out)
    encoders = Encoders(resolve_threads(options.threads))
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
    written: list[Path] = []
    finishing: list[_Finishing] = []
    ok = False
    try:
        upcoming = reader.submit(_decode_call, calls[0], max_pixels) if calls else None
        for index, call in enumerate(calls):
            decoded = upcoming.result()
            upcoming = reader.submit(_decode_call, calls[index + 1], max_pixels) if index + 1 < len(calls) else None
            if on_image:
                on_image(call[0].path)
            current = _infer_call(session, decoded, out, options, describe, encoders, progress)
            written.extend(_publish(each, encoders) for each in finishing)
            finishing = current
        written.extend(_publish(each, encoders) for each in finishing)
        ok = True
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        encoders.close(cancel=not ok)
    return written


def _decode_call(call: list[PlannedImage], max_pixels: int) -> list[_Decoded]:
    decoded = []
    for planned in call:
        start = time.perf_counter()
        path = planned.path
        image = read_whole_slide(path, max_pixels) if planned.slide else read_image(path, max_pixels=max_pixels)
        decoded.append(_Decoded(path, image, time.perf_counter() - start))
    return decoded


def _infer_call(session: ImageSession, decoded: list[_Decoded], out: Path, options: InferenceOptions,
                describe: dict, encoders: Encoders, progress: Callable[[int], None] | None) -> list[_Finishing]:
    """One tile loop call's images, their network outputs and overlays encoded as they are made; what
    each image's JSON will say once its files are written."""
    names = list(options.outputs.names + options.intermediate_names)
    streamed = [StreamedFiles(encoders, out, each.path.stem, names, len(each.image)) for each in decoded]
    results = session.infer_many([each.image for each in decoded], options, progress=progress,
                                 sink=CallFiles(streamed))
    return [_finishing(each, result, files, out, options, describe, encoders, len(decoded))
            for each, result, files in zip(decoded, results, streamed)]


def _finishing(decoded: _Decoded, result: InferenceResult, streamed: StreamedFiles, out: Path,
               options: InferenceOptions, describe: dict, encoders: Encoders, call_images: int) -> _Finishing:
    """The rest of one image's files handed to the encoders, and its JSON record. Its timings are the
    stage sums of its tile loop call, which held `call_images` images."""
    stem, writes = decoded.path.stem, streamed.writes
    for name, array in result.images.items():
        if name not in streamed.files:
            writes.extend(encoders.png(out / f"{stem}_{name}.png", array))
    cell_files = list(cells_file_names(stem).values())
    if result.cell_data is not None:
        writes.append(encoders.call(lambda: write_cell_data(out, stem, result.cell_data)))
        cell_files.append(cell_data_file_name(stem))
    record = {"image": str(decoded.path), **describe, "tile_size": options.tile_size,
              "batch_size": options.batch_size, "tiles": result.tiles, "empty_tiles": result.empty_tiles,
              "outputs": list(result.images), "cells": cell_files, "scoring": result.scoring,
              "timings": {"decode_seconds": decoded.seconds, "call_images": call_images, **result.timings}}
    logger.info("%s: %s", decoded.path.name, json.dumps(result.scoring))
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
