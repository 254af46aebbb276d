from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from deepliif.model_dir import Layout, load_model_dir
from engine.backends.precision import Precision
from export.config import OnnxExportConfig
from export.onnx_export import export_pipeline
from export.tensorrt_build import EngineMetadata, GpuInfo, TensorRTBuildConfig


@pytest.fixture(scope="session")
def fused_onnx(generated_models: dict[Layout, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fused fp32 ONNX of the small generated checkpoint model (reflect padding)."""
    path = tmp_path_factory.mktemp("onnx") / "deepliif.onnx"
    export_pipeline(load_model_dir(generated_models[Layout.CHECKPOINT]), path, OnnxExportConfig())
    return path


@pytest.fixture(scope="session")
def fused_onnx_fp16(generated_models: dict[Layout, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx16") / "deepliif.onnx"
    export_pipeline(load_model_dir(generated_models[Layout.CHECKPOINT]), path,
                    OnnxExportConfig(precision=Precision.FP16))
    return path


H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture
def engine_metadata():
    """A factory of plausible engine.json contents for an H100 plan, with fields overridden."""
    def make(**changes) -> EngineMetadata:
        base = EngineMetadata(onnx_sha256="a" * 64, plan_sha256="b" * 64, tensorrt_version="11.4.0.106",
                              gpu_name=H100.name, compute_capability=H100.compute_capability, precision="fp16",
                              profile=TensorRTBuildConfig().profile(), workspace_gib=8.0,
                              version_compatible=False, build_seconds=100.0)
        return replace(base, **changes)
    return make
