from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from deepliif.imageio import write_png
from deepliif.model_dir import Layout
from engine.cli import main
from engine.samples import synthetic_ihc


@pytest.fixture(scope="module")
def ihc_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "ihc.png"
    write_png(path, synthetic_ihc(1024, 1024, seed=11))
    return path


def _export(model_dir: Path, out: Path, image: Path, *extra: str) -> int:
    return main(["-q", "export", "onnx", "--model-dir", str(model_dir), "--out", str(out), "--images", str(image),
                 "--validation-tiles", "2", "--validation-batch-sizes", "1,2", *extra])


def test_export_onnx_validates_and_publishes(generated_models: dict[Layout, Path], ihc_image: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _export(generated_models[Layout.TORCHSCRIPT], tmp_path, ihc_image) == 0
    printed = capsys.readouterr().out
    assert "PASSED" in printed and "PSNR" in printed and "wrote" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deepliif.onnx", "export.json", "validation.json"]
    report = json.loads((tmp_path / "validation.json").read_text())
    assert report["passed"] and set(report["batches"]) == {"1", "2"} and report["tiles_from"] == "ihc.png"
    assert all(s["max_abs"] <= 1 for b in report["batches"].values() for s in b["outputs"].values())
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["config"] == {"opset": 17, "precision": "fp32", "per_generator": False}
    assert len(manifest["onnx_sha256"]) == 64 and manifest["timings"]["export_seconds"] > 0


def test_failed_validation_exits_non_zero_and_publishes_nothing(
        generated_models: dict[Layout, Path], ihc_image: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    assert _export(generated_models[Layout.CHECKPOINT], tmp_path, ihc_image, "--min-psnr", "200") == 2
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "PSNR" in captured.err
    assert not (tmp_path / "deepliif.onnx").exists()
    assert (tmp_path / "deepliif.onnx.failed-validation").is_file()
    assert json.loads((tmp_path / "validation.json").read_text())["passed"] is False


@pytest.mark.slow
def test_per_generator_export(generated_models: dict[Layout, Path], ihc_image: Path, tmp_path: Path) -> None:
    assert _export(generated_models[Layout.CHECKPOINT], tmp_path, ihc_image, "--per-generator") == 0
    report = json.loads((tmp_path / "validation.json").read_text())
    assert len(report["generators"]) == 9 and all(g["max_abs"] <= 1 for g in report["generators"].values())
    assert len(list((tmp_path / "generators").glob("*.onnx"))) == 9


def test_model_dir_without_weights(tmp_path: Path, ihc_image: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model").mkdir()
    assert _export(tmp_path / "model", tmp_path / "out", ihc_image) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out" / "deepliif.onnx").exists()


def test_unwritable_output(generated_models: dict[Layout, Path], ihc_image: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _export(generated_models[Layout.CHECKPOINT], blocker / "out", ihc_image) == 2
    assert "cannot create output directory" in capsys.readouterr().err


def test_tensorrt_refuses_a_file_that_is_not_onnx(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_text("definitely not protobuf")
    assert main(["export", "tensorrt", "--onnx", str(bogus), "--out", str(tmp_path / "plan")]) == 2
    assert "is not an ONNX model" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_without_tensorrt_says_what_to_install(fused_onnx: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "tensorrt", "--onnx", str(fused_onnx), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pip install" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_profile_is_an_argument_error(fused_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "tensorrt", "--onnx", str(fused_onnx), "--out", str(tmp_path), "--min-batch", "4",
                 "--max-batch", "2"]) == 2
    assert "min-batch <= opt-batch <= max-batch" in capsys.readouterr().err


def test_triton_from_onnx(fused_onnx: Path, tmp_path: Path) -> None:
    assert main(["-q", "export", "triton", "--onnx", str(fused_onnx), "--out", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "deepliif" / "config.pbtxt").is_file()
    assert (tmp_path / "repo" / "deepliif" / "1" / "model.onnx").is_file()


def test_triton_python_backend_from_the_cli(generated_models, tmp_path: Path, capsys) -> None:
    from deepliif.model_dir import Layout
    model_dir = generated_models[Layout.CHECKPOINT]
    assert main(["-q", "export", "triton", "--model-dir", str(model_dir), "--instance-kind", "cpu",
                 "--out", str(tmp_path / "repo")]) == 0  # auto: a model directory goes to the Python backend
    assert (tmp_path / "repo" / "deepliif" / "1" / "model.py").is_file()
    assert main(["export", "triton", "--backend", "onnxruntime", "--model-dir", str(model_dir),
                 "--out", str(tmp_path / "repo2")]) == 2
    assert "--model-dir is for --backend python" in capsys.readouterr().err
    assert not (tmp_path / "repo2").exists()
