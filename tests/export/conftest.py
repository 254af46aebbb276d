from __future__ import annotations

from pathlib import Path

import pytest

from deepliif.model_dir import Layout, load_model_dir
from export.config import OnnxExportConfig, Precision
from export.onnx_export import export_pipeline


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
