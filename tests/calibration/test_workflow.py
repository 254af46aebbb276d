from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from calibration.gate import ACCURACY_FILE, REPORT_FILE, GateThresholds, evaluate
from engine.artifacts import SANITY_FILE
from calibration.quantize import QuantizationConfig
from calibration.tiles import CALIBRATION_FILE, CalibrationSet
from calibration.workflow import FAILED_SUFFIX, CalibrationPlan, calibrate
from deepliif.errors import ArgumentError, ModelDirError
from deepliif.imageio import file_sha256
from deepliif.model_dir import Layout
from engine.errors import AccuracyGateError, ArtifactError, BackendUnavailableError
from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.cli import main
from engine.session import Session
from engine.samples import synthetic_ihc
from engine.backends.precision import Precision


@pytest.fixture(scope="module")
def model_dir(generated_models: dict[Layout, Path]) -> Path:
    return generated_models[Layout.CHECKPOINT]


@pytest.fixture(scope="module")
def plan(model_dir: Path, ihc_images: list[Path], fp32_onnx: Path, tmp_path_factory) -> CalibrationPlan:
    return CalibrationPlan(model_dir, tuple(ihc_images), tmp_path_factory.mktemp("int8"), tiles=2,
                           quantization=QuantizationConfig("minmax"), fp32_onnx=fp32_onnx)


@pytest.fixture(scope="module")
def calibrated(plan: CalibrationPlan) -> dict:
    return calibrate(plan)


def test_a_passing_calibration_publishes_the_graph_with_its_report(calibrated: dict, plan: CalibrationPlan) -> None:
    out = plan.out
    assert calibrated["passed"] and (out / "deepliif.onnx").is_file()
    assert not (out / ("deepliif.onnx" + FAILED_SUFFIX)).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left behind
    report = json.loads((out / ACCURACY_FILE).read_text())
    assert report["onnx_sha256"] == file_sha256(out / "deepliif.onnx")
    assert report["precision"] == "int8" and report["quantization"]["method"] == "minmax"
    assert "PASSED" in (out / REPORT_FILE).read_text()
    chosen = CalibrationSet.read(out / CALIBRATION_FILE)
    held_out = {Path(p).name for p in report["holdout"]}
    assert len(held_out) == 1 and not held_out & {Path(t.source).name for t in chosen.tiles}
    for entry in report["images"]:  # finite, bounded differences, stated per output
        for stats in entry["outputs"].values():
            assert 0 <= stats["max_abs"] <= 255 and stats["mean_abs"] < 40
            assert stats["psnr_db"] is None or 10 < stats["psnr_db"] < 200


@pytest.mark.slow
def test_same_inputs_and_seed_give_the_same_tiles_and_scales(calibrated: dict, plan: CalibrationPlan,
                                                              tmp_path: Path) -> None:
    again = calibrate(replace(plan, out=tmp_path))
    assert (tmp_path / CALIBRATION_FILE).read_text() == (plan.out / CALIBRATION_FILE).read_text()
    assert again["onnx_sha256"] == calibrated["onnx_sha256"]  # same graph, byte for byte


def _break_a_scale(source: Path, target: Path, prefix: str) -> str:
    """Grow the last activation scale of one generator 1000-fold: that tensor rounds to zero."""
    model = onnx.load(str(source))
    inits = {i.name: i for i in model.graph.initializer}
    node = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.name.startswith(prefix)
            and n.input[0] not in inits][-1]
    scale = inits[node.input[1]]
    value = numpy_helper.to_array(scale)
    scale.CopyFrom(numpy_helper.from_array((value * 1e3).astype(value.dtype), scale.name))  # fp16 scales stay fp16
    onnx.save(model, str(target))
    return node.name


def test_a_deliberately_broken_scale_fails_the_gate(calibrated: dict, plan: CalibrationPlan, fp32_onnx: Path,
                                                    tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    _break_a_scale(plan.out / "deepliif.onnx", broken, "/translators.0/")
    images = [("synthetic.png", synthetic_ihc(seed=20))]
    limits = GateThresholds(min_psnr=27.0)  # measured: good Hema 29.9 dB, the broken one 24.2 dB
    with OnnxRuntimeBackend(fp32_onnx, "cpu") as fp32, \
            OnnxRuntimeBackend(plan.out / "deepliif.onnx", "cpu") as good, OnnxRuntimeBackend(broken, "cpu") as bad:
        good_report, bad_report = evaluate(fp32, good, images, limits), evaluate(fp32, bad, images, limits)
    assert good_report["passed"], good_report["failures"]
    assert not bad_report["passed"]
    assert any("Hema PSNR" in failure for failure in bad_report["failures"])
    assert bad_report["worst_psnr_db"]["Hema"] < good_report["worst_psnr_db"]["Hema"] - 4


@pytest.mark.slow
def test_a_failing_gate_publishes_nothing_under_the_served_name(plan: CalibrationPlan, tmp_path: Path) -> None:
    strict = replace(plan, out=tmp_path, thresholds=GateThresholds(min_psnr=99.0))
    with pytest.raises(AccuracyGateError, match=r"worst image ihc\d\.png") as caught:
        calibrate(strict)
    assert not (tmp_path / "deepliif.onnx").exists()
    assert (tmp_path / ("deepliif.onnx" + FAILED_SUFFIX)).is_file()
    report = json.loads((tmp_path / ACCURACY_FILE).read_text())
    assert report["passed"] is False and report["failures"] == caught.value.failures


def test_the_engine_serves_a_gated_int8_graph_and_refuses_others(calibrated: dict, plan: CalibrationPlan,
                                                                 model_dir: Path, tiny_models: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    graph = plan.out / "deepliif.onnx"
    with Session(model_dir, precision="int8", onnx=graph, cache_dir=tmp_path) as session:
        outputs = session.run(synthetic_ihc(seed=5)[None])
        assert session.info.name == "onnxruntime" and session.accuracy["passed"]
    assert outputs["Seg"].shape == (1, 512, 512, 3)
    with pytest.raises(BackendUnavailableError, match="calibrate"):
        Session(model_dir, precision="int8", cache_dir=tmp_path)
    with pytest.raises(ArgumentError, match="is a int8 graph; precision fp32"):
        Session(model_dir, precision="fp32", onnx=graph, cache_dir=tmp_path)
    with pytest.raises(ArtifactError, match="another model"):
        Session(tiny_models["tiny-v2"], precision="int8", onnx=graph, cache_dir=tmp_path)
    ungated = tmp_path / "ungated"
    ungated.mkdir()
    shutil.copy(graph, ungated / "deepliif.onnx")
    with pytest.raises(AccuracyGateError, match="no accuracy report"):
        Session(model_dir, precision="int8", onnx=ungated / "deepliif.onnx", cache_dir=tmp_path)
    with Session(model_dir, precision="int8", onnx=ungated / "deepliif.onnx", cache_dir=tmp_path,
                 force_ungated=True) as forced:
        assert forced.accuracy is None


@pytest.mark.slow
def test_a_cached_fp16_export_is_served_only_gated_or_forced(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AccuracyGateError, match="calibrate --precision fp16"):
        Session(model_dir, backend="onnxruntime", precision="fp16", device="cpu", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*/deepliif.onnx"))  # refused before anything was exported
    with Session(model_dir, backend="onnxruntime", precision="fp16", device="cpu", cache_dir=tmp_path,
                 force_ungated=True) as session:
        assert session.accuracy is None and session.provenance.sanity.passed
    assert not list(tmp_path.glob("*/" + ACCURACY_FILE))  # a one-tile sanity check is not a gate report
    (check,) = tmp_path.glob("*/" + SANITY_FILE)
    assert json.loads(check.read_text())["onnx_sha256"] == file_sha256(check.parent / "deepliif.onnx")
    check.unlink()  # a cache entry without its check is rebuilt, not served
    with Session(model_dir, backend="onnxruntime", precision="fp16", device="cpu", cache_dir=tmp_path,
                 force_ungated=True):
        pass
    assert check.is_file()


def test_fp16_is_gated_on_every_image(model_dir: Path, ihc_images: list[Path], fp32_onnx: Path,
                                      tmp_path: Path) -> None:
    report = calibrate(CalibrationPlan(model_dir, tuple(ihc_images[:1]), tmp_path, Precision.FP16,
                                       fp32_onnx=fp32_onnx))
    assert report["passed"] and len(report["images"]) == 1 and "calibration" not in report
    assert not (tmp_path / CALIBRATION_FILE).exists()


def test_bad_input_is_refused_with_the_reason(model_dir: Path, ihc_images: list[Path], blank_image: Path,
                                              tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="at least two --images"):
        calibrate(CalibrationPlan(model_dir, tuple(ihc_images[:1]), tmp_path))
    with pytest.raises(ArgumentError, match="no such image file"):
        CalibrationPlan(model_dir, (tmp_path / "nope.png",), tmp_path)
    with pytest.raises(ArgumentError, match="fp32 needs no gate"):
        CalibrationPlan(model_dir, tuple(ihc_images), tmp_path, Precision.FP32)
    with pytest.raises(ArgumentError, match="also calibration images"):
        calibrate(CalibrationPlan(model_dir, tuple(ihc_images[:2]), tmp_path, holdout=(ihc_images[0],)))
    with pytest.raises(ArgumentError, match="no non-empty tiles"):
        calibrate(CalibrationPlan(model_dir, (blank_image,), tmp_path, holdout=(ihc_images[0],)))
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelDirError):
        calibrate(CalibrationPlan(empty, tuple(ihc_images), tmp_path))


@pytest.mark.slow
def test_the_command_exits_non_zero_naming_the_worst_image(model_dir: Path, ihc_images: list[Path],
                                                           fp32_onnx: Path, tmp_path: Path, capsys) -> None:
    args = ["-q", "calibrate", "--model-dir", str(model_dir), "--images", *map(str, ihc_images), "--tiles", "1",
            "--method", "minmax", "--fp32-onnx", str(fp32_onnx), "--out", str(tmp_path)]
    assert main([*args, "--min-psnr", "99"]) == 2
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "worst image ihc" in captured.err
    assert main(args) == 0
    assert "gate passed" in capsys.readouterr().out and (tmp_path / "deepliif.onnx").is_file()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_export_tensorrt_builds_only_from_a_gated_reduced_precision_graph(calibrated: dict, plan: CalibrationPlan,
                                                                          tmp_path: Path, capsys) -> None:
    ungated = tmp_path / "ungated.onnx"
    shutil.copy(plan.out / "deepliif.onnx", ungated)
    assert main(["export", "tensorrt", "--onnx", str(ungated), "--out", str(tmp_path / "a")]) == 2
    assert "no accuracy report" in capsys.readouterr().err
    # the gated graph gets past the gate and stops only at the missing TensorRT
    assert main(["export", "tensorrt", "--onnx", str(plan.out / "deepliif.onnx"), "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err
    assert "tensorrt" in error.lower() and "accuracy" not in error
