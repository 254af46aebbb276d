"""Real scanner files through `infer`: an Aperio SVS, a DICOM whole-slide image, a damaged SVS."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest

from deepliif.imageio import read_image
from deepliif.model_dir import Layout
from engine.cli import main

from ..deepliif.test_slides import SLIDE_OUTPUTS
from ..qupath_rules import assert_qupath_imports, read_geojson


def infer(model: Path, out: Path, *inputs: Path) -> int:
    return main(["-q", "infer", "--model-dir", str(model), "--backend", "onnxruntime", "--device", "cpu",
                 "--out", str(out), *map(str, inputs)])


@pytest.mark.slow
def test_a_real_aperio_svs_is_tiled_by_its_magnification_and_its_outputs_open_in_openslide(
        generated_models: dict[Layout, Path], slide_fixtures: Path, tmp_path: Path) -> None:
    svs = slide_fixtures / "CMU-1-Small-Region.svs"
    assert infer(generated_models[Layout.TORCHSCRIPT], tmp_path, svs) == 0
    record = json.loads((tmp_path / "CMU-1-Small-Region.json").read_text())
    assert (record["tile_size"], record["tile_size_from"]) == (256, "magnification")  # 20x
    assert record["slide"]["mpp"] == pytest.approx(0.499) and record["slide"]["width"] == 2220
    for name in SLIDE_OUTPUTS:
        with openslide.OpenSlide(str(tmp_path / f"CMU-1-Small-Region_{name}.ome.tif")) as opened:
            assert opened.level_count == record["outputs"][name]["levels"] >= 4, name
            assert opened.dimensions == (2220, 2967)
            assert float(opened.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.499, abs=1e-3)
    assert_qupath_imports(read_geojson(tmp_path / "CMU-1-Small-Region_cells.geojson.gz"), record["scoring"])


def test_a_dicom_slide_smaller_than_a_tile_goes_through_the_image_path(
        generated_models: dict[Layout, Path], slide_fixtures: Path, tmp_path: Path) -> None:
    dicom = slide_fixtures / "boxes_0.dcm"
    assert infer(generated_models[Layout.TORCHSCRIPT], tmp_path, dicom) == 0
    record = json.loads((tmp_path / "boxes_0.json").read_text())
    assert record["tiles"] == 1 and set(record["scoring"]) >= {"num_total", "num_pos"}
    with openslide.OpenSlide(str(dicom)) as opened:
        assert opened.dimensions == (16, 16)
    for name in SLIDE_OUTPUTS:
        assert read_image(tmp_path / f"boxes_0_{name}.png").shape == (16, 16, 3), name
    assert np.any(read_image(tmp_path / "boxes_0_SegOverlaid.png"))  # the input shows through


def test_a_damaged_svs_exits_2_naming_the_file_and_leaves_nothing_visible(
        generated_models: dict[Layout, Path], slide_fixtures: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    damaged = slide_fixtures / "unreadable.svs"
    out = tmp_path / "out"
    assert infer(generated_models[Layout.TORCHSCRIPT], out, damaged) == 2
    assert "unreadable.svs" in capsys.readouterr().err
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
