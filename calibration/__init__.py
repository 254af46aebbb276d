"""INT8/FP16 calibration and the cell-count accuracy gate (calibration issue)."""
from __future__ import annotations
