"""Artifacts from a DeepLIIF model: validated ONNX, TensorRT plans, Triton repositories (export issue)."""
from __future__ import annotations
