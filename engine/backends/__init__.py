"""Backends behind one interface (`Backend`); heavy libraries are imported only when one is opened."""
from __future__ import annotations

import enum

from deepliif.errors import ArgumentError

from .base import Backend, BackendInfo

__all__ = ["Backend", "BackendInfo", "BackendKind"]


class BackendKind(enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"

    @classmethod
    def parse(cls, value: str | BackendKind) -> BackendKind:
        if isinstance(value, BackendKind):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ArgumentError(f"backend must be one of {', '.join(k.value for k in cls)}; got {value!r}") from None
