"""Serving DeepLIIF: runtime, benchmarks and the command line.

Heavy optional libraries (tensorrt, onnxruntime-gpu, cuda-python) are imported lazily inside the code that
needs them, so this package imports on a CPU-only machine.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("engine")
