"""Resuming a slide run killed midway from its last completed region.

Level 0 of every output is written as regions: bands of tile rows ending where the slide loop hands rows
over (`release_points`), each region one tiled TIFF per output. A region counts only once all of its
files are closed, flushed to disk (fsync) and listed, with their sizes and the run's position after it,
in `checkpoint.json`, which is replaced atomically. A rerun reads that manifest: the same slide (path,
size, modification time), model, backend, tile size and regions, or it starts afresh; files that are not
listed, or whose size changed, are deleted, and the run restarts at the tile row after the last region
that is whole. The folder is hidden and holds no final output, so nothing here ever looks complete; the
outputs are assembled from the regions only after the last one, and the folder goes once they are
published. An exclusive, non-blocking lock on the folder keeps a second run off the same checkpoint.
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
from .pyramid import StreamedLevel
from .slide_loop import SlidePosition
from .logs import project_logger

logger = project_logger("deepliif")

MANIFEST = "checkpoint.json"
REGION_PIXELS = 32_000_000  # a killed run loses at most about this much inference


class CheckpointBusyError(DeepLIIFError):
    """Another run holds the checkpoint of the same outputs."""


def region_ends(releases: list[int], width: int) -> list[int]:
    """Every k-th release point, k tile rows making about `REGION_PIXELS`; the last is the slide's height."""
    rows_per_region = max(1, round(REGION_PIXELS / max(1, width * (releases[0] if releases else 1))))
    ends = releases[rows_per_region - 1::rows_per_region]
    return ends if ends and ends[-1] == releases[-1] else [*ends, releases[-1]]


class SlideCheckpoint:
    """The level-0 regions of one slide's outputs in `folder`; a context manager that holds its lock."""

    def __init__(self, folder: Path, fingerprint: dict, names: tuple[str, ...], width: int,
                 ends: list[int]) -> None:
        self.folder, self.names, self.width, self.ends = Path(folder), names, width, ends
        self.fingerprint = {**fingerprint, "names": list(names), "region_ends": ends}
        self.regions: list[dict] = []
        self._writers: dict[str, StreamedLevel] = {}
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
        keep = {MANIFEST} | {entry["file"] for region in self.regions for entry in region["files"].values()}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)
        self._save()
        if not self.regions:
            return None
        position = SlidePosition(**self.regions[-1]["position"])
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
        return all((self.folder / entry["file"]).is_file() and
                   (self.folder / entry["file"]).stat().st_size == entry["bytes"] for entry in region["files"].values())

    def add(self, top: int, rows: dict[str, np.ndarray]) -> None:
        """Rows handed over by the slide loop, into the open region (opened on first use)."""
        index = len(self.regions)
        start = self.ends[index - 1] if index else 0
        if not self._writers:
            self._writers = {name: StreamedLevel(self.folder / f"{name}.{index:05d}.tif", self.width,
                                                 self.ends[index] - start) for name in self.names}
        for name, writer in self._writers.items():
            writer.add(rows[name])

    def row_done(self, position: SlidePosition) -> None:
        """Closes the open region when the run has handed over all of its rows."""
        index = len(self.regions)
        if index >= len(self.ends) or position.rows_done != self.ends[index]:
            return
        files = {}
        for name, writer in self._writers.items():
            writer.close()
            with open(writer.path, "rb") as handle:
                os.fsync(handle.fileno())
            files[name] = {"file": writer.path.name, "bytes": writer.path.stat().st_size}
        self._writers = {}
        self.regions.append({"index": index, "rows": [self.ends[index - 1] if index else 0, self.ends[index]],
                             "files": files, "position": asdict(position)})
        self._save()

    def _save(self) -> None:
        write_json(self.folder / MANIFEST, {"fingerprint": self.fingerprint, "regions": self.regions})

    def level0(self, name: str) -> list[Path]:
        """Level 0 of output `name`, region by region, top to bottom (every region whole)."""
        if len(self.regions) != len(self.ends):
            raise DeepLIIFError(f"{self.folder}: {len(self.regions)} of {len(self.ends)} regions written")
        return [self.folder / region["files"][name]["file"] for region in self.regions]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
