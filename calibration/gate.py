"""The accuracy gate: a reduced-precision graph is served only if the numbers a pathologist reads hold.

The candidate (INT8 Q/DQ or FP16) and the FP32 reference infer whole held-out images the way a request
does (tiling, stitching, postprocessing). Per image: PSNR and max difference of every network output, and
the cell counts after postprocessing. The defaults gate on the clinical number, the percentage of
positive cells: at most 1 point of change on any image and on the pooled count. Image-quality limits are
reported always and gated only when set. The report sits beside the ONNX it judges (`accuracy.json`,
tied to the file by sha256), and `require_passed` is how the engine refuses an ungated artifact.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256
from deepliif.inference import InferenceOptions, TileBatchRunner, infer_image
from deepliif.contract import OUTPUT_NAMES
from deepliif.tables import format_rows
from engine.errors import AccuracyGateError
from engine.file_hashes import HashMemo

from export.validate import ImageStats

from . import logger

ACCURACY_FILE = "accuracy.json"
REPORT_FILE = "accuracy.md"


@dataclass(frozen=True)
class GateThresholds:
    """Limits a candidate must meet against FP32; None leaves a figure reported but not gated."""

    max_percent_pos_delta: float | None = 1.0         # points, on every image
    max_pooled_percent_pos_delta: float | None = 1.0  # points, all images' cells pooled
    max_num_total_delta_ratio: float | None = None    # |Δ cells| / reference cells, per image
    min_psnr: float | None = None                     # dB, every network output of every image
    max_abs: int | None = None                        # grey levels, every network output

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ArgumentError(f"gate threshold {name} must be a non-negative number or None; got {value!r}")


def _pooled_percent(scores: Sequence[dict]) -> float:
    total = sum(s["num_total"] for s in scores)
    return 100.0 * sum(s["num_pos"] for s in scores) / total if total else 0.0


def _counts(scoring: dict) -> dict:
    return {key: scoring[key] for key in ("num_total", "num_pos", "num_neg", "percent_pos")}


def _image_entry(name: str, reference, candidate) -> dict:
    stats = {out: ImageStats.between(reference.images[out], candidate.images[out]) for out in OUTPUT_NAMES}
    ref, cand = reference.scoring, candidate.scoring
    return {"image": name,
            "outputs": {out: s.as_dict() for out, s in stats.items()},
            "reference": _counts(ref), "candidate": _counts(cand),
            "delta": {"num_total": abs(ref["num_total"] - cand["num_total"]),
                      "num_pos": abs(ref["num_pos"] - cand["num_pos"]),
                      "num_neg": abs(ref["num_neg"] - cand["num_neg"]),
                      "percent_pos": round(abs(ref["percent_pos"] - cand["percent_pos"]), 3)}}


def _image_failures(entry: dict, limits: GateThresholds) -> list[str]:
    name, delta, problems = entry["image"], entry["delta"], []
    if limits.max_percent_pos_delta is not None and delta["percent_pos"] > limits.max_percent_pos_delta:
        problems.append(f"{name}: percent positive changes by {delta['percent_pos']} points "
                        f"> {limits.max_percent_pos_delta}")
    total = entry["reference"]["num_total"]
    ratio = delta["num_total"] / total if total else float(delta["num_total"] > 0)
    if limits.max_num_total_delta_ratio is not None and ratio > limits.max_num_total_delta_ratio:
        problems.append(f"{name}: cell count changes by {delta['num_total']} of {total} "
                        f"(> {limits.max_num_total_delta_ratio:.0%})")
    for out, s in entry["outputs"].items():
        psnr = math.inf if s["psnr_db"] is None else s["psnr_db"]
        if limits.min_psnr is not None and psnr < limits.min_psnr:
            problems.append(f"{name}: {out} PSNR {psnr:.1f} dB < {limits.min_psnr} dB")
        if limits.max_abs is not None and s["max_abs"] > limits.max_abs:
            problems.append(f"{name}: {out} max difference {s['max_abs']} > {limits.max_abs}")
    return problems


def _severity(entry: dict) -> tuple:
    """Worst first: the largest change of percent positive, then the lowest Seg PSNR."""
    seg = entry["outputs"]["Seg"]["psnr_db"]
    return (entry["delta"]["percent_pos"], -(math.inf if seg is None else seg))


def evaluate(reference: TileBatchRunner, candidate: TileBatchRunner, images: Sequence[tuple[str, np.ndarray]],
             limits: GateThresholds,
             batch_size: int = 4, progress: Callable[[str], None] | None = None) -> dict:
    """Run both on every image and judge the candidate; returns the report (never raises on a failed gate)."""
    if not images:
        raise ArgumentError("the accuracy gate needs at least one held-out image")
    options = InferenceOptions(batch_size=batch_size)
    entries = []
    for name, image in images:
        entries.append(_image_entry(name, infer_image(reference, image, options),
                                    infer_image(candidate, image, options)))
        if progress:
            progress(name)
    failures = [problem for entry in entries for problem in _image_failures(entry, limits)]
    pooled = {"reference": round(_pooled_percent([e["reference"] for e in entries]), 3),
              "candidate": round(_pooled_percent([e["candidate"] for e in entries]), 3)}
    pooled["delta"] = round(abs(pooled["reference"] - pooled["candidate"]), 3)
    if limits.max_pooled_percent_pos_delta is not None and pooled["delta"] > limits.max_pooled_percent_pos_delta:
        failures.append(f"pooled percent positive changes by {pooled['delta']} points "
                        f"> {limits.max_pooled_percent_pos_delta}")
    worst = max(entries, key=_severity)
    return {"thresholds": asdict(limits), "images": entries, "pooled_percent_pos": pooled,
            "worst_psnr_db": {out: min((e["outputs"][out]["psnr_db"] for e in entries
                                        if e["outputs"][out]["psnr_db"] is not None), default=None)
                              for out in OUTPUT_NAMES},
            "max_abs": {out: max(e["outputs"][out]["max_abs"] for e in entries) for out in OUTPUT_NAMES},
            "worst_image": worst["image"], "failures": failures, "passed": not failures}


def format_markdown(report: dict) -> str:
    """The short human report written beside accuracy.json."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# Accuracy gate: {report.get('precision', '?').upper()} vs FP32 — {verdict}", ""]
    for key in ("model", "onnx_sha256", "quantization"):
        if key in report:
            lines.append(f"- {key}: `{json.dumps(report[key]) if isinstance(report[key], dict) else report[key]}`")
    pooled = report["pooled_percent_pos"]
    lines += [f"- pooled percent positive: FP32 {pooled['reference']}, candidate {pooled['candidate']} "
              f"(|Δ| {pooled['delta']} points)", f"- worst image: {report['worst_image']}",
              f"- thresholds: `{json.dumps(report['thresholds'])}`", ""]
    rows = [("image", "cells fp32/cand", "% pos fp32/cand", "|Δ % pos|", "Seg PSNR dB", "min PSNR dB", "max abs")]
    for e in report["images"]:
        psnrs = [s["psnr_db"] for s in e["outputs"].values() if s["psnr_db"] is not None]
        seg = e["outputs"]["Seg"]["psnr_db"]
        rows.append((e["image"], f"{e['reference']['num_total']}/{e['candidate']['num_total']}",
                     f"{e['reference']['percent_pos']}/{e['candidate']['percent_pos']}", str(e["delta"]["percent_pos"]),
                     "inf" if seg is None else f"{seg:.1f}", f"{min(psnrs):.1f}" if psnrs else "inf",
                     str(max(s["max_abs"] for s in e["outputs"].values()))))
    lines += ["```", *format_rows(rows), "```", ""]
    lines += [f"- FAIL: {problem}" for problem in report["failures"]] or ["All checks passed."]
    return "\n".join(lines) + "\n"


def require_passed(onnx_path: Path, force: bool = False, memo: HashMemo | None = None) -> dict | None:
    """The passed gate report of a reduced-precision ONNX, or AccuracyGateError (a warning when forced).

    The report must sit beside the file and name its sha256, so a report cannot vouch for another graph.
    """
    onnx_path = Path(onnx_path)
    report_path = onnx_path.parent / ACCURACY_FILE
    problem, report = None, None
    try:
        report = json.loads(report_path.read_text())
    except FileNotFoundError:
        problem = f"no accuracy report {report_path}; run `deepliif-engine calibrate` to make and gate it"
    except (OSError, ValueError) as exc:
        problem = f"accuracy report {report_path} is unreadable ({exc})"
    if report is not None and problem is None:
        if not isinstance(report, dict) or report.get("onnx_sha256") != file_sha256(onnx_path, memo):
            problem = f"accuracy report {report_path} is for another file than {onnx_path.name} (sha256 differs)"
        elif report.get("passed") is not True:
            problem = (f"{onnx_path} failed its accuracy gate (worst image {report.get('worst_image')}): "
                       + "; ".join(report.get("failures", [])[:3]))
    if problem is None:
        return report
    if force:
        logger.warning("serving an ungated reduced-precision graph because it was forced: %s", problem)
        return None
    raise AccuracyGateError(problem + " (force to serve it anyway)", [problem], report or {})
