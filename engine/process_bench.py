"""Whole processes side by side: `deepliif-engine infer` on a warm cache vs the DeepLIIF way.

What a user waits for is the process, not the tile loop: interpreter and library start-up, loading,
the tiles, writing the results. Each repeat runs the two commands one after the other (interleaved, so
a machine that slows down slows both), measures wall time and the child's peak RSS (`os.wait4`), and
reads each process's own JSON for the time spent inferring tiles; the rest is overhead.
"""
from __future__ import annotations


import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from deepliif.errors import ArgumentError
from deepliif.logs import project_logger
from deepliif.tables import format_rows

logger = project_logger("engine")



@dataclass
class ProcessRun:
    command: str
    wall_seconds: float
    inference_seconds: float
    peak_rss_gib: float

    @property
    def overhead_seconds(self) -> float:
        return self.wall_seconds - self.inference_seconds


def _run(name: str, argv: list[str], result_json: Path) -> ProcessRun:
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty child cannot block on it
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if process.returncode != 0:
        raise ArgumentError(f"{name} failed ({process.returncode}): {stderr[-2000:]}")
    timings = json.loads(result_json.read_text())["timings"]
    return ProcessRun(name, round(wall, 2), round(timings["inference_seconds"], 2),
                      round(usage.ru_maxrss / 2**20, 2))  # ru_maxrss is in KiB on Linux


def bench_processes(model_dir: Path, image: Path, cache_dir: Path, backend: str = "onnxruntime",
                    device: str = "cpu", repeats: int = 2) -> dict:
    """Warm the cache with one untimed `infer`, then `repeats` interleaved pairs of processes."""
    if repeats < 1:
        raise ArgumentError(f"repeats must be at least 1; got {repeats}")
    image, stem = Path(image), Path(image).stem
    with tempfile.TemporaryDirectory(prefix="deepliif-process-bench-") as scratch:
        engine_out, way_out = Path(scratch) / "engine", Path(scratch) / "deepliif-way"
        engine = [sys.executable, "-m", "engine.cli", "-q", "infer", "--model-dir", str(model_dir), "--backend",
                  backend, "--device", device, "--cache-dir", str(cache_dir), "--out", str(engine_out), str(image)]
        way = [sys.executable, "-m", "engine.deepliif_way", "--model-dir", str(model_dir), "--out", str(way_out),
               "--device", "cuda" if device == "cuda" else "cpu", str(image)]
        logger.info("warming the artifact cache (not timed)")
        _run("warm-up", engine, engine_out / f"{stem}.json")
        runs: list[ProcessRun] = []
        for _ in range(repeats):
            runs.append(_run("DeepLIIF way", way, way_out / f"{stem}.json"))
            runs.append(_run(f"deepliif-engine infer ({backend})", engine, engine_out / f"{stem}.json"))
        startup = json.loads((engine_out / f"{stem}.json").read_text()).get("startup_seconds", {})
    return {"image": str(image), "model": str(model_dir), "backend": backend, "device": device,
            "repeats": repeats, "runs": [asdict(r) | {"overhead_seconds": round(r.overhead_seconds, 2)}
                                         for r in runs],
            "engine_startup_seconds": startup, "summary": summarize(runs)}


def summarize(runs: list[ProcessRun]) -> dict:
    by_command: dict[str, list[ProcessRun]] = {}
    for run in runs:
        by_command.setdefault(run.command, []).append(run)
    summary = {name: {"wall_seconds": statistics.median(r.wall_seconds for r in group),
                      "inference_seconds": statistics.median(r.inference_seconds for r in group),
                      "overhead_seconds": round(statistics.median(r.overhead_seconds for r in group), 2),
                      "peak_rss_gib": max(r.peak_rss_gib for r in group)}
               for name, group in by_command.items()}
    names = list(summary)
    summary["speedup"] = round(summary[names[0]]["wall_seconds"] / summary[names[1]]["wall_seconds"], 3)
    return summary


def format_processes(report: dict) -> str:
    rows = [("process", "wall s (median)", "tiles s", "overhead s", "peak RSS GiB")]
    for name, s in report["summary"].items():
        if name != "speedup":
            rows.append((name, f"{s['wall_seconds']:.2f}", f"{s['inference_seconds']:.2f}",
                         f"{s['overhead_seconds']:.2f}", f"{s['peak_rss_gib']:.2f}"))
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in report["engine_startup_seconds"].items())
    return "\n".join([f"whole process, {report['image']}, {report['repeats']} interleaved repeats",
                      *format_rows(rows), f"speed-up (DeepLIIF way wall / engine wall): "
                      f"{report['summary']['speedup']:.2f}x", f"engine start-up by stage: {stages}"])
