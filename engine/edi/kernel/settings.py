"""What a kernel is configured with: model.json's `mk_environments`, overridden by the process environment.

| variable | meaning | default |
| --- | --- | --- |
| `DEEPLIIF_MODEL_DIR` | DeepLIIF model directory | `$REDHARE_MODEL_PATH/<weight_path of model.json>` |
| `DEEPLIIF_MODEL_SOURCE` | fetch the model at start from `volume:<path>` or a local path (`upload-model`) | none |
| `DEEPLIIF_BACKEND` | auto, onnxruntime, tensorrt, torch | auto |
| `DEEPLIIF_PRECISION` | fp32, fp16, int8 | fp32 |
| `DEEPLIIF_ONNX` | a gated graph from `calibrate` (int8 needs one) | none |
| `DEEPLIIF_DEVICE` | auto, cpu, cuda | auto |
| `DEEPLIIF_BATCH_SIZE` | tiles per engine call | from free GPU memory |
| `DEEPLIIF_CACHE_DIR` | artifact cache | `$REDHARE_MODEL_PATH/.engine-cache` |
| `DEEPLIIF_VOLUME_ROOT` | mounted storage volume root | none |
| `DEEPLIIF_CPD_URL`, `_VOLUME`, `_USERNAME`, `_API_KEY` | a Cloud Pak for Data volume instead | none |
| `DEEPLIIF_CPD_VERIFY_TLS` | 0 to accept a self-signed CPD certificate | 1 |
| `DEEPLIIF_SYNC_BUDGET_S` | longer estimated runs go async | 45 |
| `DEEPLIIF_MAX_REQUEST_MB` | largest request body / input file | 256 |
| `DEEPLIIF_MAX_PIXELS` | largest image | 100,000,000 |
| `DEEPLIIF_PYRAMID_COMPRESSION` | slide pyramids: jpeg (display images JPEG, the rest zstd), zstd, deflate | jpeg |
| `REDHARE_MODEL_NAME`, `REDHARE_MODEL_PATH`, `MSD_POD_NAME` | set by EDI | deepliif, none, host name |
"""
from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deepliif.errors import ArgumentError
from deepliif.imageio import DEFAULT_MAX_PIXELS
from deepliif.pyramid import PyramidCompression

from ...cache import default_cache_dir
from .model_store import ModelSource
from .storage import CpdSettings

DEFAULT_SYNC_BUDGET_S = 45.0  # WMLA's synchronous window is one to two minutes; leave room for I/O
DEFAULT_MAX_ASYNC_QUEUE = 16
DEFAULT_SHUTDOWN_GRACE_S = 25.0  # inside Kubernetes' default 30 s between SIGTERM and SIGKILL
DEFAULT_MAX_REQUEST_MB = 256
DEFAULT_TASK_BATCH_SIZE = 4  # model-profile.json's policy.task_batch_size when a profile names none


def model_environment(model_description: str | None) -> dict[str, str]:
    """`mk_environments` of model.json as a dict (EDI sets these in the kernel's environment)."""
    if not model_description:
        return {}
    try:
        record = json.loads(model_description)
        return {str(e["name"]): str(e["value"]) for e in record.get("mk_environments", [])}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArgumentError(f"model.json is not a valid EDI model description ({exc})") from exc


def _number(environ: Mapping[str, str], name: str, default: float, cast=float):
    try:
        value = cast(environ.get(name, default))
    except ValueError:
        raise ArgumentError(f"{name} must be a number; got {environ[name]!r}") from None
    if value <= 0:
        raise ArgumentError(f"{name} must be positive; got {value}")
    return value


@dataclass(frozen=True)
class KernelSettings:
    model_dir: Path
    deployment: str
    pod: str
    model_source: ModelSource | None = None  # fetched into model_dir at start
    backend: str = "auto"
    precision: str = "fp32"
    onnx: Path | None = None
    device: str = "auto"
    batch_size: int | None = None
    cache_dir: Path | None = None
    volume_root: Path | None = None
    cpd: CpdSettings | None = None
    state_root: Path | None = None  # status of async requests when no volume is configured
    sync_budget_s: float = DEFAULT_SYNC_BUDGET_S
    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_async_queue: int = DEFAULT_MAX_ASYNC_QUEUE  # waiting async jobs; beyond it requests are answered "busy"
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S  # queued work finished at shutdown within this
    pyramid_compression: PyramidCompression = PyramidCompression.default()  # of slide requests' pyramids

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], model_description: str | None = None) -> KernelSettings:
        env = {**model_environment(model_description), **environ}
        record = json.loads(model_description) if model_description else {}
        model_path = env.get("REDHARE_MODEL_PATH")
        model_dir = env.get("DEEPLIIF_MODEL_DIR") or (
            str(Path(model_path) / record.get("weight_path", "model")) if model_path else None)
        if not model_dir:
            raise ArgumentError("no model directory: set DEEPLIIF_MODEL_DIR (or run inside EDI, where "
                                "REDHARE_MODEL_PATH and model.json's weight_path locate it)")
        batch = env.get("DEEPLIIF_BATCH_SIZE")
        return cls(
            model_dir=Path(model_dir),
            deployment=env.get("REDHARE_MODEL_NAME") or record.get("name") or "deepliif",
            pod=env.get("MSD_POD_NAME") or socket.gethostname(),
            model_source=ModelSource.parse(env["DEEPLIIF_MODEL_SOURCE"]) if env.get("DEEPLIIF_MODEL_SOURCE") else None,
            backend=env.get("DEEPLIIF_BACKEND", "auto"),
            precision=env.get("DEEPLIIF_PRECISION", "fp32"),
            onnx=Path(env["DEEPLIIF_ONNX"]) if env.get("DEEPLIIF_ONNX") else None,
            device=env.get("DEEPLIIF_DEVICE", "auto"),
            batch_size=int(_number(env, "DEEPLIIF_BATCH_SIZE", 1, int)) if batch else None,
            cache_dir=default_cache_dir(env),
            volume_root=Path(env["DEEPLIIF_VOLUME_ROOT"]) if env.get("DEEPLIIF_VOLUME_ROOT") else None,
            cpd=cpd_from_environment(env),
            state_root=Path(model_path) if model_path else default_cache_dir(env) / "edi-state",
            sync_budget_s=_number(env, "DEEPLIIF_SYNC_BUDGET_S", DEFAULT_SYNC_BUDGET_S),
            max_request_bytes=int(_number(env, "DEEPLIIF_MAX_REQUEST_MB", DEFAULT_MAX_REQUEST_MB)) << 20,
            max_pixels=int(_number(env, "DEEPLIIF_MAX_PIXELS", DEFAULT_MAX_PIXELS, int)),
            max_async_queue=int(_number(env, "DEEPLIIF_MAX_ASYNC_QUEUE", DEFAULT_MAX_ASYNC_QUEUE, int)),
            shutdown_grace_s=_number(env, "DEEPLIIF_SHUTDOWN_GRACE_S", DEFAULT_SHUTDOWN_GRACE_S),
            pyramid_compression=_pyramid_compression(env),
        )


def _pyramid_compression(env: Mapping[str, str]) -> PyramidCompression:
    value = env.get("DEEPLIIF_PYRAMID_COMPRESSION") or PyramidCompression.default().value
    try:
        return PyramidCompression(value)
    except ValueError:
        accepted = ", ".join(member.value for member in PyramidCompression)
        raise ArgumentError(f"DEEPLIIF_PYRAMID_COMPRESSION must be one of {accepted}; got {value!r}") from None


def cpd_from_environment(env: Mapping[str, str]) -> CpdSettings | None:
    names = ("DEEPLIIF_CPD_URL", "DEEPLIIF_CPD_VOLUME", "DEEPLIIF_CPD_USERNAME", "DEEPLIIF_CPD_API_KEY")
    given = [name for name in names if env.get(name)]
    if not given:
        return None
    if len(given) != len(names):
        missing = sorted(set(names) - set(given))
        raise ArgumentError(f"a Cloud Pak for Data volume needs all of {', '.join(names)}; "
                            f"missing {', '.join(missing)}")
    return CpdSettings(*(env[name] for name in names),
                       verify_tls=env.get("DEEPLIIF_CPD_VERIFY_TLS", "1") not in ("0", "false", "no"))
