"""Per-cell results agree with the counts DeepLIIF's postprocessing gives, cell for cell."""
from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path

import numpy as np

from deepliif.cells import (CELL_NAMESPACE, Cell, cell_features, cell_uuid, cells_csv, counted_cells, write_cells,
                            write_geojson)
from deepliif.label_stats import LabelledPixels, components
from deepliif.imageio import read_image
from deepliif.postprocessing import postprocess

from ..qupath_rules import assert_outlines_trace_the_cells, assert_qupath_imports, read_geojson


def list_features(image: str, cells, outlines) -> dict:
    """The FeatureCollection as a reader of the written file gets it (JSON, not the arrays it is made from)."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{image}.geojson"
        write_geojson(path, cell_features(image, cells, None, outlines))
        return json.loads(path.read_text())


def test_the_cell_table_lists_every_counted_cell_of_the_real_fixtures(deepliif_fixtures: Path) -> None:
    for tile in sorted((deepliif_fixtures / "postprocess").iterdir()):
        result = postprocess(read_image(tile / "IHC.png"), read_image(tile / "Seg.png"),
                             read_image(tile / "Marker.png"), 512)
        expected = json.loads((tile / "scoring_default.json").read_text())["scoring"]
        cells = result.cells
        assert len(cells) == expected["num_total"] > 0 and sum(c.positive for c in cells) == expected["num_pos"]
        for cell in cells:
            assert cell.bbox_x0 <= cell.centroid_x < cell.bbox_x1 and cell.bbox_y0 <= cell.centroid_y < cell.bbox_y1
            assert cell.area_px <= (cell.bbox_x1 - cell.bbox_x0) * (cell.bbox_y1 - cell.bbox_y0)
        rows = list(csv.DictReader(io.StringIO(cells_csv(cells, mpp=0.5).decode())))
        assert len(rows) == len(cells) and rows[0]["area_um2"] == str(round(cells[0].area_px * 0.25, 3))
        assert {row["classification"] for row in rows} <= {"Positive", "Negative"}
        points = assert_qupath_imports(json.loads(json.dumps(list_features(tile.name, cells, None))),
                                       expected, polygons=False)
        assert points[0]["geometry"]["coordinates"] == [cells[0].centroid_x, cells[0].centroid_y]
        assert points[0]["properties"]["classification"]["name"] == cells[0].classification


def test_centroids_bounding_boxes_and_areas_of_known_cells() -> None:
    mask = np.zeros((20, 30), bool)
    mask[2:5, 3:7] = True    # 3 x 4 rectangle
    mask[10:19, 20:21] = True  # a vertical line
    found = components(mask)
    pixels = LabelledPixels.of(found.labels, found.count)
    marker = np.zeros(mask.shape, np.int64)
    marker[2:5, 3:5] = 9  # 6 of the rectangle's 12 pixels
    cells = counted_cells(found, np.array([1, 2]), np.array([False, True, False]), np.array([0, 7, 200]),
                          pixels.image_sums(marker))
    assert [(c.centroid_x, c.centroid_y, c.bbox_x0, c.bbox_y0, c.bbox_x1, c.bbox_y1, c.area_px) for c in cells] == \
        [(4.5, 3.0, 3, 2, 7, 5, 12), (20.0, 14.0, 20, 10, 21, 19, 9)]
    assert [(c.id, c.classification, c.marker, c.marker_mean) for c in cells] == \
        [(1, "Positive", 7, 4.5), (2, "Negative", 200, 0.0)]


def test_qupath_imports_the_outlined_cells_of_the_real_fixtures(deepliif_fixtures: Path, tmp_path: Path) -> None:
    """Every counted cell is a valid polygon through exactly its own pixels, classes as the scoring counts;
    the file is the same on a second run (UUIDs derived from the image and the cell)."""
    for tile in sorted((deepliif_fixtures / "postprocess").iterdir()):
        result = postprocess(read_image(tile / "IHC.png"), read_image(tile / "Seg.png"),
                             read_image(tile / "Marker.png"), 512, outlines=True)
        (tmp_path / "a").mkdir(exist_ok=True)
        first = write_cells(tmp_path / "a", tile.name, result.cells, 0.5, result.outlines)
        features = assert_qupath_imports(read_geojson(first[1]), result.scoring)
        assert_outlines_trace_the_cells(features)
        assert features[0]["properties"]["measurements"]["Area µm^2"] == round(result.cells[0].area_px * 0.25, 3)
        (tmp_path / "b").mkdir(exist_ok=True)
        again = write_cells(tmp_path / "b", tile.name, result.cells, 0.5, result.outlines)
        assert again[1].read_bytes() == first[1].read_bytes()


def test_cell_ids_are_the_uuid5_of_image_cell_and_corner() -> None:
    """The ids are made from SHA-1 directly (for speed): they must be exactly the standard library's uuid5."""
    rng = np.random.default_rng(5)
    for image in ("IHC 1", "slide/ü", ""):
        for number, x0, y0 in rng.integers(0, 100_000, size=(200, 3)).tolist():
            cell = Cell(number, 1.0, 2.0, x0, y0, x0 + 1, y0 + 1, 1, True, 0, 0.0)
            made = cell_uuid(image, cell)
            assert made == str(uuid.uuid5(CELL_NAMESPACE, f"{image}/{number}/{x0},{y0}"))
            assert uuid.UUID(made).version == 5 and uuid.UUID(made).variant == uuid.RFC_4122


def test_outlines_of_thin_diagonal_and_one_pixel_cells_are_valid_polygons() -> None:
    """Shapes where pixel-centre tracing doubles back on itself: a one-pixel line, a diagonal chain
    (8-connected), a single pixel, a ring-like hook."""
    from deepliif.cell_outlines import OutlineTracer
    labels = np.zeros((30, 40), np.int32)
    labels[2, 3:15] = 1
    for k in range(6):
        labels[5 + k, 20 + k] = 2
    labels[20, 5] = 4
    labels[15:25, 25:35] = 3
    labels[17:23, 27:33] = 0
    labels[20, 27:29] = 3  # a spur into the hole
    labels[17:23, 30] = 0
    found = components(labels > 0)
    assert np.array_equal(found.labels, labels), "the shapes are numbered as they are drawn"
    count = found.count
    cells = counted_cells(found, np.arange(1, count + 1), np.zeros(count + 1, bool), np.zeros(count + 1, np.int64))
    tracer = OutlineTracer.for_cells(cells)
    tracer.add(0, labels)
    features = assert_qupath_imports(list_features("shapes", cells, tracer.outlines))
    assert_outlines_trace_the_cells(features)
    assert [len(f["geometry"]["coordinates"]) for f in features] == [1, 1, 2, 1]  # the hook has a hole


def test_cells_crossing_band_edges_far_apart_trace_as_in_one_band() -> None:
    """Cells that cross band edges are traced together, one canvas per group of columns: on a slide-wide
    band, cells thousands of columns apart (and one with a hole) get the outlines one band gives."""
    from deepliif.cell_outlines import OutlineTracer
    labels = np.zeros((24, 9000), np.int32)
    for x in (10, 4100, 8990 - 12):
        labels[3:20, x: x + 12] = 1
    labels[8:12, 4104:4108] = 0  # a hole
    labels[2:22:4, 6000:6003] = 1  # short cells that never cross a 5-row band edge
    found = components(labels > 0)
    count = found.count
    cells = counted_cells(found, np.arange(1, count + 1), np.zeros(count + 1, bool), np.zeros(count + 1, np.int64))
    whole = OutlineTracer.for_cells(cells)
    whole.add(0, found.labels)
    banded = OutlineTracer.for_cells(cells)
    for top in range(0, 24, 5):
        banded.add(top, found.labels[top: top + 5])
    assert sorted(banded.outlines) == sorted(whole.outlines) == list(range(1, count + 1))
    for cell_id, rings in whole.outlines.items():
        assert len(banded.outlines[cell_id]) == len(rings), cell_id
        for ring, other in zip(rings, banded.outlines[cell_id]):
            np.testing.assert_array_equal(other, ring, err_msg=str(cell_id))
    assert [len(whole.outlines[cell.id]) for cell in cells if cell.bbox_x0 == 4100] == [2]
