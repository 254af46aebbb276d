"""`deepliif-engine bench --pipeline`: `infer`'s own path with the network replaced by replayed outputs.

What it answers: can the CPU stages keep a GPU busy? The same code `infer` runs (decode, tile loop,
stitching, postprocessing, encoding, cells files, JSON; pyramids, scoring and overlays for slides) runs
against `engine.replay.ReplaySession`, unpaced (how fast the CPU side alone is) or paced to a GPU's
tiles per second. `network_busy` is the share of the wall time the stand-in was busy: near 1 means the
network would be the bottleneck, near 0 that the GPU would idle. Each run writes into a fresh scratch
folder; the first run of a process pays first-touch memory costs a long-lived kernel pays once, so the
figures are of the last run and every run's wall time is listed.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from deepliif.errors import ArgumentError
from deepliif.imageio import probe_image
from deepliif.inference import InferenceOptions
from deepliif.pyramid import PyramidCompression
from deepliif.slides import is_slide, open_slide
from deepliif.tables import format_rows
from deepliif.workers import resolve_threads

from .image_files import describe_session, infer_image_files
from .replay import ReplaySession
from .slide_inference import infer_slide

IMAGE_STAGES = ("decode", "tiling", "inference", "stitching", "postprocess", "encode")
SLIDE_STAGES = ("tiling", "inference", "stitching", "stream", "pyramid", "scoring", "overlay")


def bench_pipeline(source: Path, replay: Path, tiles_per_second: float | None = None, threads: int | None = None,
                   batch_size: int = 8, repeats: int = 2,
                   compression: PyramidCompression = PyramidCompression.default()) -> dict:
    """Runs `infer` on `source` `repeats` times against the replay stand-in; the report of the last run."""
    if repeats < 1:
        raise ArgumentError(f"--repeats must be at least 1; got {repeats}")
    threads = resolve_threads(threads)
    slide = is_slide(source)
    walls, report = [], {}
    with cpus_limited_to(threads):
        for _ in range(repeats):
            report = _bench_once(ReplaySession(replay, tiles_per_second, batch_size), source, threads, batch_size, slide,
                                 compression)
            walls.append(report["wall_s"])
    report["runs_wall_s"] = walls
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return report


@contextlib.contextmanager
def cpus_limited_to(threads: int) -> Iterator[None]:
    """The process's affinity narrowed to `threads` CPUs while the runs last, so `--threads N` measures an
    N-CPU kernel: the pipeline's stages are threads of their own, and on more CPUs they would overlap
    whatever the pools' sizes."""
    if not hasattr(os, "sched_getaffinity"):
        yield
        return
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:threads])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def _bench_once(session: ReplaySession, source: Path, threads: int, batch_size: int, slide: bool,
                compression: PyramidCompression) -> dict:
    with tempfile.TemporaryDirectory(prefix="deepliif-pipeline-") as scratch:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        record_path = _run(session, source, Path(scratch), threads, batch_size, slide, compression)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        record = json.loads(record_path.read_text())
    stages = SLIDE_STAGES if slide else IMAGE_STAGES
    return {"input": str(source), "kind": "slide" if slide else "image", "wall_s": round(wall, 3),
            "network_s": round(session.busy_seconds, 3),
            "network_busy": round(session.busy_seconds / wall, 3) if wall else 0.0,
            "network_tiles_per_s": session.tiles_per_second,
            "cpu_s": round(cpu, 3), "cores_busy": round(cpu / wall, 2) if wall else 0.0,
            "stages": {name: round(record["timings"].get(f"{name}_seconds", 0.0), 3) for name in stages},
            "tiles": record["tiles"], "network_tiles": session.tiles, "pixels": _pixels(source, slide),
            "threads": threads, "batch_size": batch_size, "scoring": record["scoring"],
            **({"pyramid_compression": compression.value} if slide else {})}


def _run(session: ReplaySession, source: Path, out: Path, threads: int, batch_size: int, slide: bool,
         compression: PyramidCompression) -> Path:
    if slide:
        return infer_slide(session, source, out, threads=threads, compression=compression)
    options = InferenceOptions(batch_size=batch_size, threads=threads)
    return infer_image_files(session, [source], out, options, describe_session(session))[0]


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process so far (every thread; the paced stand-in's waits are
    not CPU), so a run's `cores_busy` (CPU seconds over wall seconds) says how CPU-bound it was."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pixels(source: Path, slide: bool) -> int:
    if slide:
        with open_slide(source) as opened:
            return opened.info.width * opened.info.height
    width, height = probe_image(source)
    return width * height


def format_pipeline(report: dict) -> str:
    rows = [("wall (s)", f"{report['wall_s']:.2f}"), ("network busy (s)", f"{report['network_s']:.2f}"),
            ("network busy share", f"{report['network_busy']:.0%}"),
            ("network pace", f"{report['network_tiles_per_s']} tiles/s" if report["network_tiles_per_s"]
             else "unpaced"),
            ("CPU (s), cores busy", f"{report['cpu_s']:.2f}, {report['cores_busy']:.2f}"),
            ("tiles (run by the network)", f"{report['tiles']} ({report['network_tiles']})"),
            ("megapixels", f"{report['pixels'] / 1e6:.1f}"), ("threads", str(report["threads"])),
            ("every run's wall (s)", ", ".join(f"{w:.2f}" for w in report["runs_wall_s"])),
            ("peak RSS (GiB)", f"{report['peak_rss_gib']:.2f}")]
    rows += [(f"stage {name} (busy s)", f"{seconds:.2f}") for name, seconds in report["stages"].items()]
    rows.append(("cells (positive)", f"{report['scoring']['num_total']} ({report['scoring']['num_pos']})"))
    return "\n".join(format_rows([("figure", "value"), *rows]))
