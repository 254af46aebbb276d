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
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields
from enum import Enum
from pathlib import Path

import numpy as np
from scipy import ndimage

from .imageio import open_stream, write_atomically
from .label_stats import LabelledPixels

Outline = list[np.ndarray]  # closed (n, 2) rings of level-0 (x, y): the shell, then any holes

CLASS_COLOURS = {"Positive": (255, 0, 0), "Negative": (0, 0, 255)}  # QuPath's own: red, blue
# The namespace of cell UUIDs: uuid5 of it and "<image>/<cell>" names a cell the same way every run.
CELL_NAMESPACE = uuid.UUID("0f0b7a3e-5d1c-4e57-9a59-6c2f1d7e4b21")


class CellGeometry(str, Enum):
    """`--cell-geometry`: each cell's outline (default) or its centroid."""
    POLYGONS = "polygons"
    POINTS = "points"


@dataclass(frozen=True)
class Cell:
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


def counted_cells(labels: np.ndarray, pixels: LabelledPixels, label_ids: np.ndarray, sizes: np.ndarray,
                  positive: np.ndarray, marker: np.ndarray, marker_sum: np.ndarray | None = None) -> list[Cell]:
    """The cells `label_ids` of a label image, numbered 1.. in raster order of their labels. Centroids are
    the bounding box's corner plus the mean offset from it, rounded to 2 places by Python's `round`.
    Bounding boxes come from `ndimage.find_objects`, which frees the GIL (this runs beside the overlays)."""
    boxes = ndimage.find_objects(labels, max_label=pixels.count)
    rows, cols = pixels.coordinates()
    sum_x, sum_y = pixels.sums(cols), pixels.sums(rows)
    cells = []
    for number, label in enumerate(label_ids.tolist(), start=1):
        box_rows, box_cols = boxes[label - 1]
        area = int(sizes[label])
        mean_x = (int(sum_x[label]) - area * box_cols.start) / area
        mean_y = (int(sum_y[label]) - area * box_rows.start) / area
        cells.append(Cell(number, round(box_cols.start + mean_x, 2), round(box_rows.start + mean_y, 2),
                          box_cols.start, box_rows.start, box_cols.stop, box_rows.stop, area, bool(positive[label]),
                          int(marker[label]), 0.0 if marker_sum is None else round(int(marker_sum[label]) / area, 2)))
    return cells


def cells_csv(cells: list[Cell], mpp: float | None = None) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f.name for f in fields(Cell)] + ["area_um2", "classification"])
    for cell in cells:
        area = "" if mpp is None else round(cell.area_px * mpp * mpp, 3)
        writer.writerow([*astuple(cell), area, cell.classification])
    return out.getvalue().encode()


def cell_uuid(image: str, cell: Cell) -> str:
    """The same UUID for the same cell of the same image, every run (QuPath keeps only UUID ids)."""
    return str(uuid.uuid5(CELL_NAMESPACE, f"{image}/{cell.id}/{cell.bbox_x0},{cell.bbox_y0}"))


def cell_features(image: str, cells: list[Cell], mpp: float | None,
                  outlines: dict[int, Outline] | None) -> Iterator[dict]:
    """One GeoJSON feature per cell: its outline from `outlines` (cell id -> rings), else its centroid."""
    for cell in cells:
        rings = None if outlines is None else outlines.get(cell.id)
        geometry = {"type": "Polygon", "coordinates": [ring.tolist() for ring in rings]} if rings else \
            {"type": "Point", "coordinates": [cell.centroid_x, cell.centroid_y]}
        yield {"type": "Feature", "id": cell_uuid(image, cell), "geometry": geometry,
               "properties": {"objectType": "detection", "name": f"cell {cell.id}",
                              "classification": {"name": cell.classification,
                                                 "color": list(CLASS_COLOURS[cell.classification])},
                              "isLocked": False, "measurements": cell.measurements(mpp)}}


def write_geojson(path: Path, features: Iterator[dict]) -> None:
    """A FeatureCollection written feature by feature (gzip if `path` ends in .gz), then renamed into place."""
    with open_stream(path) as stream:
        stream.write(b'{"type": "FeatureCollection", "features": [')
        for index, feature in enumerate(features):
            stream.write((", " if index else "\n").encode() + json.dumps(feature, ensure_ascii=False).encode())
        stream.write(b"\n]}\n")


def cells_file_names(stem: str, slide: bool = False) -> dict[str, str]:
    return {"csv": f"{stem}_cells.csv", "geojson": f"{stem}_cells.geojson" + (".gz" if slide else "")}


def write_cells(out: Path, stem: str, cells: list[Cell], mpp: float | None = None,
                outlines: dict[int, Outline] | None = None, slide: bool = False) -> list[Path]:
    names = cells_file_names(stem, slide)
    paths = [Path(out) / names["csv"], Path(out) / names["geojson"]]
    write_atomically(paths[0], cells_csv(cells, mpp))
    write_geojson(paths[1], cell_features(stem, cells, mpp, outlines))
    return paths
