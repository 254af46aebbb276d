"""TensorRT plans from the fused ONNX, with an `engine.json` sidecar that says what the plan is for.

TensorRT is imported lazily (`tensorrt_module()`), so this module imports and its metadata and settings
logic is tested on machines without it. Networks are built strongly typed: required for reduced precision
on TensorRT 10, always on (the flag accepted and ignored) on TensorRT 11, where the builder precision
flags and INT8 calibrators are gone. Precision therefore comes from the ONNX itself: an fp16 export, or
a Q/DQ INT8 graph from `calibrate`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deepliif.contract import FUSED_GRAPH, NETWORK_TILE
from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256, write_atomically
from engine.errors import ExportError

from engine.backends.precision import Precision
from engine.backends.tensorrt_plan import (INSTALL_HINT, METADATA_FILE, PLAN_FILE, EngineMetadata, GpuInfo,
                                           tensorrt_module, timing_cache_path)

from . import logger
from .onnx_checks import OnnxSummary, check_fused_signature, check_onnx
from .parser_rules import check_tensorrt_rules

__all__ = ["INSTALL_HINT", "METADATA_FILE", "PLAN_FILE", "EngineMetadata", "GpuInfo", "TensorRTBuildConfig", "build_plan",
           "onnx_precision", "tensorrt_module", "timing_cache_path"]


@dataclass(frozen=True)
class TensorRTBuildConfig:
    """Build settings; everything except the timing-cache location is part of the artifact identity."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 16
    workspace_gib: float = 8.0
    version_compatible: bool = False
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        if not all(isinstance(b, int) and b >= 1 for b in batches) or not \
                self.min_batch <= self.opt_batch <= self.max_batch:
            raise ArgumentError(f"need integers 1 <= min-batch <= opt-batch <= max-batch; got {batches}")
        if not self.workspace_gib > 0:
            raise ArgumentError(f"workspace must be a positive number of GiB; got {self.workspace_gib}")

    def profile(self) -> dict[str, list[int]]:
        tile = [NETWORK_TILE, NETWORK_TILE, 3]
        return {"min": [self.min_batch, *tile], "opt": [self.opt_batch, *tile], "max": [self.max_batch, *tile]}

    def key(self) -> dict:
        return {"profile": self.profile(), "workspace_gib": self.workspace_gib,
                "version_compatible": self.version_compatible}


def onnx_precision(summary: OnnxSummary) -> Precision:
    """What a strongly typed build will run in, read from the graph: Q/DQ nodes mean INT8, fp16
    weights mean FP16."""
    if summary.op_counts.get("QuantizeLinear") or summary.op_counts.get("DequantizeLinear"):
        return Precision.INT8
    return Precision.FP16 if "float16" in summary.initializer_types else Precision.FP32


def build_plan(onnx_path: Path, out_dir: Path, config: TensorRTBuildConfig,
               gate: Callable[[Path, Precision], object] | None = None) -> EngineMetadata:
    """Parse, build with a batch profile, write `deepliif.plan` and `engine.json` (both atomically).

    `gate(onnx_path, precision)` raises to refuse the graph before any TensorRT work (the accuracy gate
    of an INT8/FP16 graph); it runs even where TensorRT is absent.
    """
    # the parser rules fail here, naming nodes, rather than in TensorRT's parser on the GPU
    summary = check_onnx(onnx_path, [check_tensorrt_rules])
    check_fused_signature(summary)
    if gate is not None:
        gate(Path(onnx_path), onnx_precision(summary))
    trt = tensorrt_module()
    gpu = GpuInfo.current()
    start = time.perf_counter()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(_strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    builder_config = _builder_config(trt, builder, config, onnx_precision(summary))
    logger.info("building a TensorRT %s plan for %s (profile %s); this takes minutes", trt.__version__,
                gpu.name, config.profile())
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise ExportError("TensorRT build failed (see the TensorRT messages above)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / PLAN_FILE, bytes(plan))
    _save_timing_cache(builder_config, config.timing_cache)
    metadata = EngineMetadata(
        onnx_sha256=file_sha256(onnx_path), plan_sha256=file_sha256(out_dir / PLAN_FILE),
        tensorrt_version=trt.__version__, gpu_name=gpu.name, compute_capability=gpu.compute_capability,
        precision=onnx_precision(summary).value, profile=config.profile(), workspace_gib=config.workspace_gib,
        version_compatible=config.version_compatible, build_seconds=round(time.perf_counter() - start, 2),
        tf32=_tf32_allowed(onnx_precision(summary)))
    metadata.write(out_dir / METADATA_FILE)
    return metadata


def _strongly_typed_flags(trt) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _tf32_allowed(precision: Precision) -> bool:
    """TF32 rounds fp32 convolution inputs to 10-bit mantissas (TensorRT enables it by default). An fp32
    plan promises the fp32 contract (within one grey level of PyTorch fp32), which TF32 is not validated
    against here, so it is off. An INT8 Q/DQ graph keeps its edge convolutions in fp32 and passed its gate
    without TF32 (ONNX Runtime on the CPU), so it is off there too; an fp16 graph's convolutions are fp16."""
    return precision is Precision.FP16


def _builder_config(trt, builder, config: TensorRTBuildConfig, precision: Precision):
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    shapes = config.profile()
    profile.set_shape(FUSED_GRAPH.input_name, shapes["min"], shapes["opt"], shapes["max"])
    builder_config.add_optimization_profile(profile)
    if config.version_compatible:
        builder_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    # TF32 is not among the precision flags TensorRT 11 removed; strongly typed networks still honour it
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not _tf32_allowed(precision):
        builder_config.clear_flag(tf32)
    _load_timing_cache(builder_config, config.timing_cache)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        builder_config.progress_monitor = monitor
    return builder_config


def _load_timing_cache(builder_config, path: Path | None) -> None:
    """Start from the saved cache; `set_timing_cache` returns False for a cache from another device or
    TensorRT (its header does not match, and mismatches are not ignored): start empty then."""
    cache_bytes = Path(path).read_bytes() if path and Path(path).is_file() else b""
    if builder_config.set_timing_cache(builder_config.create_timing_cache(cache_bytes), False):
        return
    logger.warning("timing cache %s was made on another device or TensorRT version; starting an empty one",
                   path)
    if not builder_config.set_timing_cache(builder_config.create_timing_cache(b""), False):
        raise ExportError("TensorRT refused an empty timing cache")


def _save_timing_cache(builder_config, path: Path | None) -> None:
    if not path:
        return
    cache = builder_config.get_timing_cache()  # documented to return None when the config holds none
    if cache is None:
        logger.warning("TensorRT returned no timing cache to save; %s is left as it was", path)
        return
    write_atomically(Path(path), bytes(cache.serialize()))


def _progress_monitor(trt):
    """A tqdm bar per build phase, through TensorRT's IProgressMonitor (TensorRT >= 10)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None
    from tqdm import tqdm

    class TqdmMonitor(base):
        def __init__(self) -> None:
            base.__init__(self)
            self.bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return TqdmMonitor()
