"""A built TensorRT plan as the runner floor sees it: the lazily imported module, the GPU, and the
`engine.json` sidecar with the rules for which runtime may load a plan.

`export.tensorrt_build` writes plans and sidecars; `engine.backends.tensorrt_backend` loads them. Both
read the rules here, so the runner never imports the exporter.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from deepliif.imageio import file_sha256, write_json
from engine.errors import ArtifactError, BackendUnavailableError, IncompatibleArtifactError

PLAN_FILE = "deepliif.plan"
METADATA_FILE = "engine.json"
TENSORRT_PIN = "tensorrt==11.4.0.106"
INSTALL_HINT = (f"TensorRT is not installed: pip install '{TENSORRT_PIN}' (or the project's extra: "
                "pip install -e '.[tensorrt]'); it needs an NVIDIA GPU and driver")


def tensorrt_module():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"{INSTALL_HINT} ({exc})") from exc
    return tensorrt



@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"

    @classmethod
    def current(cls, device: int = 0) -> GpuInfo:
        import torch
        if not torch.cuda.is_available():
            raise BackendUnavailableError("no CUDA GPU is visible to PyTorch here: TensorRT needs one")
        major, minor = torch.cuda.get_device_capability(device)
        return cls(torch.cuda.get_device_name(device), f"{major}.{minor}")


@dataclass
class EngineMetadata:
    """The `engine.json` sidecar: which ONNX, TensorRT, GPU and settings a plan was built from."""

    onnx_sha256: str
    plan_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict
    workspace_gib: float
    version_compatible: bool
    build_seconds: float
    tf32: bool = False  # whether fp32 layers may round inputs to TF32 (never for an fp32 plan)

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> EngineMetadata:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except FileNotFoundError:
            raise ArtifactError(f"{path}: no engine metadata; a plan is only used with the engine.json "
                                "written beside it by `deepliif-engine export tensorrt`") from None
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: unreadable engine metadata: {exc}") from exc

    def check_runtime(self, tensorrt_version: str, gpu: GpuInfo) -> None:
        """Refuse a plan built for another GPU or TensorRT; say which, from the sidecar.

        Plans are specific to a compute capability in every case. Any other plan needs the exact TensorRT
        version; a version-compatible plan runs on the same or a later runtime of its major version and,
        across majors, only where the support matrix says so (TensorRT 11.4 "Engine Portability": 10 -> 11
        and 8 -> 10; a newer plan never runs on an older runtime).
        """
        reasons = []
        if self.compute_capability != gpu.compute_capability:
            reasons.append(f"built for compute capability {self.compute_capability} ({self.gpu_name}), "
                           f"this GPU is {gpu.compute_capability} ({gpu.name})")
        if self.version_compatible:
            if not version_compatible_runs_on(self.tensorrt_version, tensorrt_version):
                reasons.append(f"version-compatible plan from TensorRT {self.tensorrt_version} cannot run "
                               f"on TensorRT {tensorrt_version}")
        elif tensorrt_version != self.tensorrt_version:
            reasons.append(f"built with TensorRT {self.tensorrt_version}, this is TensorRT {tensorrt_version} "
                           "(rebuild, or build with --version-compatible)")
        if reasons:
            raise IncompatibleArtifactError("TensorRT plan refused: " + "; ".join(reasons))

    def check_plan_file(self, plan: Path) -> None:
        if not Path(plan).is_file():
            raise ArtifactError(f"{plan}: no such TensorRT plan")
        if file_sha256(plan) != self.plan_sha256:
            raise ArtifactError(f"{plan} does not match its engine.json (sha256 differs): a stale or "
                                "corrupt plan; rebuild it")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _major(version: str) -> int:
    return _version_tuple(version)[0] if _version_tuple(version) else -1


CROSS_MAJOR_COMPATIBLE = {(10, 11), (8, 10)}  # (plan's major, runtime's major), from the support matrix


def version_compatible_runs_on(built_with: str, runtime: str) -> bool:
    if _version_tuple(runtime) < _version_tuple(built_with):
        return False
    return _major(runtime) == _major(built_with) or (_major(built_with), _major(runtime)) in CROSS_MAJOR_COMPATIBLE


def timing_cache_path(directory: Path, tensorrt_version: str, gpu: GpuInfo) -> Path:
    """One timing cache per compute capability and TensorRT version: TensorRT rejects a cache made on
    another device (its header is checked by `set_timing_cache`) or by another version."""
    return Path(directory) / f"timing-sm{gpu.compute_capability.replace('.', '')}-trt{tensorrt_version}.cache"
