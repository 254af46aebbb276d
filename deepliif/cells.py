"""Per-cell results: one row per counted cell, as a CSV table and as GeoJSON that QuPath imports.

Coordinates are level-0 pixels of the input (x right, y down) in QuPath's convention: pixel (x, y) covers
[x, x+1) x [y, y+1). The GeoJSON follows QuPath's import rules (GsonTools, QuPath 0.4-0.7): one feature
per counted cell with a UUID `id`, `objectType` "detection", a classification whose colour is an
[r, g, b] array, every number under `measurements`, and as geometry the cell's outline (a Polygon, see
`cell_outlines`) or, with `CellGeometry.POINTS`, its centroid. It is written as a stream (gzip for
slides), so a million cells never sit in memory as one JSON tree, under a temporary name then renamed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import uuid
from collections.abc import Iterable, Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from .imageio import open_stream, write_atomically

Outline = list[np.ndarray]  # closed (n, 2) rings of level-0 (x, y): the shell, then any holes

CLASS_COLOURS = {"Positive": (255, 0, 0), "Negative": (0, 0, 255)}  # QuPath's own: red, blue
# The namespace of cell UUIDs: uuid5 of it and "<image>/<cell>" names a cell the same way every run.
CELL_NAMESPACE = uuid.UUID("0f0b7a3e-5d1c-4e57-9a59-6c2f1d7e4b21")
_NAMESPACE_BYTES = CELL_NAMESPACE.bytes


class CellGeometry(str, Enum):
    """`--cell-geometry`: each cell's outline (default) or its centroid."""
    POLYGONS = "polygons"
    POINTS = "points"


class Cell(NamedTuple):
    """One counted cell. A named tuple, not a dataclass: an image makes one per cell on the request path
    (thousands; a slide millions), and a tuple is built and written as a CSV row in C."""
    id: int
    centroid_x: float
    centroid_y: float
    bbox_x0: int
    bbox_y0: int
    bbox_x1: int  # exclusive
    bbox_y1: int  # exclusive
    area_px: int
    positive: bool
    marker: int  # max Marker grey level over the cell (0 without a Marker image)
    marker_mean: float  # mean Marker grey level over the cell, 2 places (0 without a Marker image)

    @property
    def classification(self) -> str:
        return "Positive" if self.positive else "Negative"

    def measurements(self, mpp: float | None) -> dict[str, float]:
        """The numbers QuPath shows for a detection, under the names it shows them."""
        values = {"Area px": float(self.area_px)}
        if mpp is not None:
            values["Area µm^2"] = round(self.area_px * mpp * mpp, 3)
        values.update({"Marker max": float(self.marker), "Marker mean": self.marker_mean,
                       "Centroid X px": self.centroid_x, "Centroid Y px": self.centroid_y})
        return values


class CellStats(Protocol):
    """Per-label arrays that a cell table is made from: an image's `Components`, a slide's merged cells."""
    sizes: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray  # exclusive
    y1: np.ndarray  # exclusive
    sum_x: np.ndarray
    sum_y: np.ndarray


def counted_cells(stats: CellStats, label_ids: np.ndarray, positive: np.ndarray, marker: np.ndarray,
                  marker_sum: np.ndarray | None = None) -> list[Cell]:
    """The cells `label_ids`, numbered 1.. in that order. Centroids are the bounding box's corner plus the
    mean offset from it, rounded to 2 places by Python's `round` (the float steps are those of Python's
    int arithmetic: every operand is an exact integer in float64)."""
    ids = np.asarray(label_ids, np.int64)
    area, x0, y0 = stats.sizes[ids], stats.x0[ids], stats.y0[ids]
    centroid_x = x0 + (stats.sum_x[ids] - area * x0) / area
    centroid_y = y0 + (stats.sum_y[ids] - area * y0) / area
    marker_mean = np.zeros(len(ids)) if marker_sum is None else marker_sum[ids] / area
    columns = zip(centroid_x.tolist(), centroid_y.tolist(), x0.tolist(), y0.tolist(), stats.x1[ids].tolist(),
                  stats.y1[ids].tolist(), area.tolist(), positive[ids].tolist(), marker[ids].tolist(),
                  marker_mean.tolist())
    return [Cell(number, round(cx, 2), round(cy, 2), bx0, by0, bx1, by1, size, bool(pos), int(mx), round(mean, 2))
            for number, (cx, cy, bx0, by0, bx1, by1, size, pos, mx, mean) in enumerate(columns, start=1)]


class CellsTable:
    """The cells CSV built row by row, so it can be made in the same pass as the GeoJSON."""

    def __init__(self, mpp: float | None = None) -> None:
        self.mpp, self._out = mpp, io.StringIO()
        self._writer = csv.writer(self._out, lineterminator="\n")
        self._writer.writerow([*Cell._fields, "area_um2", "classification"])

    def add(self, cell: Cell) -> None:
        area = "" if self.mpp is None else round(cell.area_px * self.mpp * self.mpp, 3)
        self._writer.writerow((*cell, area, cell.classification))

    def data(self) -> bytes:
        return self._out.getvalue().encode()


def cells_csv(cells: Iterable[Cell], mpp: float | None = None) -> bytes:
    table = CellsTable(mpp)
    for cell in cells:
        table.add(cell)
    return table.data()


def cell_uuid(image: str, cell: Cell) -> str:
    """The same UUID for the same cell of the same image, every run (QuPath keeps only UUID ids):
    `uuid.uuid5(CELL_NAMESPACE, "<image>/<id>/<x0>,<y0>")`, made from its SHA-1 here because `uuid.UUID`
    objects cost 3x more (a slide names millions of cells)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{image}/{cell.id}/{cell.bbox_x0},{cell.bbox_y0}".encode(),
                                    usedforsecurity=False).digest()[:16])
    digest[6] = digest[6] & 0x0F | 0x50  # RFC 4122 version 5
    digest[8] = digest[8] & 0x3F | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def cell_feature(image: str, cell: Cell, mpp: float | None, rings: Outline | None) -> dict:
    """A cell's GeoJSON feature: its outline `rings`, else its centroid."""
    geometry = {"type": "Polygon", "coordinates": rings} if rings else \
        {"type": "Point", "coordinates": [cell.centroid_x, cell.centroid_y]}
    return {"type": "Feature", "id": cell_uuid(image, cell), "geometry": geometry,
            "properties": {"objectType": "detection", "name": f"cell {cell.id}",
                           "classification": {"name": cell.classification,
                                              "color": list(CLASS_COLOURS[cell.classification])},
                           "isLocked": False, "measurements": cell.measurements(mpp)}}


def cell_features(image: str, cells: Iterable[Cell], mpp: float | None,
                  outlines: Mapping[int, Outline] | None) -> Iterator[dict]:
    """One GeoJSON feature per cell: its outline from `outlines` (cell id -> rings), else its centroid."""
    for cell in cells:
        yield cell_feature(image, cell, mpp, None if outlines is None else outlines.get(cell.id))


def write_geojson(path: Path, features: Iterator[dict]) -> None:
    """A FeatureCollection written feature by feature (gzip if `path` ends in .gz), then renamed into place.
    Features may hold NumPy arrays (outline rings); orjson writes them as nested lists, in UTF-8."""
    import orjson
    with open_stream(path) as stream:
        stream.write(b'{"type": "FeatureCollection", "features": [')
        chunk: list[bytes] = []
        for index, feature in enumerate(features):
            chunk.append((b",\n" if index else b"\n") + orjson.dumps(feature, option=orjson.OPT_SERIALIZE_NUMPY))
            if len(chunk) == 1000:  # a write per thousand features, not per feature
                stream.write(b"".join(chunk))
                chunk.clear()
        stream.write(b"".join(chunk) + b"\n]}\n")


def cells_file_names(stem: str, slide: bool = False) -> dict[str, str]:
    return {"csv": f"{stem}_cells.csv", "geojson": f"{stem}_cells.geojson" + (".gz" if slide else "")}


def write_cells(out: Path, stem: str, cells: Iterable[Cell], mpp: float | None = None,
                outlines: Mapping[int, Outline] | None = None, slide: bool = False) -> list[Path]:
    """The cells CSV and GeoJSON, made in one pass over `cells`, which may be a stream (a slide's cells as
    its overlay pass completes them: `outlines` then holds each cell's rings by the time it is handed out)."""
    names = cells_file_names(stem, slide)
    paths = [Path(out) / names["csv"], Path(out) / names["geojson"]]
    table = CellsTable(mpp)

    def tabled() -> Iterator[Cell]:
        for cell in cells:
            table.add(cell)
            yield cell
    write_geojson(paths[1], cell_features(stem, tabled(), mpp, outlines))
    write_atomically(paths[0], table.data())
    return paths
