"""`calibrate`: choose tiles, make the reduced-precision graph, gate it, and publish it only if it passes.

OUT gets `calibration.json` (the tile list, INT8 only), `accuracy.json` + `accuracy.md` (the gate), and
`deepliif.onnx` when the gate passes, or `deepliif.onnx.failed-gate` when it does not, so a graph that
failed never sits under the name the engine and `export tensorrt` load. The FP32 reference is the
fused ONNX on ONNX Runtime CPU, which agrees with the PyTorch pipeline to one grey level (export issue).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256, prepare_out_dir, read_image, write_atomically, write_json
from deepliif.model_dir import load_model_dir
from engine.errors import AccuracyGateError

from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.backends.precision import Precision
from deepliif.contract import FUSED_GRAPH
from export.config import OnnxExportConfig
from export.onnx_checks import check_fused_signature, check_onnx
from export.onnx_export import export_pipeline
from export.tensorrt_build import onnx_precision

from . import logger
from .gate import ACCURACY_FILE, REPORT_FILE, GateThresholds, evaluate, format_markdown
from .quantize import QuantizationConfig, quantize_int8
from .tiles import CALIBRATION_FILE, DEFAULT_SEED, choose_tiles

FAILED_SUFFIX = ".failed-gate"


@dataclass(frozen=True)
class CalibrationPlan:
    """Everything `calibrate` needs: what to make, from which images, judged how."""

    model_dir: Path
    images: tuple[Path, ...]
    out: Path
    precision: Precision = Precision.INT8
    tiles: int = 32
    seed: int = DEFAULT_SEED
    holdout: tuple[Path, ...] = ()  # gate images; empty: a seeded share of `images`
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    fp32_onnx: Path | None = None  # an existing fused fp32 ONNX of the same model (saves the export)

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.precision is Precision.FP32:
            raise ArgumentError("calibrate makes int8 or fp16 graphs; fp32 needs no gate (`export onnx`)")
        missing = [str(p) for p in (*self.images, *self.holdout) if not Path(p).is_file()]
        if missing:
            raise ArgumentError(f"no such image file(s): {', '.join(missing)}")


def split_images(plan: CalibrationPlan) -> tuple[list[Path], list[Path]]:
    """Calibration images and held-out gate images, never the same file (compared by content)."""
    images = [Path(p) for p in plan.images]
    if plan.holdout:
        holdout = [Path(p) for p in plan.holdout]
    elif plan.precision is Precision.FP16:  # nothing is calibrated: every image can judge
        return [], images
    else:
        if len(images) < 2:
            raise ArgumentError("the gate needs held-out images: give at least two --images (a seeded half "
                                "is held out) or name them with --holdout")
        shuffled = random.Random(plan.seed).sample(images, len(images))
        holdout, images = sorted(shuffled[: len(images) // 2]), sorted(shuffled[len(images) // 2:])
    shared = {file_sha256(p) for p in images} & {file_sha256(p) for p in holdout}
    if shared and plan.precision is Precision.INT8:
        raise ArgumentError(f"{len(shared)} held-out image(s) are also calibration images; the gate must "
                            "judge images the scales were not measured on")
    return images, holdout


def calibrate(plan: CalibrationPlan) -> dict:
    """Make, gate and publish; returns the report. Raises AccuracyGateError (report written) on failure."""
    start = time.perf_counter()
    model = load_model_dir(plan.model_dir)
    calibration_images, holdout = split_images(plan)
    out = prepare_out_dir(Path(plan.out))
    gate_images = [(p.name, read_image(p)) for p in holdout]
    report: dict = {"precision": plan.precision.value, "model": model.describe(),
                    "model_sha256": model.weights_sha256(), "holdout": [str(p) for p in holdout]}
    with tempfile.TemporaryDirectory(prefix=".calibrate-", dir=out) as scratch:
        fp32 = plan.fp32_onnx or Path(scratch) / "fp32.onnx"
        if plan.fp32_onnx is None:
            export_pipeline(model, fp32, OnnxExportConfig())
        _check_fp32(fp32)
        staged = Path(scratch) / FUSED_GRAPH.file_name
        if plan.precision is Precision.INT8:
            chosen = choose_tiles(calibration_images, plan.tiles, plan.seed)
            chosen.write(out / CALIBRATION_FILE)
            report["calibration"] = {"tiles": len(chosen.tiles), "candidates": chosen.candidates,
                                     "seed": plan.seed, "images": [str(p) for p in calibration_images]}
            report["quantization"] = quantize_int8(fp32, staged, chosen.arrays(), plan.quantization)
        else:
            export_pipeline(model, staged, OnnxExportConfig(precision=Precision.FP16))
        report["build_seconds"] = round(time.perf_counter() - start, 2)
        gate_start = time.perf_counter()
        with OnnxRuntimeBackend(fp32, device="cpu") as reference, \
                OnnxRuntimeBackend(staged, device="cpu", precision=plan.precision) as candidate:
            report.update(evaluate(reference, candidate, gate_images, plan.thresholds,
                                   progress=lambda name: logger.info("gate: %s done", name)))
        report["gate_seconds"] = round(time.perf_counter() - gate_start, 2)
        report["onnx_sha256"] = file_sha256(staged)
        _publish(staged, out, report)
    if not report["passed"]:
        raise AccuracyGateError(f"{plan.precision.value} graph failed the accuracy gate; worst image "
                                f"{report['worst_image']}: {'; '.join(report['failures'][:3])}",
                                report["failures"], report)
    return report


def _check_fp32(path: Path) -> None:
    summary = check_onnx(path)
    check_fused_signature(summary)
    if onnx_precision(summary) is not Precision.FP32:
        raise ArgumentError(f"{path}: the reference must be the fp32 fused ONNX; this one is "
                            f"{onnx_precision(summary).value}")


def _publish(staged: Path, out: Path, report: dict) -> None:
    """Report first, then the graph under its final name (passed) or the failed-gate name."""
    write_json(out / ACCURACY_FILE, report)
    write_atomically(out / REPORT_FILE, format_markdown(report).encode())
    final = out / FUSED_GRAPH.file_name
    target = final if report["passed"] else out / (FUSED_GRAPH.file_name + FAILED_SUFFIX)
    for stale in (final, out / (FUSED_GRAPH.file_name + FAILED_SUFFIX)):
        if stale != target and stale.exists():
            stale.unlink()
    os.chmod(staged, 0o644)
    shutil.move(staged, target)
    logger.info("%s: %s", "published" if report["passed"] else "gate FAILED, kept as", target)

