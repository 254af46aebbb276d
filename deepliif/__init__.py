"""DeepLIIF in plain PyTorch and NumPy: networks, model directories, tiling, postprocessing.

This package imports no serving code; `engine`, `export` and `kernel.py` build on it.
"""
from __future__ import annotations

from .logs import project_logger

logger = project_logger("deepliif")

__all__ = ["logger"]
