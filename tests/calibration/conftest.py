from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepliif.imageio import write_png
from engine.samples import synthetic_ihc


@pytest.fixture(scope="session")
def ihc_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three generated 512x512 IHC-like images (one tile each), as PNG files."""
    root = tmp_path_factory.mktemp("ihc")
    paths = []
    for seed in range(3):
        path = root / f"ihc{seed}.png"
        write_png(path, synthetic_ihc(seed=seed))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def blank_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blank") / "white.png"
    write_png(path, np.full((600, 600, 3), 255, np.uint8))
    return path


@pytest.fixture(scope="session")
def fp32_onnx(generated_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fused fp32 ONNX of the small generated checkpoint model."""
    from deepliif.model_dir import Layout, load_model_dir
    from export.config import OnnxExportConfig
    from export.onnx_export import export_pipeline
    path = tmp_path_factory.mktemp("fp32") / "deepliif.onnx"
    export_pipeline(load_model_dir(generated_models[Layout.CHECKPOINT]), path, OnnxExportConfig())
    return path


@pytest.fixture(scope="session")
def calibration_tiles(ihc_images: list[Path]) -> np.ndarray:
    from calibration.tiles import choose_tiles
    return choose_tiles(ihc_images[:2], 2).arrays()
