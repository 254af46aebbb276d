"""`export onnx`: export, check, validate against PyTorch, and only then publish under the final name.

The fused ONNX is written as `OUT/.deepliif.onnx.unvalidated` first. It becomes `OUT/deepliif.onnx`
only when validation passes; when it fails, it is kept as `OUT/deepliif.onnx.failed-validation` for
inspection, so nothing that failed ever sits under the name the engine loads.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from tqdm import tqdm

from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256, prepare_out_dir, write_json
from deepliif.model_dir import DeepLIIFModel, load_model_dir
from deepliif.pipeline import FusedPipeline, TileRunner, to_network_input, to_uint8_image
from engine.errors import ValidationError

from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.samples import benchmark_tiles

from . import logger
from deepliif.contract import FUSED_GRAPH
from .config import OnnxExportConfig, Tolerance
from .onnx_export import GENERATOR_INPUT, export_generators, export_pipeline
from .validate import ImageStats, check_batch_sizes, validate

VALIDATION_FILE = "validation.json"
MANIFEST_FILE = "export.json"


@dataclass(frozen=True)
class ValidationPlan:
    """Which tiles the export is checked on, at which batch sizes, against which tolerance."""

    tiles: np.ndarray
    tiles_from: str
    batch_sizes: tuple[int, ...] = (1, 4)
    tolerance: Tolerance | None = None  # None: the default for the export's precision


def export_onnx(model_dir: Path, out: Path, config: OnnxExportConfig, plan: ValidationPlan,
                quiet: bool = False) -> dict:
    """Export and validate; returns the manifest written to `OUT/export.json`."""
    check_batch_sizes(plan.batch_sizes, len(plan.tiles))
    model = load_model_dir(model_dir)
    out = prepare_out_dir(Path(out))
    tolerance = plan.tolerance or Tolerance.for_precision(config.precision)
    timings = {}
    start = time.perf_counter()
    staged = out / f".{FUSED_GRAPH.file_name}.unvalidated"
    summary = export_pipeline(model, staged, config)
    timings["export_seconds"] = round(time.perf_counter() - start, 2)
    generators = _export_generators(model, out, config) if config.per_generator else []
    start = time.perf_counter()
    report = _validate(model, staged, out, config, plan, tolerance, quiet)
    timings["validation_seconds"] = round(time.perf_counter() - start, 2)
    final = out / FUSED_GRAPH.file_name
    os.replace(staged, final)
    summary.path = final
    manifest = {"model": model.describe(), "model_sha256": model.weights_sha256(), "config": config.key(),
                "onnx": summary.as_dict(), "onnx_sha256": file_sha256(final),
                "generators": [g.as_dict() for g in generators], "torch_version": torch.__version__,
                "timings": timings}
    write_json(out / MANIFEST_FILE, manifest)
    return {**manifest, "validation": report}


def _export_generators(model: DeepLIIFModel, out: Path, config: OnnxExportConfig):
    directory = prepare_out_dir(out / "generators")
    return export_generators(model, directory, config)


def _validate(model: DeepLIIFModel, staged: Path, out: Path, config: OnnxExportConfig, plan: ValidationPlan,
              tolerance: Tolerance, quiet: bool) -> dict:
    """Validate the fused graph (and the per-generator files); write validation.json either way."""
    reference = TileRunner(FusedPipeline(model))
    total = len(plan.tiles) * (1 + len(plan.batch_sizes))
    try:
        with OnnxRuntimeBackend(staged, device="cpu", precision=config.precision) as candidate, \
                tqdm(total=total, unit="tile", desc="validating", disable=quiet, file=sys.stderr) as bar:
            report = validate(reference.run, candidate.run, plan.tiles, plan.batch_sizes, tolerance,
                              bar.update)
        if config.per_generator:
            report["generators"] = validate_generators(model, out / "generators",
                                                       plan.tiles[:max(plan.batch_sizes)], tolerance)
    except ValidationError as exc:
        write_json(out / VALIDATION_FILE, _with_source(exc.report, plan, config))
        os.replace(staged, out / f"{FUSED_GRAPH.file_name}.failed-validation")
        raise
    report = _with_source(report, plan, config)
    write_json(out / VALIDATION_FILE, report)
    return report


def _with_source(report: dict, plan: ValidationPlan, config: OnnxExportConfig) -> dict:
    return {"precision": config.precision.value, "tiles_from": plan.tiles_from, **report}


def validate_generators(model: DeepLIIFModel, directory: Path, tiles: np.ndarray, tolerance: Tolerance) -> dict:
    """Each per-generator ONNX against its PyTorch module, on the uint8 image it produces."""
    x = to_network_input(torch.from_numpy(np.ascontiguousarray(tiles)))
    results, failures = {}, []
    for name in model.names.all:
        session = onnxruntime.InferenceSession(str(directory / f"{name}.onnx"),
                                               providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            expected = to_uint8_image(model.module(name).eval()(x)).numpy()
        dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        (actual,) = session.run(None, {GENERATOR_INPUT: x.numpy().astype(dtype)})
        stats = ImageStats.between(expected, to_uint8_image(torch.from_numpy(actual)).numpy())
        results[name] = stats.as_dict()
        if tolerance.max_abs is not None and stats.max_abs > tolerance.max_abs:
            failures.append(f"generator {name}: max abs difference {stats.max_abs} > {tolerance.max_abs}")
    if failures:
        raise ValidationError("; ".join(failures), failures, {"generators": results, "passed": False,
                                                             "failures": failures})
    return results


def tolerance_from_args(max_abs: int | None, min_psnr: float | None, max_percent_pos_delta: float | None,
                        default: Tolerance) -> Tolerance:
    """Command-line overrides on top of a precision's default tolerance."""
    return Tolerance(max_abs if max_abs is not None else default.max_abs,
                     min_psnr if min_psnr is not None else default.min_psnr,
                     max_percent_pos_delta if max_percent_pos_delta is not None else default.max_percent_pos_delta)


def tiles_for_validation(count: int, images: Sequence[Path] | None) -> tuple[np.ndarray, str]:
    if count < 1:
        raise ArgumentError(f"--validation-tiles must be at least 1; got {count}")
    tiles, source = benchmark_tiles(count, list(images) if images else None)
    if source == "a generated image":
        logger.warning("no IHC tiles found (no ../shared/data/ihc and no --images): validating on "
                       "generated tiles")
    return tiles, source
