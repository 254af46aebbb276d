"""Prove an exported artifact computes what the PyTorch pipeline computes, or fail with every difference.

The reference is the fp32 fused pipeline in PyTorch (itself proven against DeepLIIF's outputs). The
candidate (any `Backend`) runs the same real tiles at each requested batch size, so a graph that mixes
tiles across the batch (running statistics, a wrong reshape) is caught as surely as a numeric drift.
Every output is compared, all failures are collected, then one `ValidationError` carries them all.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from deepliif.errors import ArgumentError
from deepliif.contract import NETWORK_TILE, OUTPUT_NAMES, run_in_chunks
from deepliif.postprocessing import postprocess
from deepliif.tables import format_rows
from engine.errors import ValidationError

from . import logger
from .config import Tolerance

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ImageStats:
    max_abs: int
    mean_abs: float
    psnr_db: float  # math.inf when identical

    @classmethod
    def between(cls, reference: np.ndarray, candidate: np.ndarray) -> ImageStats:
        diff = np.abs(reference.astype(np.int16) - candidate.astype(np.int16))
        mse = float(np.mean(diff.astype(np.float64) ** 2))
        psnr = math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
        return cls(int(diff.max()), float(diff.mean()), psnr)

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "mean_abs": round(self.mean_abs, 6),
                "psnr_db": None if math.isinf(self.psnr_db) else round(self.psnr_db, 2)}


def cell_counts(tiles: np.ndarray, outputs: dict[str, np.ndarray]) -> list[dict]:
    """DeepLIIF's scoring of each tile from its Seg and Marker outputs."""
    return [postprocess(tile, outputs["Seg"][i], outputs["Marker"][i], NETWORK_TILE).scoring
            for i, tile in enumerate(tiles)]


def compare_counts(reference: list[dict], candidate: list[dict]) -> dict:
    """Largest per-tile change of the counts, and the change of the pooled percentage of positive cells."""
    def pooled(scores: list[dict]) -> float:
        total = sum(s["num_total"] for s in scores)
        return 100.0 * sum(s["num_pos"] for s in scores) / total if total else 0.0

    return {
        "max_num_pos_delta": max(abs(r["num_pos"] - c["num_pos"]) for r, c in zip(reference, candidate)),
        "max_num_neg_delta": max(abs(r["num_neg"] - c["num_neg"]) for r, c in zip(reference, candidate)),
        "max_percent_pos_delta": max(abs(r["percent_pos"] - c["percent_pos"])
                                     for r, c in zip(reference, candidate)),
        "pooled_percent_pos_delta": round(abs(pooled(reference) - pooled(candidate)), 3),
    }


def check_batch_sizes(batch_sizes: Sequence[int], tiles: int) -> tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise ArgumentError(f"validation batch sizes must be positive integers; got {list(sizes)}")
    if max(sizes) > tiles:
        raise ArgumentError(f"validation batch size {max(sizes)} needs at least that many tiles; got {tiles}")
    return sizes


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ArgumentError(f"batch sizes must be comma-separated integers; got {text!r}") from None
    return check_batch_sizes(sizes, max(sizes, default=1))


def validate(reference: Runner, candidate: Runner, tiles: np.ndarray, batch_sizes: Sequence[int],
             tolerance: Tolerance, progress: Callable[[int], None] | None = None) -> dict:
    """Compare `candidate` with `reference` on `tiles` at each batch size; raise if any output fails.

    Returns the report: per batch size and output, max/mean absolute difference and PSNR, and the
    cell-count changes after postprocessing.
    """
    sizes = check_batch_sizes(batch_sizes, len(tiles))
    expected = run_in_chunks(reference, tiles, 1, progress)
    expected_counts = cell_counts(tiles, expected)
    report: dict = {"tiles": len(tiles), "tolerance": tolerance.__dict__, "batches": {}}
    failures = []
    for size in sizes:
        actual = run_in_chunks(candidate, tiles, size, progress)
        stats = {name: ImageStats.between(expected[name], actual[name]) for name in OUTPUT_NAMES}
        counts = compare_counts(expected_counts, cell_counts(tiles, actual))
        report["batches"][str(size)] = {"outputs": {n: s.as_dict() for n, s in stats.items()},
                                        "cell_counts": counts}
        failures += [f"batch {size}: {problem}" for problem in _failures(stats, counts, tolerance)]
    report["passed"] = not failures
    report["failures"] = failures
    if failures:
        raise ValidationError(f"{len(failures)} check(s) exceed the tolerance: {'; '.join(failures)}",
                              failures, report)
    logger.info("validation passed on %d tiles at batch sizes %s", len(tiles), list(sizes))
    return report


def _failures(stats: dict[str, ImageStats], counts: dict, tolerance: Tolerance) -> list[str]:
    problems = []
    for name, s in stats.items():
        if tolerance.max_abs is not None and s.max_abs > tolerance.max_abs:
            problems.append(f"{name} max abs difference {s.max_abs} > {tolerance.max_abs}")
        if tolerance.min_psnr is not None and s.psnr_db < tolerance.min_psnr:
            problems.append(f"{name} PSNR {s.psnr_db:.1f} dB < {tolerance.min_psnr} dB")
    limit = tolerance.max_percent_pos_delta
    if limit is not None and counts["max_percent_pos_delta"] > limit:
        problems.append(f"percent positive changes by {counts['max_percent_pos_delta']} points > {limit}")
    return problems


def format_report(report: dict) -> str:
    rows = [("batch", "output", "max abs", "mean abs", "PSNR dB")]
    for size, entry in report["batches"].items():
        for name, s in entry["outputs"].items():
            psnr = "inf" if s["psnr_db"] is None else f"{s['psnr_db']:.2f}"
            rows.append((size, name, str(s["max_abs"]), f"{s['mean_abs']:.5f}", psnr))
    lines = format_rows(rows)
    for size, entry in report["batches"].items():
        c = entry["cell_counts"]
        lines.append(f"batch {size} cell counts: max |d num_pos| {c['max_num_pos_delta']}, max |d num_neg| "
                     f"{c['max_num_neg_delta']}, max |d percent_pos| {c['max_percent_pos_delta']}, "
                     f"pooled |d percent_pos| {c['pooled_percent_pos_delta']}")
    lines.append("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))
    return "\n".join(lines)
