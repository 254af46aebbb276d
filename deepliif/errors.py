"""The project's exceptions: one base class, one subclass per kind of failure.

Every error a user can cause (a bad model directory, a bad image, a bad argument) is raised as one of
these with a message that names the offending file or value, so callers (CLI, EDI kernel) can report it
in one line instead of a traceback.
"""
from __future__ import annotations

import enum


class DeepLIIFError(Exception):
    """Base class of every error this project raises on purpose."""


class ModelDirError(DeepLIIFError):
    """The model directory, its option file or a weight file is missing or unreadable."""


class UnsupportedModelError(DeepLIIFError):
    """The model directory describes a model this engine does not implement."""


class WeightsMismatchError(DeepLIIFError):
    """Weights do not fit the architecture they claim (missing/unexpected keys, wrong shapes)."""


class ImageError(DeepLIIFError):
    """An input image cannot be decoded, is empty, too large, or of an unsupported kind."""


class ArgumentError(DeepLIIFError):
    """An argument is out of range or of the wrong type."""


class ExportError(DeepLIIFError):
    """An export step (ONNX, TensorRT, Triton) failed or produced an invalid artifact."""


class TensorRTCompatibilityError(ExportError):
    """A graph breaks a documented constraint of TensorRT's ONNX parser; `problems` lists each, with nodes."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class ValidationError(ExportError):
    """An exported artifact differs from the PyTorch pipeline by more than the tolerance.

    `failures` lists every output that failed (all are collected before raising), and `report` is the
    whole measurement, so the caller can write it out and say what failed where.
    """

    def __init__(self, message: str, failures: list[str], report: dict) -> None:
        super().__init__(message)
        self.failures = failures
        self.report = report


class AccuracyGateError(ValidationError):
    """A reduced-precision (INT8/FP16) graph failed its accuracy gate, or has no passed report to show."""


class ArtifactError(DeepLIIFError):
    """An artifact (ONNX file, TensorRT plan, metadata sidecar) is missing, corrupt or not what it claims."""


class IncompatibleArtifactError(ArtifactError):
    """An artifact was built for another GPU, library version or setting than the one here."""


class BackendUnavailableError(DeepLIIFError):
    """A backend cannot run here (library missing, no GPU); the message says what to install or use."""


def parse_enum(cls, value: object, what: str):
    """`cls(value)` for an enum of lower-case string values (members pass through), or an
    ArgumentError naming `what`, the choices and the value received."""
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        choices = ", ".join(member.value for member in cls)
        raise ArgumentError(f"{what} must be one of {choices}; got {value!r}") from None


class ChoiceEnum(enum.Enum):
    """An enum of lower-case string values that user input is parsed into, with the message `parse_enum`
    gives; `choice_name` is what the message calls the value."""

    @classmethod
    def choice_name(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def parse(cls, value: object):
        return parse_enum(cls, value, cls.choice_name())
