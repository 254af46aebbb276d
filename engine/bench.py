"""`deepliif-engine bench`: the DeepLIIF way against every backend x precision x batch size, one run.

The baseline is the published way (nine generators one after another, one tile at a time, fp32 eager).
Each configuration is opened as an `engine.Session` on the same weights and tiles; the figures are
tiles/s, per-call latency p50/p95, peak memory, speed-up over the baseline, and achieved GFLOP/s against
a matrix-product peak measured in the same process (so "how close to the hardware" is a ratio, too).
"""
from __future__ import annotations

import contextlib
import copy
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepliif.errors import DeepLIIFError
from deepliif.imageio import encode_png, read_image
from deepliif.inference import InferenceOptions
from deepliif.logs import project_logger
from deepliif.model_dir import DeepLIIFModel
from deepliif.pipeline import NETWORK_TILE, DeepLIIFWayRunner, FusedPipeline
from deepliif.tables import format_rows

from engine.backends.precision import Precision

from .backends import BackendKind
from .session import Session

logger = project_logger("engine")


@dataclass(frozen=True)
class BenchCase:
    backend: BackendKind
    precision: Precision
    batch_size: int
    options: tuple[tuple[str, object], ...] = ()  # Session keywords, e.g. (("channels_last", True),)

    @property
    def label(self) -> str:
        switches = "".join(f"+{name}" for name, on in self.options if on is True)
        return f"{self.backend.value}{switches}/{self.precision.value}/b{self.batch_size}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """fp32 matrix-product throughput: the practical ceiling for convolutions on this device."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_tile(model: DeepLIIFModel) -> float:
    """Multiply-adds x 2 of every convolution for one 512x512 tile, counted on shapes (meta tensors)."""
    total = 0.0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        weight = module.weight
        if isinstance(module, nn.ConvTranspose2d):
            spatial = inputs[0].shape[2] * inputs[0].shape[3]
        else:
            spatial = output.shape[2] * output.shape[3]
        total += 2.0 * weight.numel() * spatial / module.groups

    pipeline = copy.deepcopy(FusedPipeline(model)).to("meta")  # a copy: moving to meta drops weights
    convolutions = [m for m in pipeline.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    hooks = [m.register_forward_hook(count) for m in convolutions]
    try:
        with torch.no_grad():
            pipeline(torch.zeros((1, NETWORK_TILE, NETWORK_TILE, 3), dtype=torch.uint8, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def _peak_host_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary(name: str, calls: list[float], tiles: int, flops: float, baseline_tps: float | None) -> dict:
    seconds = sum(calls)
    tps = tiles / seconds
    return {"name": name, "tiles": tiles, "seconds": round(seconds, 3), "tiles_per_second": tps,
            "p50_call_seconds": statistics.median(calls),
            "p95_call_seconds": float(np.percentile(calls, 95)),
            "gflops": flops * tps / 1e9, "speedup": tps / baseline_tps if baseline_tps else 1.0,
            "peak_host_mib": round(_peak_host_mib(), 1)}


def _timed(call, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - start


def _open_cases(model: DeepLIIFModel, cases: list[BenchCase], device: str, cache_dir: Path | None,
                stack: contextlib.ExitStack) -> tuple[list, list[dict]]:
    """Open every case's Session (warm, at its batch size); a case that cannot run here is recorded."""
    opened, skipped = [], []
    for case in cases:
        try:
            session = stack.enter_context(Session(model.directory, backend=case.backend,
                                                  precision=case.precision.value, device=device,
                                                  cache_dir=cache_dir, batch_size=case.batch_size,
                                                  force_ungated=case.precision is Precision.FP16,  # speed only
                                                  **dict(case.options)))
        except DeepLIIFError as exc:
            skipped.append({"case": case.label, "reason": str(exc)})
            logger.warning("bench %s skipped: %s", case.label, exc)
            continue
        opened.append((case, session))
    return opened, skipped


def run_bench(model: DeepLIIFModel, tiles: np.ndarray, cases: list[BenchCase], device: str = "auto",
              cache_dir: Path | None = None) -> dict:
    """Baseline and every case, interleaved: for each group of tiles, the DeepLIIF way runs them one by
    one, then each configuration runs them in its batch size, so drift in machine speed during the run
    hits every configuration alike (this shared 2-core VM drifts by 15% between runs)."""
    torch_device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    flops = flops_per_tile(model)
    peak = matmul_peak_gflops(torch_device)
    logger.info("matmul peak %.0f GFLOP/s; %.3f TFLOP per tile", peak, flops / 1e12)
    baseline = DeepLIIFWayRunner(model, device=torch_device)
    with contextlib.ExitStack() as stack:
        opened, skipped = _open_cases(model, cases, device, cache_dir, stack)
        baseline.run_tile(tiles[0])
        for case, session in opened:  # warm-up at the batch size (and CUDA-graph capture)
            session.run(tiles[: case.batch_size])
            if session.info.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        group = max([c.batch_size for c, _ in opened], default=1)
        base_calls, case_calls = [], {case.label: [] for case, _ in opened}
        for start in range(0, len(tiles) - group + 1, group):
            chunk = tiles[start: start + group]
            logger.info("tiles %d-%d: baseline, then %d configurations", start, start + group - 1, len(opened))
            base_calls += [_timed(lambda t=t: baseline.run_tile(t), torch_device) for t in chunk]
            for case, session in opened:
                for i in range(0, group, case.batch_size):
                    batch = chunk[i: i + case.batch_size]
                    case_calls[case.label].append(_timed(lambda b=batch, s=session: s.run(b), session.info.device))
        base = _summary("deepliif_way", base_calls, len(base_calls), flops, None)
        results = []
        for case, session in opened:
            calls = case_calls[case.label]
            entry = _summary(case.label, calls, len(calls) * case.batch_size, flops, base["tiles_per_second"])
            entry.update(backend=session.info.as_dict(), batch_size=case.batch_size)
            if session.accuracy:
                entry["accuracy"] = accuracy_line(session.accuracy)
            if session.info.device == "cuda":
                entry["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            results.append(entry)
    for entry in [base, *results]:
        entry["share_of_matmul_peak"] = entry["gflops"] / peak
    return {"device": torch_device,
            "device_name": torch.cuda.get_device_name() if torch_device == "cuda" else "cpu",
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "tiles": len(base_calls), "tflop_per_tile": flops / 1e12, "matmul_peak_gflops": peak,
            "baseline": base, "results": results, "skipped": skipped}


def format_table(report: dict) -> str:
    header = ("configuration", "tiles", "tiles/s", "p50 s/call", "p95 s/call", "GFLOP/s", "of peak", "speed-up")
    rows = [header]
    for m in [report["baseline"], *report["results"]]:
        rows.append((m["name"], str(m["tiles"]), f"{m['tiles_per_second']:.3f}", f"{m['p50_call_seconds']:.3f}",
                     f"{m['p95_call_seconds']:.3f}", f"{m['gflops']:.0f}", f"{m['share_of_matmul_peak']:.0%}",
                     f"{m['speedup']:.2f}x"))
    lines = format_rows(rows)
    lines.append(f"{report['device_name']}, {report['torch_threads']} torch threads; matmul peak "
                 f"{report['matmul_peak_gflops']:.0f} GFLOP/s; {report['tflop_per_tile']:.2f} TFLOP per tile")
    lines += [f"accuracy of {m['name']} vs fp32: {m['accuracy']}" for m in report["results"] if "accuracy" in m]
    lines += [f"skipped {s['case']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines)


def accuracy_line(report: dict) -> str:
    """One line of a gate report, printed beside the speed of the graph it judged."""
    if "pooled_percent_pos" not in report:  # the engine's own one-tile check of a cached fp16 export
        batch = next(iter(report.get("batches", {}).values()), {})
        psnr = min((s["psnr_db"] for s in batch.get("outputs", {}).values() if s["psnr_db"] is not None),
                   default=None)
        return f"one-tile check {'passed' if report.get('passed') else 'failed'}, min PSNR {psnr} dB"
    pooled = report["pooled_percent_pos"]
    psnr = report["worst_psnr_db"]
    return (f"gate {'passed' if report['passed'] else 'FAILED'} on {len(report['images'])} held-out images: "
            f"pooled % positive {pooled['reference']} -> {pooled['candidate']} (|d| {pooled['delta']}), "
            f"worst |d % pos| per image {max(e['delta']['percent_pos'] for e in report['images'])}, "
            f"worst PSNR Seg {psnr['Seg']} dB, modalities {min(v for k, v in psnr.items() if k != 'Seg' and v)} dB")


def plot(report: dict, path: Path) -> bool:
    """tiles/s against batch size, one line per backend/precision; False when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no plot: matplotlib is not installed (pip install -e '.[bench]')")
        return False
    series: dict[str, list[tuple[int, float]]] = {}
    for m in report["results"]:
        label = m["name"].rsplit("/", 1)[0]
        series.setdefault(label, []).append((m["batch_size"], m["tiles_per_second"]))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        axes.plot(xs, ys, marker="o", label=label)
    axes.axhline(report["baseline"]["tiles_per_second"], color="grey", linestyle="--", label="DeepLIIF way")
    axes.set_xscale("log", base=2)
    axes.set_ylim(bottom=0)  # from zero: a truncated axis makes small gaps look large
    axes.set_xlabel("batch size (tiles per call)")
    axes.set_ylabel("tiles / s")
    model = Path(str(report.get("model", "model")).split(":", 1)[0]).name or "model"
    axes.set_title(f"DeepLIIF tile throughput, {model}, {report['device_name']}")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def mosaic(size: int, tiles: np.ndarray) -> np.ndarray:
    """A size x size image made of the given 512 tiles in turn (e.g. 4096 x 4096 from the sample tiles)."""
    cells = -(-size // NETWORK_TILE)
    rows = [np.concatenate([tiles[(r * cells + c) % len(tiles)] for c in range(cells)], axis=1)
            for r in range(cells)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:size, :size])


def bench_end_to_end(session: Session, image_path: Path) -> dict:
    """One large image through every stage, as `infer` runs it: decode, tiling, inference, stitching,
    postprocessing, PNG encoding. Tiling/stitching overlap inference, so stages can sum to more than
    the wall time."""
    start = time.perf_counter()
    image = read_image(image_path)
    decoded = time.perf_counter()
    result = session.infer(image, InferenceOptions(batch_size=session.batch_size))
    inferred = time.perf_counter()
    for array in result.images.values():
        encode_png(array)
    done = time.perf_counter()
    stages = {"decode": decoded - start, "tiling": result.timings["tiling_seconds"],
              "inference": result.timings["inference_seconds"], "stitching": result.timings["stitching_seconds"],
              "postprocess": result.timings["postprocess_seconds"], "encoding": done - inferred}
    return {"image": str(image_path), "size": list(image.shape[:2]), "tiles": result.tiles,
            "empty_tiles": result.empty_tiles, "backend": session.info.as_dict(), "batch_size": session.batch_size,
            "stage_seconds": {k: round(v, 3) for k, v in stages.items()}, "wall_seconds": round(done - start, 3)}


def format_end_to_end(report: dict) -> str:
    rows = [("stage", "seconds")] + [(k, f"{v:.2f}") for k, v in report["stage_seconds"].items()]
    rows.append(("wall", f"{report['wall_seconds']:.2f}"))
    head = (f"end to end: {report['size'][1]}x{report['size'][0]} image, {report['tiles']} tiles "
            f"({report['empty_tiles']} empty), {report['backend']['name']} batch {report['batch_size']}")
    return "\n".join([head, *format_rows(rows)])
