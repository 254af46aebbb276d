"""`engine.Session`: a model directory opened on the best backend available, with its artifacts cached.

This is what the EDI kernel holds for its whole life: open once (export/build or load from the cache,
warm up), then `infer` images or `run` tile batches. `auto` tries the backends fastest-first for the
device and logs why each one it skipped could not be used.
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepliif.contract import run_in_chunks
from deepliif.errors import ArgumentError, DeepLIIFError
from deepliif.imageio import file_sha256
from deepliif.inference import ImageSink, InferenceOptions, InferenceResult, infer_images
from deepliif.logs import project_logger
from deepliif.model_files import ModelFiles, read_model_files
from engine.errors import ArtifactError, BackendUnavailableError

from .artifacts import Artifact, ArtifactLoaders, Provenance
from .backends import Backend, BackendKind
from .backends.precision import Precision
from .cache import ArtifactCache
from .devices import cuda_available, free_cuda_memory, is_sticky_cuda_fault
from .samples import synthetic_ihc

if TYPE_CHECKING:  # PyTorch loads only for the torch backend and for exports (see `Session.model`)
    from deepliif.model_dir import DeepLIIFModel

logger = project_logger("engine")

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


def tensorrt_ep_cache_dir(root: Path, artifact: Artifact) -> Path:
    """Where ONNX Runtime's TensorRT EP keeps this graph's engines and timing cache: a folder per artifact.
    The EP names its cached engines from the graph's file name, node and input names and library versions,
    not its weights, so one shared folder would hand a second model of the same architecture, a model
    updated in place or a re-calibrated INT8 graph (same names, new scales) the first one's engine."""
    key = artifact.provenance.cache_key or file_sha256(artifact.path)[:24]
    return Path(root) / "onnxruntime-tensorrt" / key


class Session:
    """Chooses a runner and batches tiles through it; its artifacts come from `loaders`.

    `onnx`: serve this fused graph (from `calibrate` or `export onnx`) instead of exporting one into
    the cache; INT8 and FP16 need one that passed its accuracy gate, unless `force_ungated`.
    `loaders`: where the artifacts come from (default: this model's through the artifact cache)."""

    def __init__(self, model_dir: Path | str, backend: str | BackendKind = "auto", precision: str = "fp32",
                 device: str = "auto", cache_dir: Path | None = None, batch_size: int | None = None,
                 onnx: Path | None = None, force_ungated: bool = False, loaders: ArtifactLoaders | None = None,
                 **backend_options) -> None:
        start = time.perf_counter()
        self.startup: dict[str, float] = {}  # seconds by stage, for the start-up report
        with self._stage("read model directory"):
            self.files: ModelFiles = read_model_files(model_dir)  # the weights load only if a backend needs them
        self.precision = Precision.parse(precision)
        self.device = device
        self.skipped: list[str] = []  # with backend auto: why each backend tried before the chosen one failed
        self.provenance: Provenance | None = None  # of the artifact being served (None: the torch backend)
        with self._stage("check given graph" if onnx is not None else "artifact loaders"):
            self.loaders = loaders or ArtifactLoaders(self.files, self.precision, ArtifactCache(cache_dir),
                                                      lambda: self.model, onnx, force_ungated)
        self.backend = self._open(_backend_for(BackendKind.parse(backend), backend_options), backend_options)
        self.info = self.backend.info
        self.output_names = self.backend.output_names
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
        order = list(GPU_ORDER if self.device != "cpu" and cuda_available() else CPU_ORDER)
        while order:
            candidate = order.pop(0)
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
                if self.device != "cpu" and is_sticky_cuda_fault(exc):
                    order = self._after_cuda_fault(order)
                continue
            logger.info("auto: chose %s%s", candidate.value,
                        f" (not {'; '.join(self.skipped)})" if self.skipped else " (first choice)")
            return backend
        raise BackendUnavailableError("no backend can run here: " + "; ".join(self.skipped))

    def _after_cuda_fault(self, remaining: list[BackendKind]) -> list[BackendKind]:
        """A device fault is sticky for the process: no other CUDA backend may be tried in it; the
        remaining candidates run on the CPU, and the log says why."""
        self.device = "cpu"
        self.skipped.append("cuda: a device fault stays for the life of the process; the rest run on the CPU")
        logger.warning("auto: a CUDA device fault leaves this process's GPU unusable until it restarts; "
                       "falling back to the CPU (restart the process to use the GPU again)")
        return [kind for kind in CPU_ORDER if kind in remaining]

    def _open_kind(self, kind: BackendKind, options: dict) -> Backend:
        """One backend kind through its opener: each names the artifact loader it needs and the runner
        it opens on it (Polygraphy's loader/runner split)."""
        openers = {BackendKind.TORCH: self._open_torch, BackendKind.ONNXRUNTIME: self._open_onnxruntime,
                   BackendKind.TENSORRT: self._open_tensorrt}
        if kind is not BackendKind.TORCH and self.precision is Precision.INT8 and self.loaders.given is None:
            raise BackendUnavailableError(f"{kind.value}: int8 runs a calibrated, gated Q/DQ ONNX: make one "
                                          "with `deepliif-engine calibrate` and pass it (--onnx OUT/deepliif.onnx)")
        return openers[kind](options)

    def _open_torch(self, options: dict) -> Backend:
        """No artifact: the PyTorch generators themselves."""
        from .backends.torch_backend import TorchBackend
        return TorchBackend(self.model, self.device, self.precision, **options)

    def _open_onnxruntime(self, options: dict) -> Backend:
        """The CPU-optimised graph on the CPU EP alone (unless the user gave a graph), else the fused graph
        with the TensorRT EP's engines in this artifact's own folder."""
        from .backends.onnxruntime_backend import OnnxRuntimeBackend, available_providers
        providers = available_providers(self.device, self.precision)
        if not providers:
            raise BackendUnavailableError(f"onnxruntime offers no provider for device {self.device!r}")
        if providers == ["CPUExecutionProvider"] and self.loaders.given is None:
            return self._open_cached(self.loaders.ort_optimized, lambda artifact: OnnxRuntimeBackend(
                artifact.path, "cpu", self.precision, preoptimized=True))
        return self._open_cached(self.loaders.onnx, lambda artifact: OnnxRuntimeBackend(
            artifact.path, self.device, self.precision,
            cache_dir=tensorrt_ep_cache_dir(self.loaders.cache.root, artifact)))

    def _open_tensorrt(self, options: dict) -> Backend:
        """A plan built (and checked) through the cache from the fused graph."""
        from .backends.tensorrt_backend import TensorRTBackend
        from .backends.tensorrt_plan import tensorrt_module
        from export.tensorrt_build import TensorRTBuildConfig
        tensorrt_module()  # fail fast, with what to install, before exporting anything
        build_config = options.get("build", TensorRTBuildConfig())
        return self._open_cached(lambda rebuild: self.loaders.plan(build_config, rebuild),
                                 lambda artifact: TensorRTBackend(artifact.path))

    def _open_cached(self, load: Callable[[bool], Artifact], open_backend: Callable[[Artifact], Backend]) -> Backend:
        """Open the backend on its artifact; a cached artifact that fails to load is rebuilt once."""
        with self._stage("artifact cache"):
            artifact = load(False)
        try:
            with self._stage("open backend"):
                backend = open_backend(artifact)
        except ArtifactError as exc:
            if artifact.provenance.cache_key is None and artifact.provenance.kind.value == "onnx":
                raise  # the user's own graph: nothing to rebuild
            logger.warning("cached artifact %s does not load (%s); rebuilding it", artifact.path, exc)
            with self._stage("artifact cache"):
                artifact = load(True)
            with self._stage("open backend"):
                backend = open_backend(artifact)
        self.provenance = artifact.provenance
        return backend

    @property
    def accuracy(self) -> dict | None:
        """The passed accuracy-gate report of the reduced-precision graph being served (None: fp32, forced)."""
        return self.provenance.gate if self.provenance else None

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Any number of tiles; split to the backend's batch limit."""
        return run_in_chunks(self.backend.run, batch, self.info.max_batch)

    def warmup(self) -> float:
        start = time.perf_counter()
        self.run(synthetic_ihc()[None])
        return time.perf_counter() - start

    def infer(self, image: np.ndarray, options: InferenceOptions | None = None) -> InferenceResult:
        return self.infer_many([image], options)[0]

    def infer_many(self, images: Sequence[np.ndarray],
                   options: InferenceOptions | Sequence[InferenceOptions] | None = None,
                   progress: Callable[[int], None] | None = None,
                   run: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
                   sink: ImageSink | None = None) -> list[InferenceResult]:
        """The images through the threaded tile loop; `run` wraps `self.run` (the kernel takes turns per batch);
        `sink` hears each image's results as they are made (see `infer_images`)."""
        options = options or InferenceOptions(batch_size=self.batch_size)
        for each in [options] if isinstance(options, InferenceOptions) else options:
            missing = [name for name in each.network_names if name not in self.output_names]
            if missing:
                raise ArgumentError(f"this session's {self.info.name} backend gives no {', '.join(missing)}: "
                                    "open it with seg_intermediate (--seg-intermediate, the torch backend)")
        return infer_images(run or self.run, images, options, progress=progress, sink=sink)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _backend_for(kind: BackendKind, options: dict) -> BackendKind:
    """The kind to open: with `seg_intermediate` (each segmentation generator's own output as well) only
    the torch backend can serve, since exported graphs and plans carry the five outputs alone."""
    if not options.get("seg_intermediate"):
        return kind
    if kind is BackendKind.AUTO:
        logger.info("seg_intermediate: the per-generator segmentations come from the torch backend")
        return BackendKind.TORCH
    if kind is not BackendKind.TORCH:
        raise ArgumentError(f"seg_intermediate (--seg-intermediate) needs the torch backend: the {kind.value} "
                            "backend serves an exported graph with the five outputs only; use --backend torch")
    return kind


def _probe(backend: Backend) -> None:
    """On a GPU, one tile before committing: execution-provider and plan errors show at the first run,
    and a kernel that finds them at its first request has already started on a backend that cannot serve."""
    if backend.info.device == "cuda":
        backend.run(synthetic_ihc()[None])
