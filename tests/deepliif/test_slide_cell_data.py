"""A slide's cell data, written band by band, equals DeepLIIF 1.2.7's for the same pixels as one image."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from deepliif.cell_data import read_cell_data
from deepliif.scoring_rules import PostprocessOptions
from deepliif.slide_cell_data import open_slide_cell_data
from deepliif.slide_overlays import draw_slide
from deepliif.slide_scoring import score_slide

from .bands import array_bands
from .test_postprocessing import _load, _tiles
from .test_slide_scoring import on_glass


def write_slide_cell_data(out: Path, ihc: np.ndarray, seg: np.ndarray, marker: np.ndarray | None, rows: int,
                          version: int, options: PostprocessOptions = PostprocessOptions(), threads: int = 2) -> Path:
    height, width = seg.shape[:2]
    bands = array_bands(seg, marker, rows, ihc)
    score = score_slide(bands, width, height, 512, marker is not None, options, threads)
    with open_slide_cell_data(out, "slide", score, version, options, marker is not None, width) as cell_data:
        draw_slide(lambda top, count: ihc[top: top + count], score, width, height,
                   lambda top, overlaid, refined: None, threads, cell_data=cell_data)
    return out / "slide_cells.json.gz"


@pytest.mark.parametrize("version", [3, 4, 5, 6])
def test_slide_cell_data_equals_deepliif_127_for_each_fixture_tile(deepliif_fixtures: Path, tmp_path: Path,
                                                                    version: int) -> None:
    """Bands of 29 rows cut through most cells; the file still equals the package's, field for field."""
    for tile in _tiles(deepliif_fixtures):
        ihc, seg, marker = _load(tile)
        path = write_slide_cell_data(tmp_path, ihc, seg, marker, 29, version)
        reference = deepliif_fixtures / "postprocess-1.2.7" / tile.name / f"cells_v{version}.json"
        expected = json.loads(reference.read_text())
        assert json.loads(gzip.decompress(path.read_bytes())) == expected and len(expected["cells"]) > 100


def test_slide_cell_data_of_cells_on_glass_reads_back(deepliif_fixtures: Path, tmp_path: Path) -> None:
    """Fixture tiles at unaligned offsets on a larger canvas, cut in one-row and in 97-row bands: the
    same records, which `read_cell_data` (and so `rescore`) reads from the .gz file."""
    from deepliif.postprocessing import postprocess
    orig, seg, marker = on_glass(deepliif_fixtures)
    expected = postprocess(orig, seg, marker, 512, cell_data=3).cell_data
    for rows in (1, 97):
        path = write_slide_cell_data(tmp_path, orig, seg, marker, rows, 3, threads=1)
        cells, settings, version = read_cell_data(path)
        assert version == 3 and settings == expected["settings"], rows
        assert json.loads(json.dumps(cells)) == json.loads(json.dumps(expected["cells"])), rows


def test_a_failed_pass_leaves_no_cell_data_file(deepliif_fixtures: Path, tmp_path: Path) -> None:
    ihc, seg, marker = _load(_tiles(deepliif_fixtures)[0])
    score = score_slide(array_bands(seg, marker, 64), seg.shape[1], seg.shape[0], 512, True)
    with pytest.raises(RuntimeError, match="never traced"):
        with open_slide_cell_data(tmp_path, "slide", score, 3, PostprocessOptions(), True, seg.shape[1]):
            pass  # no band handed over
    assert list(tmp_path.iterdir()) == []


def test_a_slide_without_cells_writes_an_empty_cell_list(tmp_path: Path) -> None:
    glass = np.full((300, 200, 3), 236, np.uint8)
    path = write_slide_cell_data(tmp_path, glass, np.zeros_like(glass), np.zeros_like(glass), 64, 6)
    cells, settings, version = read_cell_data(path)
    assert cells == [] and version == 6 and settings["seg_thresh"] == 120
