"""DeepLIIF 1.2.7's cell data (`compute_cell_results`, versions 3 to 6) of a whole slide, equal to the
image's on the same pixels, written as a stream while the overlay pass walks the bands.

The overlay pass hands over each band's own labels and, per label, its merged cell (`SlideLabels`). A cell
wholly inside the band is traced from the band at once; a cell that crosses a band edge is gathered into a
mask of its own until the bands pass its bottom row. Records leave in the cells' order (raster order of
their first pixels, as for an image) as soon as every earlier cell has left, so the file is written while
the slide is read and only the cells still open are held. The file is `<stem>_cells.json.gz`: gzip, as
for the slide's GeoJSON, written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from .cell_data import CELL_DATA_VERSIONS, encode_cell, simple_contour, trace_boundary, uses_optical_density
from .errors import ArgumentError
from .imageio import open_stream
from .postprocessing import default_size_threshold
from .scoring_rules import PostprocessOptions
from .slide_scoring import SlideCells, SlideScore, slide_marker_threshold


def slide_cell_data_file_name(stem: str) -> str:
    return f"{stem}_cells.json.gz"


class SlideCellData:
    """Writes the cell data of `cells[kept]` to `path` as bands arrive (use as a context manager)."""

    def __init__(self, path: Path, cells: SlideCells, kept: np.ndarray, values: np.ndarray, version: int,
                 settings: dict, width: int) -> None:
        self.path, self.cells, self.values, self.width = Path(path), cells, values, width
        self.version, self.settings = version, settings
        self.value_key = "od" if uses_optical_density(version) else "marker"
        self.is_kept = kept
        self.order = np.flatnonzero(kept)  # the cells to write, in the order they are written
        self.next = 0  # position in `order` of the next cell to write
        self.done: dict[int, dict] = {}
        self.pending: dict[int, np.ndarray] = {}
        self._files = contextlib.ExitStack()

    def __enter__(self) -> SlideCellData:
        self.stream = self._files.enter_context(open_stream(self.path))
        self.stream.write(b'{"cells":[')
        return self

    def __exit__(self, kind, value, traceback) -> bool | None:
        """Completes and publishes the file; on an error (or cells never traced) removes it."""
        if kind is not None:
            return self._files.__exit__(kind, value, traceback)
        with self._files:
            if self.next != len(self.order):
                raise RuntimeError(f"{self.path}: {len(self.order) - self.next} cells were never traced")
            tail = {"settings": self.settings, "dataVersion": self.version}
            self.stream.write(b"]," + json.dumps(tail, separators=(",", ":"))[1:].encode())
        return None

    def add(self, top: int, labels: np.ndarray, cell_of: np.ndarray) -> None:
        """Band rows [top, top + len(labels)): their own labels, and per label its merged cell (-1: none)."""
        bottom = top + len(labels)
        cells = self.cells
        for label, found in enumerate(ndimage.find_objects(labels), start=1):
            cell = int(cell_of[label]) if found is not None else -1
            if cell < 0 or not self.is_kept[cell]:
                continue
            rows, cols = found
            inside = labels[rows, cols] == label
            if cells.y0[cell] >= top and cells.y1[cell] <= bottom:
                self._trace(cell, inside, rows.start + top, cols.start)
            else:
                self._gather(cell, inside, rows.start + top, cols.start)
        for cell in [c for c in self.pending if cells.y1[c] <= bottom]:
            self._trace(cell, self.pending.pop(cell), int(cells.y0[cell]), int(cells.x0[cell]))
        self._write_ready()

    def _gather(self, cell: int, inside: np.ndarray, y: int, x: int) -> None:
        cells = self.cells
        mask = self.pending.get(cell)
        if mask is None:
            shape = (int(cells.y1[cell] - cells.y0[cell]), int(cells.x1[cell] - cells.x0[cell]))
            mask = self.pending[cell] = np.zeros(shape, bool)
        top, left = y - int(cells.y0[cell]), x - int(cells.x0[cell])
        mask[top: top + inside.shape[0], left: left + inside.shape[1]] |= inside

    def _trace(self, cell: int, inside: np.ndarray, y: int, x: int) -> None:
        """The record of `cell`, whose pixels are `inside`, a mask whose (0, 0) is level-0 pixel (x, y)."""
        cells = self.cells
        first_y, first_x = divmod(int(cells.first_pixel[cell]), self.width)
        bbox, boundary = trace_boundary(np.pad(inside, 1), first_x - x + 1, first_y - y + 1)
        size = int(cells.sizes[cell])
        moved = [(px + x - 1, py + y - 1) for px, py in simple_contour(boundary)]
        self.done[cell] = {"size": size, "positive": bool(cells.positive[cell]),
                           self.value_key: int(self.values[cell]),
                           "bbox": [(px + x - 1, py + y - 1) for px, py in bbox],
                           "centroid": (round(int(cells.sum_x[cell]) / size), round(int(cells.sum_y[cell]) / size)),
                           "boundary": moved}

    def _write_ready(self) -> None:
        while self.next < len(self.order) and int(self.order[self.next]) in self.done:
            record = self.done.pop(int(self.order[self.next]))
            cell = encode_cell(record, self.value_key) if self.version in (4, 6) else record
            self.stream.write((b"," if self.next else b"") + json.dumps(cell, separators=(",", ":")).encode())
            self.next += 1


def open_slide_cell_data(out: Path, stem: str, score: SlideScore, version: int, options: PostprocessOptions,
                         has_marker: bool, width: int) -> SlideCellData:
    """The writer of `OUT/<stem>_cells.json.gz` for a scored slide, with the settings 1.2.7 records."""
    if version not in CELL_DATA_VERSIONS:
        raise ArgumentError(f"cell data version must be one of {CELL_DATA_VERSIONS}; got {version!r}")
    cells, by_density = score.merged, uses_optical_density(version)
    values = cells.mean_optical_density() if by_density else cells.marker
    default_size = score.default_size_thresh
    if default_size is None:
        default_size = default_size_threshold(cells.sizes[score.kept], score.resolution)
    settings = {"default_size_thresh": int(default_size), "noise_thresh": options.noise_thresh,
                "large_noise_thresh": options.large_noise_size(score.resolution), "seg_thresh": options.seg_thresh}
    if not by_density:
        settings["default_marker_thresh"] = slide_marker_threshold(cells.marker_histogram) if has_marker else None
    return SlideCellData(Path(out) / slide_cell_data_file_name(stem), cells, score.kept, values, version, settings,
                         width)
