"""Export settings as small config objects, so commands, the engine cache key and tests share them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from deepliif.errors import ArgumentError

from engine.backends.precision import Precision

OPSET_RANGE = (13, 20)  # what torch's TorchScript-based exporter and TensorRT 10/11 both support


@dataclass(frozen=True)
class OnnxExportConfig:
    """How the fused pipeline is written to ONNX. Part of the engine's artifact cache key."""

    opset: int = 17
    precision: Precision = Precision.FP32
    per_generator: bool = False

    def __post_init__(self) -> None:
        low, high = OPSET_RANGE
        if not isinstance(self.opset, int) or not low <= self.opset <= high:
            raise ArgumentError(f"opset must be an integer from {low} to {high}; got {self.opset!r}")
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.precision is Precision.INT8:
            raise ArgumentError("INT8 ONNX comes from calibration (`deepliif-engine calibrate`), "
                                "not from a plain export; export fp32 and calibrate it")

    def key(self) -> dict:
        return {**asdict(self), "precision": self.precision.value}


@dataclass(frozen=True)
class Tolerance:
    """How far an export may be from the PyTorch fp32 pipeline, per output.

    `max_abs` is in grey levels; `min_psnr` in dB (None: not checked); `max_percent_pos_delta` is the
    largest allowed change of the percentage of positive cells after postprocessing (None: not checked).
    """

    max_abs: int | None = 1
    min_psnr: float | None = None
    max_percent_pos_delta: float | None = None

    @classmethod
    def for_precision(cls, precision: Precision) -> Tolerance:
        """fp32 must agree to one grey level (as DeepLIIF's own outputs do); reduced precision is judged by image quality
        and by the clinical number, the percentage of positive cells."""
        if precision is Precision.FP32:
            return cls(max_abs=1)
        return cls(max_abs=None, min_psnr=30.0, max_percent_pos_delta=1.0)
