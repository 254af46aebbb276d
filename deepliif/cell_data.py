"""DeepLIIF 1.2.7's per-cell data (`compute_cell_results`, data versions 3 to 6), field for field.

Each cell (every component above the noise thresholds, in raster order of its first pixel) has its size,
its colour class, a value, its bounding box (inclusive corners), its centroid (coordinate sums over the
size, halves rounded to even) and its boundary: the cell's boundary pixels traced clockwise from its first
pixel (Moore-neighbour tracing, DeepLIIF's start direction and stop rule), with the points inside straight
runs dropped. Versions 3 and 4 carry the Marker's maximum as `marker`, 5 and 6 the IHC's mean optical
density as `od`; 4 and 6 pack each cell into one printable string (base 92, the boundary as a Freeman
chain code). `settings` holds the defaults a later re-scoring needs without the images.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import ArgumentError
from .imageio import write_atomically

CELL_DATA_VERSIONS = (3, 4, 5, 6)
Point = tuple[int, int]
# The eight neighbours (dx, dy) clockwise from the top left, as DeepLIIF's tracer visits them.
_CLOCKWISE = [(-1, -1), (0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0)]
# Freeman chain-code directions (dx, dy), code 0 to 7.
_FREEMAN = [(1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1)]
_BASE, _OFFSET, _MAX_STEP = 92, 35, 10


def uses_optical_density(version: int) -> bool:
    return version in (5, 6)


def trace_boundary(inside: np.ndarray, x: int, y: int) -> tuple[list[Point], list[Point]]:
    """Bounding box and clockwise boundary of the 8-connected component of `inside` whose first pixel in
    raster order is (x, y); `inside` must be False on its outermost rows and columns."""
    def cell(px: int, py: int) -> bool:
        return bool(inside[py, px])

    start = next((k for k in range(6, -1, -1) if cell(x + _CLOCKWISE[k][0], y + _CLOCKWISE[k][1])), None)
    if start is None:
        return [(x, y), (x, y)], [(x, y)]
    previous = (x + _CLOCKWISE[start][0], y + _CLOCKWISE[start][1])
    points, current = [previous, (x, y)], (x, y)
    while True:
        k = _CLOCKWISE.index((previous[0] - current[0], previous[1] - current[1])) + 1
        while not cell(current[0] + _CLOCKWISE[k % 8][0], current[1] + _CLOCKWISE[k % 8][1]):
            k += 1
        previous, current = current, (current[0] + _CLOCKWISE[k % 8][0], current[1] + _CLOCKWISE[k % 8][1])
        points.append(current)
        if previous == points[0] and current == points[1]:
            break
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [(min(xs), min(ys)), (max(xs), max(ys))], points[1:-1]


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def simple_contour(points: list[Point]) -> list[Point]:
    """The corners of a closed contour of 8-neighbour steps: points inside straight runs dropped (the
    first point always kept)."""
    if len(points) == 1:
        return [points[0]]
    kept = [points[0]]
    for i in range(1, len(points)):
        before, here, after = points[i - 1], points[i], points[(i + 1) % len(points)]
        incoming = (_sign(here[0] - before[0]), _sign(here[1] - before[1]))
        outgoing = (_sign(after[0] - here[0]), _sign(after[1] - here[1]))
        if incoming != outgoing:
            kept.append(here)
    return kept


def full_contour(points: list[Point]) -> list[Point]:
    """Every pixel of a contour given by its corners (the inverse of `simple_contour`)."""
    full = [tuple(points[0])]
    for target in [*points[1:], points[0]]:
        step = (_sign(target[0] - full[-1][0]), _sign(target[1] - full[-1][1]))
        while full[-1] != tuple(target):
            full.append((full[-1][0] + step[0], full[-1][1] + step[1]))
    if len(full) > 1 and full[-1] == full[0]:
        full.pop()
    return full


def to_base92(values: list[int], min_len: int = 1) -> list[str]:
    """Each value in base 92 with digits offset by 35 (printable ASCII), all padded to one length."""
    digits = []
    for value in values:
        text = ""
        while value > 0:
            text = chr(value % _BASE + _OFFSET) + text
            value //= _BASE
        digits.append(text)
    width = max(min_len, *(len(text) for text in digits))
    return [text.rjust(width, chr(_OFFSET)) for text in digits]


def from_base92(text: str) -> int:
    value = 0
    for char in text:
        value = value * _BASE + ord(char) - _OFFSET
    return value


def encode_cell(cell: dict, value_key: str) -> str:
    """One cell as the compact string of data versions 4 and 6."""
    (x, y), (x1, y1) = cell["bbox"]
    (size,) = to_base92([cell["size"]])
    (classification,) = to_base92([cell[value_key] * 2 + int(cell["positive"])], 2)
    anchor = to_base92([x, y])
    first = cell["boundary"][0]
    offsets = to_base92([x1 - x, y1 - y, cell["centroid"][0] - x, cell["centroid"][1] - y, first[0] - x, first[1] - y])
    lengths = chr((len(size) - 1) * 16 + (len(anchor[0]) - 1) * 4 + (len(offsets[0]) - 1) + _OFFSET)
    chain = []
    for before, here in zip(cell["boundary"], cell["boundary"][1:]):
        dx, dy = here[0] - before[0], here[1] - before[1]
        distance = max(abs(dx), abs(dy))
        if distance == 0:
            continue
        direction = _FREEMAN.index((_sign(dx), _sign(dy)))
        while distance > _MAX_STEP:
            chain.append(chr(_MAX_STEP * 8 + direction + _OFFSET))
            distance -= _MAX_STEP
        chain.append(chr(distance * 8 + direction + _OFFSET))
    return lengths + size + classification + "".join(anchor) + "".join(offsets) + "".join(chain)


def decode_cell(text: str, value_key: str) -> dict:
    """A cell of data version 4 or 6 back as the fields of version 3 or 5."""
    n = ord(text[0]) - _OFFSET
    sizes = [n // 16 + 1, 2, (n // 4) % 4 + 1, (n // 4) % 4 + 1, *[n % 4 + 1] * 6]
    fields, at = [], 1
    for width in sizes:
        fields.append(from_base92(text[at: at + width]))
        at += width
    size, classification, x, y, ex, ey, cx, cy, bx, by = fields
    boundary, previous = [(x + bx, y + by)], None
    for char in text[at:]:
        code = ord(char) - _OFFSET
        direction = _FREEMAN[code % 8]
        point = (boundary[-1][0] + direction[0] * (code // 8), boundary[-1][1] + direction[1] * (code // 8))
        if direction == previous:  # a run longer than one step continues the last point
            boundary.pop()
        boundary.append(point)
        previous = direction
    return {"size": size, "positive": bool(classification % 2), value_key: classification // 2,
            "bbox": [(x, y), (x + ex, y + ey)], "centroid": (x + cx, y + cy), "boundary": boundary}


def cell_records(labels: np.ndarray, ids: np.ndarray, sizes: np.ndarray, positive: np.ndarray,
                 values: np.ndarray, first_pixels: np.ndarray, sum_x: np.ndarray, sum_y: np.ndarray,
                 value_key: str) -> list[dict]:
    """The version-3/5 fields of the cells `ids` of a label image (raster order of their labels)."""
    boxes = ndimage.find_objects(labels)
    width = labels.shape[1]
    records = []
    for label in ids.tolist():
        rows, cols = boxes[label - 1]
        inside = np.pad(labels[rows, cols] == label, 1)
        first_y, first_x = divmod(int(first_pixels[label]), width)
        bbox, boundary = trace_boundary(inside, first_x - cols.start + 1, first_y - rows.start + 1)
        shift = (cols.start - 1, rows.start - 1)
        size = int(sizes[label])
        records.append({"size": size, "positive": bool(positive[label]), value_key: int(values[label]),
                        "bbox": [_moved(p, shift) for p in bbox],
                        "centroid": (round(int(sum_x[label]) / size), round(int(sum_y[label]) / size)),
                        "boundary": [_moved(p, shift) for p in simple_contour(boundary)]})
    return records


def _moved(point: Point, shift: tuple[int, int]) -> Point:
    return point[0] + shift[0], point[1] + shift[1]


def cell_data_document(records: list[dict], version: int, settings: dict) -> dict:
    """The file's content: `cells` (packed for versions 4 and 6), `settings`, `dataVersion`."""
    value_key = "od" if uses_optical_density(version) else "marker"
    cells = [encode_cell(r, value_key) for r in records] if version in (4, 6) else records
    return {"cells": cells, "settings": settings, "dataVersion": version}


def read_cell_data(path: Path) -> tuple[list[dict], dict, int]:
    """A cell-data file's cells (unpacked), settings and version; gzip-compressed (a slide's) or not; a
    malformed file is refused naming the field."""
    try:
        data = Path(path).read_bytes()
        document = json.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    except (OSError, ValueError, EOFError) as exc:
        raise ArgumentError(f"{path}: not a readable cell-data JSON file ({exc})") from exc
    version = document.get("dataVersion") if isinstance(document, dict) else None
    if version not in CELL_DATA_VERSIONS:
        raise ArgumentError(f"{path}: dataVersion must be one of {CELL_DATA_VERSIONS}; got {version!r}")
    settings, cells = document.get("settings"), document.get("cells")
    if not isinstance(settings, dict) or "default_size_thresh" not in settings or "seg_thresh" not in settings:
        raise ArgumentError(f"{path}: settings must hold default_size_thresh and seg_thresh")
    if not isinstance(cells, list):
        raise ArgumentError(f"{path}: cells must be a list")
    value_key = "od" if uses_optical_density(version) else "marker"
    unpacked = [decode_cell(cell, value_key) if isinstance(cell, str) else cell for cell in cells]
    for index, cell in enumerate(unpacked):
        missing = {"size", "positive", value_key, "boundary"} - set(cell) if isinstance(cell, dict) else {"cell"}
        if missing or not cell["boundary"]:
            raise ArgumentError(f"{path}: cell {index} lacks {', '.join(sorted(missing)) or 'boundary points'} "
                                f"(data version {version})")
    return unpacked, settings, version


def cell_data_file_name(stem: str) -> str:
    return f"{stem}_cells.json"


def encode_cell_data(document: dict) -> bytes:
    """The file's bytes: compact JSON (a cohort's files add up)."""
    return json.dumps(document, separators=(",", ":")).encode()


def write_cell_data(out: Path, stem: str, document: dict) -> Path:
    """`OUT/<stem>_cells.json`, published by rename."""
    path = Path(out) / cell_data_file_name(stem)
    write_atomically(path, encode_cell_data(document))
    return path
