"""Serving DeepLIIF: runtime, benchmarks and the command line.

Heavy optional libraries (tensorrt, onnxruntime-gpu, cuda-python) are imported lazily inside the code that
needs them, so this package imports on a CPU-only machine.
"""
from __future__ import annotations

from deepliif.logs import project_logger

logger = project_logger("engine")


def __getattr__(name: str):
    """`from engine import Session`, as the README documents, without importing torch for `engine.logger`."""
    if name == "Session":
        from .session import Session
        return Session
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
