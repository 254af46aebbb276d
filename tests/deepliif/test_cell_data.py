"""DeepLIIF 1.2.7's per-cell data, field for field, and re-scoring from it alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepliif.cell_data import (decode_cell, encode_cell, from_base92, full_contour, read_cell_data, simple_contour,
                                to_base92, trace_boundary)
from deepliif.errors import ArgumentError
from deepliif.imageio import read_image
from deepliif.postprocessing import postprocess
from deepliif.rescore import rescore
from deepliif.scoring_rules import PostprocessOptions

from .test_postprocessing import _load, _tiles


@pytest.mark.parametrize("version", [3, 4, 5, 6])
def test_cell_data_equals_deepliif_127_field_for_field(deepliif_fixtures: Path, version: int) -> None:
    for tile in _tiles(deepliif_fixtures):
        result = postprocess(*_load(tile), 512, cell_data=version)
        expected = json.loads((deepliif_fixtures / "postprocess-1.2.7" / tile.name / f"cells_v{version}.json").read_text())
        assert json.loads(json.dumps(result.cell_data)) == expected and len(expected["cells"]) > 100


def rescore_cases(fixtures: Path):
    for tile in _tiles(fixtures):
        folder = fixtures / "postprocess-1.2.7" / tile.name
        for case, spec in json.loads((folder / "reference.json").read_text())["cases"].items():
            if case.startswith("rescore"):
                yield folder, case, spec


def test_rescoring_from_cell_data_alone_equals_deepliif_127(deepliif_fixtures: Path) -> None:
    """Counts and both images from the cells file and the IHC, without the Seg: pixel for pixel."""
    cases = list(rescore_cases(deepliif_fixtures))
    assert {case for _, case, _ in cases} >= {"rescore_v3_default", "rescore_v4_marker_default", "rescore_v6_od_lower"}
    for folder, case, spec in cases:
        arguments = dict(spec["arguments"])
        cells, settings, version = read_cell_data(folder / arguments.pop("cells"))
        ihc = read_image(deepliif_fixtures / "postprocess" / folder.name / "IHC.png")
        result = rescore(cells, settings, version, ihc, PostprocessOptions(**arguments))
        assert result.scoring == spec["scoring"], (folder.name, case)
        np.testing.assert_array_equal(result.overlaid, read_image(folder / f"{case}_SegOverlaid.png"), err_msg=case)
        np.testing.assert_array_equal(result.refined, read_image(folder / f"{case}_SegRefined.png"), err_msg=case)


def test_tracing_contours_and_packing_of_small_shapes() -> None:
    inside = np.zeros((6, 7), bool)
    inside[1:4, 1:5] = True  # a 3 x 4 rectangle
    inside[4, 5] = True  # a diagonal spur
    bbox, boundary = trace_boundary(inside, 1, 1)
    assert bbox == [(1, 1), (5, 4)]
    assert simple_contour(boundary) == [(1, 1), (4, 1), (4, 3), (5, 4), (4, 3), (1, 3)]
    assert full_contour(simple_contour(boundary)) == boundary
    assert trace_boundary(np.pad(np.ones((1, 1), bool), 1), 1, 1) == ([(1, 1), (1, 1)], [(1, 1)])
    assert to_base92([0, 91, 92, 8463]) == ["##", "#~", "$#", "~~"] and from_base92("$#") == 92
    cell = {"size": 13, "positive": True, "marker": 200, "bbox": [(1, 1), (5, 4)], "centroid": (3, 2),
            "boundary": simple_contour(boundary)}
    long_run = {**cell, "bbox": [(0, 0), (30, 1)], "boundary": [(0, 0), (30, 0), (30, 1), (0, 1)]}
    for original in (cell, long_run):
        assert decode_cell(encode_cell(original, "marker"), "marker") == original


def test_malformed_cell_data_is_refused_naming_the_field(tmp_path: Path) -> None:
    cases = {"not json": "{", "version": {"dataVersion": 7, "cells": [], "settings": {}},
             "settings": {"dataVersion": 3, "cells": [], "settings": {"seg_thresh": 120}},
             "cells": {"dataVersion": 3, "cells": {}, "settings": {"default_size_thresh": 1, "seg_thresh": 1}},
             "marker": {"dataVersion": 3, "settings": {"default_size_thresh": 1, "seg_thresh": 1},
                        "cells": [{"size": 5, "positive": True, "od": 3, "boundary": [[1, 1]]}]}}
    messages = {"not json": "not a readable cell-data", "version": "dataVersion must be one of",
                "settings": "default_size_thresh", "cells": "cells must be a list", "marker": "cell 0 lacks marker"}
    for name, content in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ArgumentError, match=messages[name]):
            read_cell_data(path)
    good = {"dataVersion": 3, "settings": {"default_size_thresh": 1, "seg_thresh": 120},
            "cells": [{"size": 5, "positive": True, "marker": 3, "boundary": [[40, 1]]}]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    with pytest.raises(ArgumentError, match="outside the 10x10 image"):
        rescore(*read_cell_data(tmp_path / "good.json"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ArgumentError, match="no default_marker_thresh"):
        rescore(*read_cell_data(tmp_path / "good.json"), np.zeros((50, 50, 3), np.uint8),
                PostprocessOptions(marker_thresh="default"))
