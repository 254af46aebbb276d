"""Backends behind one interface (`Backend`); heavy libraries are imported only when one is opened."""
from __future__ import annotations


from deepliif.errors import ChoiceEnum

from .base import Backend, BackendInfo

__all__ = ["Backend", "BackendInfo", "BackendKind"]


class BackendKind(ChoiceEnum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"

    @classmethod
    def choice_name(cls) -> str:
        return "backend"
