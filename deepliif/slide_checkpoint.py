"""Resuming a slide run killed midway from its last completed region.

Every output is written as regions: bands of whole TIFF tile rows (the last region takes what is left),
each region one tiled TIFF per output and level, its reduced levels made from the rows as they stream
past, so the published pyramids copy their tiles as they are stored and nothing is decoded again. A
region's rows are a multiple of 2**levels, so its reduced levels are exactly the slide's rows there.
(Smaller levels' regions are not whole tile rows; those few levels are re-tiled when published.)
A region counts only once all of its files are closed, flushed to disk (fsync) and listed, with their
sizes and where to resume after it, in `checkpoint.json`, which is replaced atomically. Regions end on
TIFF tile rows but the slide loop hands rows over at its own release points, so the place to resume after
a region is the last release point at or above its end: a resumed run hands over some rows the region
already holds, and they are dropped. A rerun reads the manifest: the same slide (path, size, modification
time), model, backend, tile size, regions and levels, or it starts afresh; files that are not listed, or
whose size changed, are deleted. The folder is hidden and holds no final output, so nothing here ever
looks complete; the outputs are assembled from the regions only after the last one, and the folder goes
once they are published. An exclusive, non-blocking lock on the folder keeps a second run off the
same checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .errors import DeepLIIFError
from .imageio import write_json
from .pyramid import TIFF_TILE, ZSTD, Codec, PyramidWriter, level_sizes, region_levels
from .slide_loop import SlidePosition
from .logs import project_logger

logger = project_logger("deepliif")

MANIFEST = "checkpoint.json"
REGION_PIXELS = 32_000_000  # a killed run loses at most about this much inference


class CheckpointBusyError(DeepLIIFError):
    """Another run holds the checkpoint of the same outputs."""


def region_ends(height: int, width: int, tile: int = TIFF_TILE) -> list[int]:
    """Where regions end: every whole number of TIFF tile rows making about `REGION_PIXELS` and halving
    evenly through every level of the slide's pyramid, then the slide's height."""
    step = max(tile, 1 << (len(level_sizes(height, width, tile)) - 1))
    rows = -(-max(tile, round(REGION_PIXELS / max(1, width * tile)) * tile) // step) * step
    return [*range(rows, height, rows), height]


class SlideCheckpoint:
    """The level-0 regions of one slide's outputs in `folder`; a context manager that holds its lock."""

    def __init__(self, folder: Path, fingerprint: dict, names: tuple[str, ...], width: int,
                 ends: list[int], codecs: dict[str, Codec] | None = None) -> None:
        self.folder, self.names, self.width, self.ends = Path(folder), names, width, ends
        self.codecs = {name: (codecs or {}).get(name, ZSTD) for name in names}
        self.sizes = level_sizes(ends[-1], width)
        self.fingerprint = {**fingerprint, "names": list(names), "region_ends": ends, "levels": len(self.sizes),
                            "codecs": {name: codec.compression for name, codec in self.codecs.items()}}
        self.regions: list[dict] = []
        self._writers: dict[str, PyramidWriter] = {}
        self._written = 0  # rows of level 0 in closed or open regions
        self._closed: list[dict[str, dict]] = []  # files of regions written whole, not yet listed
        self._before = SlidePosition()  # the run's last position at or above the oldest unlisted region's end
        self._lock: int | None = None

    def __enter__(self) -> SlideCheckpoint:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CheckpointBusyError(f"{self.folder}: another run is writing these outputs now") from exc
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    def resume(self) -> SlidePosition | None:
        """Where to start: after the last whole region of an earlier run of the same work, or None."""
        self.regions = [region for region in self._listed() if self._whole(region)]
        whole = len(self.regions)
        self.regions = self.regions[: next((i for i, r in enumerate(self.regions) if r["index"] != i), whole)]
        keep = {MANIFEST} | {entry["file"] for region in self.regions for levels in region["files"].values()
                             for entry in levels}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)
        self._save()
        if not self.regions:
            return None
        position = SlidePosition(**self.regions[-1]["position"])
        self._written, self._before = self.regions[-1]["rows"][1], position
        logger.info("resuming %s at row %d (%d tiles done)", self.folder.name, position.rows_done,
                    position.tiles_done)
        return position

    def _listed(self) -> list[dict]:
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return []
        if manifest.get("fingerprint") != json.loads(json.dumps(self.fingerprint, default=str)):
            logger.info("%s: an earlier run of other work; starting afresh", self.folder.name)
            return []
        return list(manifest.get("regions", []))

    def _whole(self, region: dict) -> bool:
        return all((self.folder / entry["file"]).is_file() and (self.folder / entry["file"]).stat().st_size ==
                   entry["bytes"] for levels in region["files"].values() for entry in levels)

    def add(self, top: int, rows: dict[str, np.ndarray]) -> None:
        """Rows handed over by the slide loop, into the open region (opened on first use); rows a resumed
        run hands over again are dropped, rows past the open region's end go to the next."""
        skip = self._written - top
        count = len(next(iter(rows.values()))) - max(skip, 0)
        rows = {name: part[max(skip, 0):] for name, part in rows.items()}
        while count > 0:
            index = len(self.regions) + len(self._closed)
            start, end = (self.ends[index - 1] if index else 0), self.ends[index]
            if not self._writers:
                sizes = region_levels(start, end, self.sizes)
                self._writers = {name: PyramidWriter(self.folder / f"{name}.{index:05d}", sizes,
                                                     codec=self.codecs[name]) for name in self.names}
            taken = min(count, end - self._written)
            for name, writer in self._writers.items():
                writer.add(rows[name][:taken])
            rows, count, self._written = {name: part[taken:] for name, part in rows.items()}, count - taken, \
                self._written + taken
            if self._written == end:
                self._closed.append(self._close_region())

    def _close_region(self) -> dict[str, list[dict]]:
        files = {}
        for name, writer in self._writers.items():
            files[name] = []
            for path in writer.close():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
                files[name].append({"file": path.name, "bytes": path.stat().st_size})
        self._writers = {}
        return files

    def row_done(self, position: SlidePosition) -> None:
        """Lists the regions written whole once the run has handed over all of their rows, each with the
        run's last position at or above its end (where a rerun resumes)."""
        while self._closed:
            index = len(self.regions)
            end = self.ends[index]
            if position.rows_done < end:
                break
            resume = position if position.rows_done == end else self._before
            self.regions.append({"index": index, "rows": [self.ends[index - 1] if index else 0, end],
                                 "files": self._closed.pop(0), "position": asdict(resume)})
            self._save()
        self._before = position

    def _save(self) -> None:
        write_json(self.folder / MANIFEST, {"fingerprint": self.fingerprint, "regions": self.regions})

    def levels(self, name: str) -> list[list[Path]]:
        """Every level of output `name`, largest first, each region by region, top to bottom (every region
        whole; a small last region may make no rows at the smallest levels)."""
        if len(self.regions) != len(self.ends):
            raise DeepLIIFError(f"{self.folder}: {len(self.regions)} of {len(self.ends)} regions written")
        return [[self.folder / region["files"][name][k]["file"] for region in self.regions
                 if k < len(region["files"][name])] for k in range(len(self.sizes))]

    def written_level0(self, name: str) -> list[Path]:
        """Level 0 of output `name` in the regions listed so far (what a resumed run wrote before), top to
        bottom."""
        return [self.folder / region["files"][name][0]["file"] for region in self.regions]

    def level0(self, name: str) -> list[Path]:
        """Level 0 of output `name`, region by region, top to bottom."""
        return self.levels(name)[0]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
