from __future__ import annotations

import pytest
import torch

from deepliif.errors import ArgumentError
from engine.backends.precision import Precision
from export.config import OnnxExportConfig, Tolerance


def test_precision_parsing_and_dtypes() -> None:
    assert Precision.parse("FP16") is Precision.FP16
    assert Precision.parse(Precision.INT8) is Precision.INT8
    assert Precision.FP16.torch_dtype == torch.float16 and Precision.INT8.torch_dtype == torch.float32
    with pytest.raises(ArgumentError, match="got 'fp8'"):
        Precision.parse("fp8")


@pytest.mark.parametrize("opset", [12, 21, "17", 17.0])
def test_opset_out_of_range_is_refused(opset) -> None:
    with pytest.raises(ArgumentError, match="opset"):
        OnnxExportConfig(opset=opset)


def test_int8_is_not_a_plain_export() -> None:
    with pytest.raises(ArgumentError, match="calibrate"):
        OnnxExportConfig(precision="int8")


def test_config_key_is_plain_data() -> None:
    assert OnnxExportConfig(opset=18, precision="fp16").key() == \
        {"opset": 18, "precision": "fp16", "per_generator": False}


def test_default_tolerances() -> None:
    assert Tolerance.for_precision(Precision.FP32) == Tolerance(max_abs=1)
    fp16 = Tolerance.for_precision(Precision.FP16)
    assert fp16.max_abs is None and fp16.min_psnr == 30.0 and fp16.max_percent_pos_delta == 1.0
