from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from deepliif.errors import ArgumentError
from engine.errors import ArtifactError, BackendUnavailableError, IncompatibleArtifactError
from engine.backends.precision import Precision
from export.onnx_checks import check_onnx
from export.tensorrt_build import (INSTALL_HINT, METADATA_FILE, PLAN_FILE, EngineMetadata, GpuInfo,
                                   TensorRTBuildConfig, build_plan, onnx_precision, tensorrt_module)

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_and_key() -> None:
    config = TensorRTBuildConfig(min_batch=2, opt_batch=4, max_batch=8, timing_cache=Path("/tmp/cache"))
    assert config.profile() == {"min": [2, 512, 512, 3], "opt": [4, 512, 512, 3], "max": [8, 512, 512, 3]}
    assert "timing_cache" not in config.key()  # where the cache lives does not change the plan


@pytest.mark.parametrize("batches", [(0, 1, 1), (4, 2, 8), (1, 8, 4), (1, 2.5, 4)])
def test_bad_profiles_are_refused(batches) -> None:
    with pytest.raises(ArgumentError, match="min-batch <= opt-batch <= max-batch"):
        TensorRTBuildConfig(*batches)
    with pytest.raises(ArgumentError, match="workspace"):
        TensorRTBuildConfig(workspace_gib=0)


def test_metadata_round_trip_and_corrupt_sidecar(tmp_path: Path, engine_metadata) -> None:
    meta = engine_metadata()
    meta.write(tmp_path / METADATA_FILE)
    assert EngineMetadata.read(tmp_path / METADATA_FILE) == meta
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable engine metadata"):
        EngineMetadata.read(tmp_path / METADATA_FILE)
    with pytest.raises(ArtifactError, match="no engine metadata"):
        EngineMetadata.read(tmp_path / "absent.json")


def test_plan_for_another_gpu_or_tensorrt_is_refused_with_the_reason(engine_metadata) -> None:
    engine_metadata().check_runtime("11.4.0.106", H100)  # the same everything: accepted
    with pytest.raises(IncompatibleArtifactError, match=r"compute capability 9.0 .*this GPU is 8.0"):
        engine_metadata().check_runtime("11.4.0.106", GpuInfo("NVIDIA A100", "8.0"))
    with pytest.raises(IncompatibleArtifactError, match="built with TensorRT 11.4.0.106, this is TensorRT 10.13"):
        engine_metadata().check_runtime("10.13", H100)
    compatible = engine_metadata(version_compatible=True)
    compatible.check_runtime("11.5.0", H100)  # later runtime of the same major: accepted
    with pytest.raises(IncompatibleArtifactError, match="version-compatible"):
        compatible.check_runtime("12.0.0", H100)


@pytest.mark.parametrize("built, runtime, runs", [
    ("10.13.0", "11.4.0.106", True),    # the support matrix: TensorRT 10 version-compatible plans run on 11
    ("8.6.1", "10.13.0", True),         # and 8 on 10
    ("8.6.1", "11.4.0.106", False),     # no other pair across majors
    ("11.4.0.106", "10.13.0", False),   # never on an older runtime
    ("11.4.0.106", "11.3.0", False),
    ("11.3.0", "11.4.0.106", True),
])
def test_version_compatible_plans_follow_the_support_matrix(engine_metadata, built, runtime, runs) -> None:
    plan = engine_metadata(version_compatible=True, tensorrt_version=built)
    if runs:
        plan.check_runtime(runtime, H100)
    else:
        with pytest.raises(IncompatibleArtifactError, match="version-compatible plan"):
            plan.check_runtime(runtime, H100)
    with pytest.raises(IncompatibleArtifactError, match="rebuild, or build with --version-compatible"):
        engine_metadata(version_compatible=False, tensorrt_version="10.13.0").check_runtime("11.4.0.106", H100)


def test_stale_plan_is_detected(tmp_path: Path, engine_metadata) -> None:
    plan = tmp_path / PLAN_FILE
    plan.write_bytes(b"plan bytes")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        engine_metadata().check_plan_file(plan)
    with pytest.raises(ArtifactError, match="no such TensorRT plan"):
        engine_metadata().check_plan_file(tmp_path / "absent.plan")


def test_precision_is_read_from_the_graph(fused_onnx: Path, fused_onnx_fp16: Path) -> None:
    assert onnx_precision(check_onnx(fused_onnx)) is Precision.FP32
    assert onnx_precision(check_onnx(fused_onnx_fp16)) is Precision.FP16


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_error_says_what_to_install() -> None:
    with pytest.raises(BackendUnavailableError) as caught:
        tensorrt_module()
    assert INSTALL_HINT in str(caught.value) and "pip install" in str(caught.value)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT or not torch.cuda.is_available(), reason="needs TensorRT and a CUDA GPU")
def test_build_a_plan_from_the_fused_onnx(fused_onnx: Path, tmp_path: Path) -> None:
    config = TensorRTBuildConfig(1, 2, 4, workspace_gib=2, timing_cache=tmp_path / "timing.cache")
    meta = build_plan(fused_onnx, tmp_path, config)
    assert (tmp_path / PLAN_FILE).is_file() and (tmp_path / "timing.cache").is_file()
    assert EngineMetadata.read(tmp_path / METADATA_FILE) == meta
    meta.check_plan_file(tmp_path / PLAN_FILE)
    meta.check_runtime(tensorrt_module().__version__, GpuInfo.current())
    assert meta.precision == "fp32" and meta.profile["max"][0] == 4
