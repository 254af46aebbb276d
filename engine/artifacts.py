"""Artifacts apart from sessions (Polygraphy's loaders): each loader returns the file a runner opens and a
typed record of where it came from, producing it through the artifact cache when it is not there yet.

Two different guarantees, two types and two files:
- `SanityCheck` (`sanity-check.json`, written by the cache): a fresh export agrees with PyTorch on one
  synthetic tile. It catches a broken export; it says nothing about cell counts.
- the accuracy gate (`accuracy.json`, written by `calibrate`): held-out images, cell counts. Only a passed
  gate admits an INT8 or FP16 graph (or an explicit `force_ungated`, logged).
The ONNX exporter and PyTorch are imported only when a graph must be exported, and TensorRT only when a
plan is built or loaded, so a warm start that serves a cached graph never loads PyTorch.
"""
from __future__ import annotations

import enum
import importlib.metadata
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepliif.contract import FUSED_GRAPH, NETWORK_TILE
from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256, write_json
from deepliif.logs import project_logger
from deepliif.model_files import ModelFiles
from engine.errors import AccuracyGateError, ArtifactError, ValidationError

from calibration.gate import ACCURACY_FILE, require_passed
from export.config import OnnxExportConfig, Tolerance
from export.onnx_checks import check_fused_signature, check_onnx
from export.tensorrt_build import (PLAN_FILE, GpuInfo, TensorRTBuildConfig, build_plan, onnx_precision,
                                   tensorrt_module, timing_cache_path)

from .backends.precision import Precision
from .cache import MANIFEST, ArtifactCache, cache_key, cpu_signature
from .samples import synthetic_ihc

if TYPE_CHECKING:
    from deepliif.model_dir import DeepLIIFModel

logger = project_logger("engine")

OPTIMIZED_ONNX = "deepliif.ort-optimized.onnx"
SANITY_FILE = "sanity-check.json"
PLAN_CHECK_FILE = "plan-check.json"
PLAN_CHECK_BATCHES = (1, 2)  # a batch of one and a batch of two, on two tiles


class ArtifactKind(enum.Enum):
    ONNX = "onnx"
    ORT_OPTIMIZED = "onnxruntime-optimized"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class SanityCheck:
    """A fresh export against PyTorch on one synthetic tile, per output (not an accuracy gate)."""

    passed: bool
    max_abs: dict[str, int]
    psnr_db: dict[str, float | None]  # None: identical
    onnx_sha256: str

    @classmethod
    def from_validation(cls, report: dict, onnx_sha256: str) -> SanityCheck:
        """The worst figures of an `export.validate` report, over every batch size it ran."""
        max_abs: dict[str, int] = {}
        psnr: dict[str, float | None] = {}
        for batch in report["batches"].values():
            for name, stats in batch["outputs"].items():
                max_abs[name] = max(max_abs.get(name, 0), stats["max_abs"])
                known = [v for v in (psnr.get(name), stats["psnr_db"]) if v is not None]
                psnr[name] = min(known) if known else None
        return cls(bool(report["passed"]), max_abs, psnr, onnx_sha256)

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> SanityCheck:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ArtifactError(f"{path}: no sanity check beside the cached export") from None
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: unreadable sanity check ({exc})") from exc


@dataclass(frozen=True)
class Provenance:
    """What an artifact is and what vouches for it: read by the session's report and by `package`."""

    kind: ArtifactKind
    precision: Precision
    model_sha256: str | None
    cache_key: str | None = None  # None: a file the user gave
    sanity: SanityCheck | None = None
    gate: dict | None = None  # the passed accuracy-gate report of a reduced-precision graph

    @classmethod
    def from_manifest(cls, manifest: Path) -> Provenance:
        """A published cache entry's provenance from its manifest (what `package` ships)."""
        record = json.loads(Path(manifest).read_text())
        parts = record["parts"]
        return cls(ArtifactKind(parts["kind"]), Precision.parse(parts["export"]["precision"]), parts.get("model"),
                   record.get("key"))

    def as_dict(self) -> dict:
        return {**asdict(self), "kind": self.kind.value, "precision": self.precision.value}


@dataclass(frozen=True)
class Artifact:
    path: Path
    provenance: Provenance


def onnx_entry_parts(model_sha256: str, precision: Precision) -> dict:
    """What names the cache entry of a model's exported fused ONNX (also how `package --onnx` files one)."""
    import onnx
    return {"kind": ArtifactKind.ONNX.value, "model": model_sha256,
            "export": OnnxExportConfig(precision=precision).key(),
            "torch": importlib.metadata.version("torch"), "onnx": onnx.__version__}


class ArtifactLoaders:
    """The artifacts of one model at one precision. `model()` loads the PyTorch generators (only called
    to export); `onnx` is a graph the user gave (from `export onnx` or `calibrate`) used instead of the
    cache's export."""

    def __init__(self, files: ModelFiles, precision: Precision, cache: ArtifactCache,
                 model: Callable[[], DeepLIIFModel], onnx: Path | None = None, force_ungated: bool = False) -> None:
        self.files, self.precision, self.cache = files, precision, cache
        self.model, self.force_ungated = model, force_ungated
        self._model_sha256: str | None = None
        self.given = None if onnx is None else self._given(Path(onnx))

    @property
    def model_sha256(self) -> str:
        if self._model_sha256 is None:
            self._model_sha256 = self.files.weights_sha256(self.cache.hashes)
        return self._model_sha256

    def _given(self, path: Path) -> Artifact:
        """A given graph must be the fused pipeline, in the precision asked for, gated if reduced, and
        (when its gate report says) made from this very model."""
        summary = check_onnx(path)
        check_fused_signature(summary)
        graph_precision = onnx_precision(summary)
        if graph_precision is not self.precision:
            raise ArgumentError(f"{path} is a {graph_precision.value} graph; precision {self.precision.value} "
                                "was asked for")
        gate = self._gate(path)
        if gate and gate.get("model_sha256") not in (None, self.model_sha256):
            raise ArtifactError(f"{path} was made from another model than {self.files.directory} "
                                "(weights sha256 differs)")
        return Artifact(path, Provenance(ArtifactKind.ONNX, self.precision, gate and gate.get("model_sha256"),
                                         gate=gate))

    def _gate(self, path: Path) -> dict | None:
        if self.precision is Precision.FP32:
            return None
        return require_passed(path, self.force_ungated, self.cache.hashes)

    def onnx(self, rebuild: bool = False) -> Artifact:
        """The given graph, or the fused export from the cache. A reduced-precision entry is served only
        with a passed gate report in it (`package --onnx` files a calibrated graph that way) or when forced:
        the cache's own export has only its sanity check."""
        if self.given is not None:
            return self.given
        parts = onnx_entry_parts(self.model_sha256, self.precision)
        if self.precision is not Precision.FP32 and not self.force_ungated:
            self._require_gated_entry(self.cache.root / cache_key(parts))
        entry = self.cache.get(parts, self._export, check=self._vouched, rebuild=rebuild)
        path = entry / FUSED_GRAPH.file_name
        gate = self._gate(path) if (entry / ACCURACY_FILE).is_file() else None
        sanity = SanityCheck.read(entry / SANITY_FILE) if (entry / SANITY_FILE).is_file() else None
        return Artifact(path, Provenance(ArtifactKind.ONNX, self.precision, self.model_sha256, entry.name,
                                         sanity, gate))

    def _require_gated_entry(self, entry: Path) -> None:
        try:
            require_passed(entry / FUSED_GRAPH.file_name, memo=self.cache.hashes)
        except AccuracyGateError as exc:
            raise AccuracyGateError(
                f"{self.precision.value} is served only from a graph that passed the accuracy gate: make one with "
                f"`deepliif-engine calibrate --precision {self.precision.value}` and pass it (--onnx), or force "
                "an ungated export", exc.failures, exc.report) from None

    def _vouched(self, entry: Path) -> None:
        """The cache's own check: an entry is served when a passed gate report or a passed sanity check
        for its very file is in it; otherwise it is rebuilt."""
        path = entry / FUSED_GRAPH.file_name
        if (entry / ACCURACY_FILE).is_file():
            require_passed(path, self.force_ungated, self.cache.hashes)
            return
        check = SanityCheck.read(entry / SANITY_FILE)
        if not check.passed or check.onnx_sha256 != file_sha256(path, self.cache.hashes):
            raise ArtifactError(f"{entry}: the cached export failed its sanity check or is not the file checked")

    def _export(self, staging: Path) -> None:
        from export.onnx_export import export_pipeline
        path = staging / FUSED_GRAPH.file_name
        export_pipeline(self.model(), path, OnnxExportConfig(precision=self.precision))
        sanity_check(self.model(), path, self.precision).write(staging / SANITY_FILE)

    def ort_optimized(self, rebuild: bool = False) -> Artifact:
        """The fused graph as ONNX Runtime optimises it for this CPU, saved once: loading it skips the
        optimiser (seconds for the full-size model at every start). ONNX Runtime says such a graph may
        hold hardware-specific layouts, so the entry is keyed by the CPU's instruction set and ORT version."""
        from .backends.onnxruntime_backend import onnxruntime_version, save_optimized
        source = self.onnx(rebuild)
        parts = {**onnx_entry_parts(self.model_sha256, self.precision), "kind": ArtifactKind.ORT_OPTIMIZED.value,
                 "onnxruntime": onnxruntime_version(), "cpu": cpu_signature(), "weights": "external"}
        entry = self.cache.get(parts, lambda staging: save_optimized(source.path, staging / OPTIMIZED_ONNX),
                               rebuild=rebuild)
        provenance = Provenance(ArtifactKind.ORT_OPTIMIZED, self.precision, source.provenance.model_sha256,
                                entry.name, source.provenance.sanity, source.provenance.gate)
        return Artifact(entry / OPTIMIZED_ONNX, provenance)

    def plan(self, build_config: TensorRTBuildConfig, rebuild: bool = False) -> Artifact:
        tensorrt = tensorrt_module()
        gpu = GpuInfo.current()
        source = self.onnx()
        parts = {**onnx_entry_parts(self.model_sha256, self.precision), "kind": ArtifactKind.TENSORRT.value,
                 "build": build_config.key(), "gpu": [gpu.name, gpu.compute_capability],
                 "tensorrt": tensorrt.__version__}
        if self.given is not None:
            parts["onnx_sha256"] = file_sha256(source.path)
        timing_cache = timing_cache_path(self.cache.root, tensorrt.__version__, gpu)
        timing = TensorRTBuildConfig(**{**build_config.__dict__, "timing_cache": timing_cache})
        def build_and_check(staging: Path) -> None:
            build_plan(source.path, staging, timing)
            write_json(staging / PLAN_CHECK_FILE, check_plan(staging / PLAN_FILE, source.path, self.precision))

        entry = self.cache.get(parts, build_and_check, rebuild=rebuild)
        provenance = Provenance(ArtifactKind.TENSORRT, self.precision, source.provenance.model_sha256, entry.name,
                                source.provenance.sanity, source.provenance.gate)
        return Artifact(entry / PLAN_FILE, provenance)


def sanity_check(model: DeepLIIFModel, onnx_path: Path, precision: Precision) -> SanityCheck:
    """A freshly exported cache artifact is checked on one tile before it is published: cheap insurance
    that the cache never serves a wrong graph (`export onnx` and `calibrate` do the full checks)."""
    from deepliif.pipeline import FusedPipeline, TileRunner

    from export.validate import validate

    from .backends.onnxruntime_backend import OnnxRuntimeBackend
    tile = synthetic_ihc(NETWORK_TILE, NETWORK_TILE, seed=1)[None]
    with OnnxRuntimeBackend(onnx_path, device="cpu", precision=precision) as candidate:
        report = validate(TileRunner(FusedPipeline(model)).run, candidate.run, tile, (1,),
                          Tolerance.for_precision(precision))
    return SanityCheck.from_validation(report, file_sha256(onnx_path))


def check_plan(plan_path: Path, onnx_path: Path, precision: Precision) -> dict:
    """A freshly built plan against ONNX Runtime on the CPU running the graph it was built from, before
    it is published: the tactics TensorRT chose, its fusions and its reduced-precision kernels are where a
    plan can go wrong while the graph stays right. It must meet its precision's contract (fp32: one grey
    level; fp16/int8: the gate's image quality and positive-cell tolerance), or nothing is published and
    the plan is never served. Returns the record kept beside the plan."""
    from export.validate import validate

    from .backends.onnxruntime_backend import OnnxRuntimeBackend
    from .backends.tensorrt_backend import TensorRTBackend
    tiles = np.stack([synthetic_ihc(NETWORK_TILE, NETWORK_TILE, seed=seed) for seed in (1, 2)])
    with OnnxRuntimeBackend(onnx_path, device="cpu", precision=precision) as reference, \
            TensorRTBackend(plan_path) as candidate:
        try:
            report = validate(reference.run, candidate.run, tiles, PLAN_CHECK_BATCHES,
                              Tolerance.for_precision(precision))
        except ValidationError as exc:
            raise ArtifactError(f"{plan_path.name}: the TensorRT plan misses its {precision.value} contract "
                                f"against ONNX Runtime on the CPU ({exc}); it is not published") from exc
    check = SanityCheck.from_validation(report, file_sha256(onnx_path))
    return {**asdict(check), "plan_sha256": file_sha256(plan_path), "reference": "onnxruntime cpu"}


def published_entries(cache_dir: Path, model_sha256: str) -> list[tuple[Path, Provenance]]:
    """Every published cache entry made from this model, with its provenance."""
    entries = []
    for manifest in sorted(Path(cache_dir).glob(f"*/{MANIFEST}")):
        try:
            provenance = Provenance.from_manifest(manifest)
        except (OSError, ValueError, KeyError):
            continue
        if provenance.model_sha256 == model_sha256:
            entries.append((manifest.parent, provenance))
    return entries
