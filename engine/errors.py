"""The engine's failures (exports, artifacts, backends), subclasses of the project's one base class
`deepliif.errors.DeepLIIFError`. They live on the engine's floor: the model (`deepliif/`) raises none of them."""
from __future__ import annotations

from deepliif.errors import DeepLIIFError


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
