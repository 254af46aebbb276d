"""Artifacts from a DeepLIIF model: validated ONNX, TensorRT plans, Triton model repositories."""
from __future__ import annotations

from deepliif.logs import project_logger

logger = project_logger("export")
