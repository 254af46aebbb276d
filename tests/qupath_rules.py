"""What QuPath (0.4-0.7) requires of an imported GeoJSON of detections, checked on what this project writes.

QuPath's importer (GsonTools / QuPathTypeAdapters) reads a classification colour only as [r, g, b], keeps
only UUID ids, reads numbers only from `measurements`, and builds geometries with JTS, which refuses
polygons that are not closed or that cross themselves. The rules are applied here so a test fails where
QuPath would.
"""
from __future__ import annotations

import gzip
import json
import math
import uuid
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import shape

ALLOWED_PROPERTIES = {"objectType", "name", "classification", "isLocked", "measurements", "nucleusGeometry"}


def read_geojson(path: Path) -> dict:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(data)


def assert_qupath_imports(collection: dict, scoring: dict | None = None, polygons: bool = True) -> list[dict]:
    """Every rule on every feature; the counts per class equal `scoring`'s. Returns the features."""
    assert collection["type"] == "FeatureCollection"
    features, ids, classes = collection["features"], set(), {"Positive": 0, "Negative": 0}
    for feature in features:
        assert feature["type"] == "Feature"
        assert str(uuid.UUID(feature["id"])) == feature["id"] and feature["id"] not in ids
        ids.add(feature["id"])
        properties = feature["properties"]
        assert set(properties) <= ALLOWED_PROPERTIES, set(properties) - ALLOWED_PROPERTIES
        assert properties["objectType"] in ("detection", "cell")
        classification = properties["classification"]
        colour = classification["color"]
        assert isinstance(colour, list) and len(colour) == 3 and all(
            isinstance(c, int) and 0 <= c <= 255 for c in colour), colour
        classes[classification["name"]] += 1
        measurements = properties["measurements"]
        assert isinstance(measurements, dict) and measurements
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in measurements.values()), measurements
        geometry = feature["geometry"]
        if polygons:
            assert geometry["type"] == "Polygon"
            for ring in geometry["coordinates"]:
                assert len(ring) >= 4 and ring[0] == ring[-1]
            polygon = shape(geometry)
            assert polygon.is_valid, shapely.is_valid_reason(polygon)
            assert polygon.area > 0
        else:
            assert geometry["type"] == "Point" and len(geometry["coordinates"]) == 2
    if scoring is not None:
        assert (classes["Positive"], sum(classes.values())) == (scoring["num_pos"], scoring["num_total"])
    return features


def pixels_inside(feature: dict) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) of the pixels whose centres the feature's polygon contains."""
    polygon = shape(feature["geometry"])
    x0, y0, x1, y1 = polygon.bounds
    xs, ys = np.meshgrid(np.arange(math.floor(x0), math.ceil(x1)), np.arange(math.floor(y0), math.ceil(y1)))
    inside = shapely.contains_xy(polygon, xs + 0.5, ys + 0.5)
    return xs[inside], ys[inside]


def assert_outlines_trace_the_cells(features: list[dict]) -> None:
    """Each polygon holds exactly its cell's pixel count, and those pixels' mean is the cell's centroid."""
    for feature in features:
        measurements = feature["measurements"] if "measurements" in feature else feature["properties"]["measurements"]
        xs, ys = pixels_inside(feature)
        assert len(xs) == measurements["Area px"], feature["properties"]["name"]
        assert round(float(xs.mean()), 2) == measurements["Centroid X px"]
        assert round(float(ys.mean()), 2) == measurements["Centroid Y px"]
