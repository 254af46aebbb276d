"""Artifacts from a DeepLIIF model: validated ONNX, TensorRT plans, Triton model repositories."""
from __future__ import annotations

import logging

logger = logging.getLogger("export")
