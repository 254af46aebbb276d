"""Per-cell results agree with the counts DeepLIIF's postprocessing gives, cell for cell."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from deepliif.cells import cells_csv, cells_geojson, counted_cells
from deepliif.label_stats import LabelledPixels
from deepliif.imageio import read_image
from deepliif.postprocessing import postprocess


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
        features = json.loads(cells_geojson(cells))["features"]
        assert len(features) == len(cells)
        assert features[0]["geometry"]["coordinates"] == [cells[0].centroid_x, cells[0].centroid_y]
        assert features[0]["properties"]["classification"]["name"] == cells[0].classification


def test_centroids_bounding_boxes_and_areas_of_known_cells() -> None:
    labels = np.zeros((20, 30), np.int32)
    labels[2:5, 3:7] = 1    # 3 x 4 rectangle
    labels[10:19, 20:21] = 2  # a vertical line
    sizes = np.bincount(labels.ravel())
    cells = counted_cells(labels, LabelledPixels.of(labels, 2), np.array([1, 2]), sizes, np.array([False, True, False]), np.array([0, 7, 200]))
    assert [(c.centroid_x, c.centroid_y, c.bbox_x0, c.bbox_y0, c.bbox_x1, c.bbox_y1, c.area_px) for c in cells] == \
        [(4.5, 3.0, 3, 2, 7, 5, 12), (20.0, 14.0, 20, 10, 21, 19, 9)]
    assert [(c.id, c.classification, c.marker) for c in cells] == [(1, "Positive", 7), (2, "Negative", 200)]
