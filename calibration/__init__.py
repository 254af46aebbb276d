"""Reduced precision that can be trusted: INT8 calibration tiles, Q/DQ quantization of the fused
pipeline, and the accuracy gate on cell counts that every INT8/FP16 graph must pass before it is served."""
from __future__ import annotations

from deepliif.logs import project_logger

logger = project_logger("calibration")
