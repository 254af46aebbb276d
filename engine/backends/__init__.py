"""Backends behind one interface (`Backend`); heavy libraries are imported only when one is opened."""
from __future__ import annotations

import enum

from deepliif.errors import parse_enum

from .base import Backend, BackendInfo

__all__ = ["Backend", "BackendInfo", "BackendKind"]


class BackendKind(enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"

    @classmethod
    def parse(cls, value: str | BackendKind) -> BackendKind:
        return parse_enum(cls, value, "backend")
