"""Per-cell results: one row per counted cell, as a CSV table and as GeoJSON that QuPath imports.

Coordinates are level-0 pixels of the input (x right, y down); `offset` moves them when the image is a
region of something larger. Areas are also given in µm² when the pixel size is known.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from .imageio import write_atomically
from .label_stats import LabelledPixels

CLASS_COLOURS = {"Positive": -65536, "Negative": -16776961}  # QuPath's packed RGB: red, blue


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

    @property
    def classification(self) -> str:
        return "Positive" if self.positive else "Negative"


def counted_cells(labels: np.ndarray, pixels: LabelledPixels, label_ids: np.ndarray, sizes: np.ndarray,
                  positive: np.ndarray, marker: np.ndarray) -> list[Cell]:
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
                          int(marker[label])))
    return cells


def cells_csv(cells: list[Cell], mpp: float | None = None) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f.name for f in fields(Cell)] + ["area_um2", "classification"])
    for cell in cells:
        area = "" if mpp is None else round(cell.area_px * mpp * mpp, 3)
        writer.writerow([*astuple(cell), area, cell.classification])
    return out.getvalue().encode()


def cells_geojson(cells: list[Cell], mpp: float | None = None) -> bytes:
    """A FeatureCollection of cell centroids as QuPath detections, classified Positive/Negative."""
    features = []
    for cell in cells:
        properties = {"objectType": "detection", "id": cell.id, "area_px": cell.area_px, "marker": cell.marker,
                      "classification": {"name": cell.classification, "color": CLASS_COLOURS[cell.classification]}}
        if mpp is not None:
            properties["area_um2"] = round(cell.area_px * mpp * mpp, 3)
        features.append({"type": "Feature", "id": str(cell.id), "properties": properties,
                         "geometry": {"type": "Point", "coordinates": [cell.centroid_x, cell.centroid_y]}})
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def write_cells(out: Path, stem: str, cells: list[Cell], mpp: float | None = None) -> list[Path]:
    paths = [Path(out) / f"{stem}_cells.csv", Path(out) / f"{stem}_cells.geojson"]
    write_atomically(paths[0], cells_csv(cells, mpp))
    write_atomically(paths[1], cells_geojson(cells, mpp))
    return paths
