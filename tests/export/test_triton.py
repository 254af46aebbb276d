from __future__ import annotations

from pathlib import Path

import pytest

from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256
from engine.errors import ArtifactError, ExportError
from export.tensorrt_build import METADATA_FILE, PLAN_FILE, TensorRTBuildConfig
from export.triton import (ONNXRUNTIME, PYTHON_MODEL_DIR, PythonModelSettings, TritonConfig, check_config,
                           parse_pbtxt, render_config, write_python_repository, write_repository)


def test_onnx_repository_layout_and_config(fused_onnx: Path, tmp_path: Path) -> None:
    model = write_repository(tmp_path / "repo", TritonConfig(max_batch_size=8), onnx_path=fused_onnx)
    assert model == tmp_path / "repo" / "deepliif"
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == \
        ["1", "1/model.onnx", "config.pbtxt"]
    assert file_sha256(model / "1" / "model.onnx") == file_sha256(fused_onnx)
    config = parse_pbtxt((model / "config.pbtxt").read_text())
    assert config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 8
    assert [t["name"] for t in config["output"]] == ["hema", "dapi", "lap2", "marker", "seg"]
    assert config["input"] == [{"name": "ihc", "data_type": "TYPE_UINT8", "dims": [512, 512, 3]}]
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 1}]
    again = write_repository(tmp_path / "repo", TritonConfig(max_batch_size=2), onnx_path=fused_onnx)
    assert parse_pbtxt((again / "config.pbtxt").read_text())["max_batch_size"] == 2  # replaced whole
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["deepliif"]  # no staging left


def test_plan_repository_is_capped_by_the_profile(tmp_path: Path, engine_metadata) -> None:
    plan = tmp_path / "engine" / PLAN_FILE
    plan.parent.mkdir()
    plan.write_bytes(b"serialized plan")
    profile = TensorRTBuildConfig(1, 2, 4).profile()
    engine_metadata(plan_sha256=file_sha256(plan), profile=profile).write(plan.with_name(METADATA_FILE))
    model = write_repository(tmp_path / "repo", TritonConfig(max_batch_size=16), plan_path=plan)
    config = parse_pbtxt((model / "config.pbtxt").read_text())
    assert config["platform"] == "tensorrt_plan" and config["max_batch_size"] == 4
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]
    assert (model / "1" / "model.plan").read_bytes() == b"serialized plan"
    plan.write_bytes(b"another plan")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        write_repository(tmp_path / "repo2", TritonConfig(), plan_path=plan)


def test_bad_arguments(fused_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="exactly one"):
        write_repository(tmp_path, TritonConfig())
    with pytest.raises(ArgumentError, match="model name"):
        TritonConfig(name="../escape")
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_text("hello")
    with pytest.raises(ArtifactError, match="not an ONNX model"):
        write_repository(tmp_path / "repo", TritonConfig(), onnx_path=not_onnx)


def test_check_config_names_every_mismatch() -> None:
    parsed = parse_pbtxt(render_config(TritonConfig(), ONNXRUNTIME))
    parsed["max_batch_size"] = 3
    parsed["output"][0]["data_type"] = "TYPE_FP32"
    with pytest.raises(ExportError, match=r"max_batch_size is 3.*hema type is 'TYPE_FP32'"):
        check_config(parsed, TritonConfig(), ONNXRUNTIME)


@pytest.mark.parametrize("text", ['name: "x', "input [ { name: 1 }", "a { b: 1 } }", "key:"])
def test_malformed_pbtxt(text: str) -> None:
    with pytest.raises(ArtifactError):
        parse_pbtxt(text)


def test_pbtxt_comments_strings_and_numbers() -> None:
    parsed = parse_pbtxt('# comment\nname: "a \\"q\\""\nrate: 0.5\nn: -3\nflag: true\n')
    assert parsed == {"name": 'a "q"', "rate": 0.5, "n": -3, "flag": "true"}


def test_plan_whose_profile_starts_above_one_is_refused(tmp_path: Path, engine_metadata) -> None:
    """Triton's dynamic batcher sends single requests as batches of 1."""
    plan = tmp_path / PLAN_FILE
    plan.write_bytes(b"serialized plan")
    engine_metadata(plan_sha256=file_sha256(plan), profile=TensorRTBuildConfig(2, 4, 8).profile()) \
        .write(plan.with_name(METADATA_FILE))
    with pytest.raises(ArgumentError, match="minimum batch is 2, but Triton sends batches of 1"):
        write_repository(tmp_path / "repo", TritonConfig(), plan_path=plan)
    assert not (tmp_path / "repo").exists()


def test_python_repository_copies_the_model_and_names_it_in_parameters(generated_models, fused_onnx: Path,
                                                                        tmp_path: Path) -> None:
    from deepliif.model_dir import Layout
    model_dir = generated_models[Layout.CHECKPOINT]
    model = write_python_repository(tmp_path / "repo", TritonConfig(instance_kind="cpu", instances=2), model_dir,
                                    onnx_path=fused_onnx, backend="onnxruntime", cache_dir=tmp_path / "cache")
    config = parse_pbtxt((model / "config.pbtxt").read_text())
    assert config["backend"] == "python" and "platform" not in config
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 2}]
    parameters = {p["key"]: p["value"]["string_value"] for p in config["parameters"]}
    assert parameters == {"model_dir": PYTHON_MODEL_DIR, "onnx": "deepliif.onnx", "backend": "onnxruntime",
                          "precision": "fp32", "cache_dir": str((tmp_path / "cache").resolve())}
    assert "from engine.triton_model import TritonPythonModel" in (model / "1" / "model.py").read_text()
    assert file_sha256(model / "1" / "deepliif.onnx") == file_sha256(fused_onnx)
    copied = sorted(p.name for p in (model / "1" / PYTHON_MODEL_DIR).iterdir())
    assert copied == sorted(p.name for p in model_dir.iterdir())
    # what the served model reads back is what was meant, paths resolved in the version folder
    as_json = {"parameters": {key: {"string_value": value} for key, value in parameters.items()}}
    settings = PythonModelSettings.from_model_config(as_json, model / "1")
    assert settings.model_dir == model / "1" / PYTHON_MODEL_DIR and settings.onnx == model / "1" / "deepliif.onnx"
    assert settings.cache_dir == (tmp_path / "cache").resolve() and settings.backend == "onnxruntime"


def test_python_repository_refuses_bad_input_before_writing(generated_models, tmp_path: Path) -> None:
    from deepliif.errors import DeepLIIFError
    from deepliif.model_dir import Layout
    with pytest.raises(DeepLIIFError, match="train_opt.txt is missing"):
        write_python_repository(tmp_path / "repo", TritonConfig(), tmp_path)
    with pytest.raises(ArgumentError, match="backend"):
        write_python_repository(tmp_path / "repo", TritonConfig(), generated_models[Layout.CHECKPOINT],
                                backend="tensorflow")
    with pytest.raises(ArgumentError, match="instancekind"):
        TritonConfig(instance_kind="tpu")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("parameters, message", [
    ({}, "'model_dir'"), ({"model_dir": "model", "weights": "x"}, r"\['weights'\] are unknown")])
def test_python_model_settings_refuse_what_they_do_not_know(parameters: dict, message: str) -> None:
    config = {"parameters": {key: {"string_value": value} for key, value in parameters.items()}}
    with pytest.raises(ArgumentError, match=message):
        PythonModelSettings.from_model_config(config, Path("/repo/deepliif/1"))


def _accelerators(model: Path) -> dict:
    parsed = parse_pbtxt((model / "config.pbtxt").read_text())
    entries = parsed.get("optimization", {}).get("execution_accelerators", {}).get("gpu_execution_accelerator", [])
    return {e["name"]: {p["key"]: p["value"] for p in e.get("parameters", [])} for e in entries}


def test_onnx_repositories_set_the_providers_the_engine_uses(fused_onnx: Path, fused_onnx_fp16: Path,
                                                               tmp_path: Path) -> None:
    """fp32: the CUDA EP with TF32 off (the one-grey-level contract); fp16: the TensorRT EP without a
    precision flag (Triton's FP16 mode would turn on weak typing), then the CUDA EP with TF32."""
    fp32 = write_repository(tmp_path / "a", TritonConfig(), onnx_path=fused_onnx)
    assert _accelerators(fp32) == {"cuda": {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}}
    fp16 = _accelerators(write_repository(tmp_path / "b", TritonConfig(max_batch_size=8), onnx_path=fused_onnx_fp16))
    assert list(fp16) == ["tensorrt", "cuda"]
    assert fp16["tensorrt"]["precision_mode"] == "FP32" and fp16["tensorrt"]["trt_profile_max_shapes"] == \
        "ihc:8x512x512x3"
    assert fp16["cuda"]["use_tf32"] == "1"
    on_cpu = write_repository(tmp_path / "c", TritonConfig(instance_kind="cpu"), onnx_path=fused_onnx)
    assert _accelerators(on_cpu) == {}


@pytest.mark.parametrize("compatible, says", [
    (True, "--backend-config=tensorrt,version-compatible=true"),
    (False, "must be exactly TensorRT 11.4.0.106")])
def test_plan_repositories_say_what_triton_must_run(tmp_path: Path, engine_metadata, caplog, compatible: bool,
                                                    says: str) -> None:
    plan = tmp_path / PLAN_FILE
    plan.write_bytes(b"serialized plan")
    engine_metadata(plan_sha256=file_sha256(plan), profile=TensorRTBuildConfig(1, 4, 8).profile(),
                    version_compatible=compatible).write(plan.with_name(METADATA_FILE))
    with caplog.at_level("WARNING"):
        model = write_repository(tmp_path / "repo", TritonConfig(), plan_path=plan)
    text = (model / "config.pbtxt").read_text()
    assert says in text.splitlines()[1] and text.startswith("# plan built with TensorRT 11.4.0.106")
    assert says in caplog.text
    assert parse_pbtxt(text)["platform"] == "tensorrt_plan"  # the comments parse away
