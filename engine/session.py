"""`engine.Session`: a model directory opened on the best backend available, with its artifacts cached.

This is what the EDI kernel holds for its whole life: open once (export/build or load from the cache,
warm up), then `infer` images or `run` tile batches. `auto` tries the backends fastest-first for the
device and logs why each one it skipped could not be used.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from deepliif.contract import NETWORK_TILE, run_in_chunks
from deepliif.errors import ArgumentError, ArtifactError, BackendUnavailableError, DeepLIIFError
from deepliif.imageio import file_sha256, write_json
from deepliif.inference import InferenceOptions, InferenceResult
from deepliif.model_files import ModelFiles, read_model_files

from calibration.gate import ACCURACY_FILE, require_passed
from export.config import FUSED_ONNX, OnnxExportConfig, Precision, Tolerance
from export.onnx_checks import check_fused_signature, check_onnx
from export.tensorrt_build import PLAN_FILE, GpuInfo, TensorRTBuildConfig, build_plan, onnx_precision, \
    tensorrt_module, timing_cache_path
from export.validate import validate

from . import logger
from .backends import Backend, BackendKind
from .cache import ArtifactCache, cpu_signature
from .samples import synthetic_ihc
from .devices import cuda_available, free_cuda_memory
from .tile_pipeline import infer_images

if TYPE_CHECKING:  # PyTorch loads only for the torch backend and for exports (see `Session.model`)
    from deepliif.model_dir import DeepLIIFModel

OPTIMIZED_ONNX = "deepliif.ort-optimized.onnx"
# fastest first, per device class (docs/BENCHMARKS.md: onnxruntime beat eager torch on the CPU machine)
GPU_ORDER = (BackendKind.TENSORRT, BackendKind.ONNXRUNTIME, BackendKind.TORCH)
CPU_ORDER = (BackendKind.ONNXRUNTIME, BackendKind.TORCH)
CPU_BATCH = 4
GPU_BYTES_PER_TILE = {Precision.FP32: 3 << 30, Precision.FP16: 3 << 29, Precision.INT8: 3 << 28}


def choose_batch_size(free_bytes: int | None, precision: Precision, cap: int | None) -> int:
    """Tiles per backend call: what fits in 80% of free device memory (activation estimate per tile
    for the nine full-size generators), at most `cap` (the backend's profile) and 32; CPU: 4."""
    if free_bytes is None:
        size = CPU_BATCH
    else:
        size = max(1, min(32, int(free_bytes * 0.8) // GPU_BYTES_PER_TILE[precision]))
    return min(size, cap) if cap else size


class Session:
    """`onnx`: serve this fused graph (from `calibrate` or `export onnx`) instead of exporting one into
    the cache; INT8 needs one. A reduced-precision graph must have passed its accuracy gate, checked
    here and again for every cached FP16 export, unless `force_ungated`."""

    def __init__(self, model_dir: Path | str, backend: str | BackendKind = "auto", precision: str = "fp32",
                 device: str = "auto", cache_dir: Path | None = None, batch_size: int | None = None,
                 onnx: Path | None = None, force_ungated: bool = False, **backend_options) -> None:
        start = time.perf_counter()
        self.startup: dict[str, float] = {}  # seconds by stage, for the start-up report
        with self._stage("read model directory"):
            self.files: ModelFiles = read_model_files(model_dir)  # the weights load only if a backend needs them
        self.precision = Precision.parse(precision)
        self.device = device
        self.cache = ArtifactCache(cache_dir)
        self.force_ungated = force_ungated
        self.accuracy: dict | None = None  # the gate report of the reduced-precision graph being served
        self.skipped: list[str] = []  # with backend auto: why each backend tried before the chosen one failed
        self.onnx = None if onnx is None else self._check_given_onnx(Path(onnx))
        self.backend = self._open(BackendKind.parse(backend), backend_options)
        self.info = self.backend.info
        if batch_size is None:
            free = free_cuda_memory() if self.info.device == "cuda" else None
            batch_size = choose_batch_size(free, self.precision, self.info.max_batch)
        self.batch_size = batch_size
        self.start_seconds = time.perf_counter() - start
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.startup.items())
        logger.info("session ready in %.1f s (%s): %s %s on %s, batch %d (%s)", self.start_seconds, stages,
                    self.info.name, self.precision.value, self.info.device, self.batch_size, self.info.detail)

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.startup[name] = round(self.startup.get(name, 0.0) + time.perf_counter() - start, 3)

    @functools.cached_property
    def model(self) -> DeepLIIFModel:
        """The PyTorch generators: loaded for the torch backend and for exports, never to serve a cached one."""
        from deepliif.model_dir import load_model_dir
        with self._stage("load PyTorch model"):
            return load_model_dir(self.files.directory)

    def _open(self, kind: BackendKind, options: dict) -> Backend:
        """The backend asked for, or with `auto` the first in order that opens and, on a GPU, runs one
        tile. Any failure of a candidate (library missing, export or plan build error, a plan that does
        not deserialise, an execution-provider error) moves on to the next; only argument errors, which
        every candidate would meet, stop the search. `self.skipped` says why each earlier one was not used."""
        if kind is not BackendKind.AUTO:
            return self._open_kind(kind, options)
        order = GPU_ORDER if self.device != "cpu" and cuda_available() else CPU_ORDER
        for candidate in order:
            backend = None
            try:
                backend = self._open_kind(candidate, options)
                _probe(backend)
            except ArgumentError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of one backend is a reason to try the next
                if backend is not None:
                    backend.close()
                reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DeepLIIFError) else str(exc)
                self.skipped.append(f"{candidate.value}: {reason}")
                log = logger.info if isinstance(exc, BackendUnavailableError) else logger.warning
                log("auto: %s cannot serve here: %s", candidate.value, reason)
                continue
            logger.info("auto: chose %s%s", candidate.value,
                        f" (not {'; '.join(self.skipped)})" if self.skipped else " (first choice)")
            return backend
        raise BackendUnavailableError("no backend can run here: " + "; ".join(self.skipped))

    def _open_kind(self, kind: BackendKind, options: dict) -> Backend:
        if kind is BackendKind.TORCH:
            from .backends.torch_backend import TorchBackend
            return TorchBackend(self.model, self.device, self.precision, **options)
        if self.precision is Precision.INT8 and self.onnx is None:
            raise BackendUnavailableError(f"{kind.value}: int8 runs a calibrated, gated Q/DQ ONNX: make one "
                                          "with `deepliif-engine calibrate` and pass it (--onnx OUT/deepliif.onnx)")
        if kind is BackendKind.ONNXRUNTIME:
            from .backends.onnxruntime_backend import OnnxRuntimeBackend, available_providers
            if not available_providers(self.device, self.precision):
                raise BackendUnavailableError(f"onnxruntime offers no provider for device {self.device!r}")
            engines = self.cache.root / "onnxruntime-tensorrt"  # the TensorRT EP's engine and timing caches
            if self.onnx is not None:
                return OnnxRuntimeBackend(self.onnx, self.device, self.precision, cache_dir=engines)
            if available_providers(self.device, self.precision) == ["CPUExecutionProvider"]:
                return self._open_cached(self._optimized_entry, lambda entry: OnnxRuntimeBackend(
                    entry / OPTIMIZED_ONNX, "cpu", self.precision, preoptimized=True))
            return self._open_cached(self._onnx_entry, lambda entry: OnnxRuntimeBackend(
                entry / FUSED_ONNX, self.device, self.precision, cache_dir=engines))
        from .backends.tensorrt_backend import TensorRTBackend
        tensorrt_module()  # fail fast, with what to install, before exporting anything
        build_config = options.get("build", TensorRTBuildConfig())
        return self._open_cached(lambda rebuild: self._plan_entry(build_config, rebuild),
                                 lambda entry: TensorRTBackend(entry / PLAN_FILE))

    def _open_cached(self, get_entry: Callable[[bool], Path], open_backend: Callable[[Path], Backend]) -> Backend:
        """Open the backend on its cached artifact; an artifact that fails to load is rebuilt once."""
        with self._stage("artifact cache"):
            entry = get_entry(False)
        try:
            with self._stage("open backend"):
                return open_backend(entry)
        except ArtifactError as exc:
            logger.warning("cached artifact %s does not load (%s); rebuilding it", entry, exc)
        with self._stage("artifact cache"):
            entry = get_entry(True)
        with self._stage("open backend"):
            return open_backend(entry)

    def _check_given_onnx(self, path: Path) -> Path:
        """A given graph must be the fused pipeline, in the precision asked for, gated if reduced, and
        (when its gate report says) made from this very model."""
        summary = check_onnx(path)
        check_fused_signature(summary)
        graph_precision = onnx_precision(summary)
        if graph_precision is not self.precision:
            raise ArgumentError(f"{path} is a {graph_precision.value} graph; precision {self.precision.value} "
                                "was asked for")
        report = self._gated(path)
        if report and report.get("model_sha256") not in (None, self._model_sha256):
            raise ArtifactError(f"{path} was made from another model than {self.files.directory} "
                                "(weights sha256 differs)")
        return path

    def _gated(self, path: Path) -> dict | None:
        if self.precision is not Precision.FP32:
            self.accuracy = require_passed(path, self.force_ungated, self.cache.hashes)
        return self.accuracy

    @functools.cached_property
    def _model_sha256(self) -> str:
        with self._stage("hash weights"):
            return self.files.weights_sha256(self.cache.hashes)

    def _onnx_parts(self) -> dict:
        return onnx_entry_parts(self._model_sha256, self.precision)

    def _onnx_entry(self, rebuild: bool = False) -> Path:
        config = OnnxExportConfig(precision=self.precision)

        def build(staging: Path) -> None:
            from export.onnx_export import export_pipeline
            export_pipeline(self.model, staging / FUSED_ONNX, config)
            report = quick_validation(self.model, staging / FUSED_ONNX, self.precision)
            write_json(staging / ACCURACY_FILE, {**report, "precision": self.precision.value,
                                                 "model_sha256": self._model_sha256,
                                                 "onnx_sha256": file_sha256(staging / FUSED_ONNX)})

        # the cache's own check: an entry whose accuracy report is missing or failed is rebuilt, not served
        return self.cache.get(self._onnx_parts(), build, check=lambda entry: self._gated(entry / FUSED_ONNX),
                              rebuild=rebuild)

    def _optimized_entry(self, rebuild: bool = False) -> Path:
        """The fused graph as ONNX Runtime optimises it for this CPU, saved once: loading it skips the
        optimiser (seconds for the full-size model at every start). ONNX Runtime says such a graph may
        hold hardware-specific layouts, so the entry is keyed by the CPU's instruction set and ORT version."""
        from .backends.onnxruntime_backend import onnxruntime_version, save_optimized
        source = self._onnx_entry(rebuild)
        parts = {**self._onnx_parts(), "kind": "onnxruntime-optimized", "onnxruntime": onnxruntime_version(),
                 "cpu": cpu_signature()}
        return self.cache.get(parts, lambda staging: save_optimized(source / FUSED_ONNX, staging / OPTIMIZED_ONNX),
                              rebuild=rebuild)

    def _plan_entry(self, build_config: TensorRTBuildConfig, rebuild: bool = False) -> Path:
        tensorrt = tensorrt_module()
        gpu = GpuInfo.current()
        parts = {**self._onnx_parts(), "kind": "tensorrt", "build": build_config.key(),
                 "gpu": [gpu.name, gpu.compute_capability], "tensorrt": tensorrt.__version__}
        if self.onnx is not None:
            source = self.onnx
            parts["onnx_sha256"] = file_sha256(source)
        else:
            source = self._onnx_entry() / FUSED_ONNX
        timing_cache = timing_cache_path(self.cache.root, tensorrt.__version__, gpu)
        timing = TensorRTBuildConfig(**{**build_config.__dict__, "timing_cache": timing_cache})
        return self.cache.get(parts, lambda staging: build_plan(source, staging, timing), rebuild=rebuild)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Any number of tiles; split to the backend's batch limit."""
        return run_in_chunks(self.backend.run, batch, self.info.max_batch)

    def warmup(self) -> float:
        start = time.perf_counter()
        self.run(synthetic_ihc()[None])
        return time.perf_counter() - start

    def infer(self, image: np.ndarray, options: InferenceOptions | None = None) -> InferenceResult:
        return self.infer_many([image], options)[0]

    def infer_many(self, images: Sequence[np.ndarray], options: InferenceOptions | None = None,
                   progress=None) -> list[InferenceResult]:
        options = options or InferenceOptions(batch_size=self.batch_size)
        return infer_images(self.run, images, options, progress)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def onnx_entry_parts(model_sha256: str, precision: Precision) -> dict:
    """What names the cache entry of a model's exported fused ONNX (also how `package --onnx` files one)."""
    return {"kind": "onnx", "model": model_sha256, "export": OnnxExportConfig(precision=precision).key(),
            "torch": importlib.metadata.version("torch"), "onnx": onnx.__version__}


def _probe(backend: Backend) -> None:
    """On a GPU, one tile before committing: execution-provider and plan errors show at the first run,
    and a kernel that finds them at its first request has already started on a backend that cannot serve."""
    if backend.info.device == "cuda":
        backend.run(synthetic_ihc()[None])


def quick_validation(model: DeepLIIFModel, onnx_path: Path, precision: Precision) -> dict:
    """A freshly exported cache artifact is checked on one tile before it is published: cheap insurance
    that the cache never serves a wrong graph (`export onnx` and `calibrate` do the full checks)."""
    from deepliif.pipeline import FusedPipeline, TileRunner

    from .backends.onnxruntime_backend import OnnxRuntimeBackend
    tile = synthetic_ihc(NETWORK_TILE, NETWORK_TILE, seed=1)[None]
    with OnnxRuntimeBackend(onnx_path, device="cpu", precision=precision) as candidate:
        return validate(TileRunner(FusedPipeline(model)).run, candidate.run, tile, (1,),
                        Tolerance.for_precision(precision))
