"""The arithmetic a graph runs in: the one type the runners, the exporter and calibration share."""
from __future__ import annotations


from deepliif.errors import ChoiceEnum


class Precision(ChoiceEnum):
    """The arithmetic the generators run in; I/O is uint8 whatever the precision."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


    @property
    def torch_dtype(self):
        """The dtype the torch module is exported in; INT8 starts from fp32 and adds Q/DQ nodes."""
        import torch  # only the torch backend and the exporter ask; serving an export never does
        return torch.float16 if self is Precision.FP16 else torch.float32
