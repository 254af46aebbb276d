from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepliif.errors import ArgumentError, ModelDirError
from engine.cli import main
from engine.edi.standin.runtime import TaskContext, chain_tasks
from engine.edi.standin.runtime import load_kernel
from engine.edi.kernel.settings import KernelSettings, model_environment
from engine.session import Session

from .conftest import ROOT

MODEL_JSON = (ROOT / "model.json").read_text()


def test_model_json_has_the_edi_fields_and_its_environment_applies() -> None:
    record = json.loads(MODEL_JSON)
    assert {"name", "kernel_path", "readme", "runtime", "tag", "weight_path", "schema_version",
            "mk_environments"} <= set(record)
    assert (ROOT / record["kernel_path"]).is_file() and (ROOT / record["readme"]).is_file()
    profile = json.loads((ROOT / "model-profile.json").read_text())
    assert profile["kernel"]["gpu"] == "exclusive"
    assert "ncpus_limit=" in profile["resource_allocation"]["kernel"]["resources"]
    assert {"task_execution_timeout", "task_batch_size"} <= set(profile["policy"])
    settings = KernelSettings.from_environment({"REDHARE_MODEL_PATH": "/sub", "DEEPLIIF_PRECISION": "fp16",
                                                "MSD_POD_NAME": "p1"}, MODEL_JSON)
    assert settings.model_dir == Path("/sub/model") and settings.precision == "fp16"  # environment wins
    assert settings.backend == "auto" and settings.sync_budget_s == 45.0 and settings.pod == "p1"
    assert settings.max_request_bytes == 256 << 20 and settings.state_root == Path("/sub")
    assert model_environment(MODEL_JSON)["DEEPLIIF_SYNC_BUDGET_S"] == "45"
    assert settings.pyramid_compression.value == "jpeg"  # the CLI's default
    lossless = KernelSettings.from_environment({"DEEPLIIF_MODEL_DIR": "m", "DEEPLIIF_PYRAMID_COMPRESSION": "zstd"})
    assert lossless.pyramid_compression.value == "zstd"


@pytest.mark.parametrize("environ, problem", [
    ({}, "no model directory"),
    ({"DEEPLIIF_MODEL_DIR": "m", "DEEPLIIF_SYNC_BUDGET_S": "soon"}, "DEEPLIIF_SYNC_BUDGET_S must be a number"),
    ({"DEEPLIIF_MODEL_DIR": "m", "DEEPLIIF_MAX_REQUEST_MB": "0"}, "must be positive"),
    ({"DEEPLIIF_MODEL_DIR": "m", "DEEPLIIF_CPD_URL": "https://cpd"}, "missing DEEPLIIF_CPD_API_KEY"),
    ({"DEEPLIIF_MODEL_DIR": "m", "DEEPLIIF_PYRAMID_COMPRESSION": "png"},
     "DEEPLIIF_PYRAMID_COMPRESSION must be one of jpeg, zstd, deflate; got 'png'"),
])
def test_bad_settings_are_named(environ: dict, problem: str) -> None:
    with pytest.raises(ArgumentError, match=problem):
        KernelSettings.from_environment(environ, None)
    with pytest.raises(ArgumentError, match="not a valid EDI model description"):
        model_environment("{\"mk_environments\": 3}")


def test_tasks_chain_in_order_like_edi_hands_them() -> None:
    first = chain_tasks(["a", "b", "c"])[0]
    seen = []
    task: TaskContext | None = first
    while task is not None:
        seen.append(task.get_input_data())
        task = task.next()
    assert seen == ["a", "b", "c"]
    assert type(load_kernel(ROOT / "kernel.py")).__name__ == "DeepLIIFKernel"


def test_package_assembles_a_self_contained_submission(edi_model: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    with Session(edi_model, backend="onnxruntime", device="cpu", cache_dir=cache):
        pass  # one cached artifact of this model
    out = tmp_path / "submission"
    assert main(["package", "--out", str(out), "--model-dir", str(edi_model), "--with-artifacts",
                 "--cache-dir", str(cache), "--name", "deepliif-test"]) == 0
    printed = capsys.readouterr().out
    assert f"dlim model deploy -p {out}" in printed and "dlim model start deepliif-test" in printed
    for name in ("kernel.py", "model.json", "README.md", "model-profile.json", "engine/edi/kernel/service.py",
                 "deepliif/pipeline.py"):
        assert (out / name).is_file(), name
    weights = sum(p.stat().st_size for p in edi_model.rglob("*") if p.is_file())
    assert not (out / "model").exists()  # kernels fetch the weights from the volume (upload-model)
    assert f"weights left out ({weights / 1e6:.1f} MB saved" in printed
    assert json.loads((out / "model.json").read_text())["name"] == "deepliif-test"
    assert len(list((out / ".engine-cache").glob("*/artifact.json"))) == 1
    assert not list(out.rglob("__pycache__")) and not list(tmp_path.glob(".submission*"))
    probe = subprocess.run([sys.executable, "-c", "import kernel; print(kernel.DeepLIIFKernel.__name__)"],
                           cwd=out, capture_output=True, text=True, env={"PATH": "", "PYTHONPATH": ""}, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "DeepLIIFKernel", probe.stderr
    with pytest.raises(ArgumentError, match="not empty"):
        from engine.edi.tools.package import package
        package(out, None)


def test_package_refuses_a_broken_model(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    with pytest.raises(ModelDirError):
        from engine.edi.tools.package import package
        package(tmp_path / "out", tmp_path / "broken")
    assert not (tmp_path / "out").exists()


def test_export_then_package_is_one_step_the_kernel_serves_without_exporting(edi_model: Path, tmp_path: Path,
                                                                             ihc_tile, caplog) -> None:
    """`export onnx` -> `package --onnx`: the folder's cache holds the graph under the kernel's entry name."""
    from deepliif.imageio import write_png
    image = tmp_path / "ihc.png"
    write_png(image, ihc_tile)
    exported = tmp_path / "exported"
    assert main(["export", "onnx", "--model-dir", str(edi_model), "--out", str(exported), "--images", str(image),
                 "--validation-tiles", "1", "--validation-batch-sizes", "1"]) == 0
    out = tmp_path / "submission"
    assert main(["package", "--out", str(out), "--model-dir", str(edi_model), "--with-weights", "--onnx",
                 str(exported / "deepliif.onnx")]) == 0
    assert (out / "model" / "train_opt.txt").is_file()
    (entry,) = (out / ".engine-cache").glob("*/deepliif.onnx")
    assert entry.read_bytes() == (exported / "deepliif.onnx").read_bytes()
    caplog.set_level("INFO")
    with Session(out / "model", backend="onnxruntime", device="cpu", cache_dir=out / ".engine-cache") as session:
        assert session.info.name == "onnxruntime"
    assert "exporting deepliif.onnx" not in caplog.text and "load PyTorch model" not in session.startup
    assert main(["package", "--out", str(tmp_path / "bad"), "--onnx", str(exported / "deepliif.onnx")]) == 2
