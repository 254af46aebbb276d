"""`deepliif-engine bench` (first version): the DeepLIIF way against the batched pipeline, same run.

(a) the DeepLIIF way: one tile at a time, the nine generators called one after another, fp32 eager,
    original BatchNorm behaviour; (b) the fused pipeline with per-sample normalisation, `batch_size` tiles
    per call. Same weights, same tiles, same device, measured back to back in one process.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from deepliif.model_dir import DeepLIIFModel
from deepliif.pipeline import DeepLIIFWayRunner, FusedPipeline, TileRunner

from . import logger


@dataclass
class Measurement:
    name: str
    tiles: int
    seconds: float
    call_seconds: list[float]

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds

    def summary(self) -> dict:
        return {**asdict(self), "tiles_per_second": self.tiles_per_second,
                "median_call_seconds": statistics.median(self.call_seconds)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    return time.perf_counter() - start


def bench_deepliif_way_vs_batched(model: DeepLIIFModel, tiles: np.ndarray, batch_size: int,
                                  device: torch.device, warmup: int = 1) -> dict:
    """Tiles/s of both ways and their ratio; the warm-up calls are not counted.

    The two ways alternate batch by batch (the DeepLIIF way on a batch's tiles, then the pipeline on the
    same batch), so drift in machine speed during the run affects both alike.
    """
    baseline = DeepLIIFWayRunner(model, device=device)
    batched = TileRunner(FusedPipeline(model), device)
    for _ in range(warmup):
        baseline.run_tile(tiles[0])
        batched.run(tiles[:1])
    a_calls, b_calls = [], []
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start: start + batch_size]
        logger.info("tiles %d-%d: the DeepLIIF way, then the batched pipeline", start, start + len(batch) - 1)
        a_calls += [_timed(lambda t=t: baseline.run_tile(t), device) for t in batch]
        b_calls.append(_timed(lambda b=batch: batched.run(b), device))
    a = Measurement("deepliif_way", len(tiles), sum(a_calls), a_calls)
    b = Measurement(f"batched_b{batch_size}", len(tiles), sum(b_calls), b_calls)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "micro_batch": batched.micro_batch,
        "tiles": len(tiles),
        "deepliif_way": a.summary(),
        "batched": b.summary(),
        "speedup": b.tiles_per_second / a.tiles_per_second,
    }


def format_table(result: dict) -> str:
    rows = [("way", "tiles", "seconds", "tiles/s", "median s/call")]
    for key in ("deepliif_way", "batched"):
        m = result[key]
        rows.append((m["name"], str(m["tiles"]), f"{m['seconds']:.2f}", f"{m['tiles_per_second']:.3f}",
                     f"{m['median_call_seconds']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"speed-up batched / DeepLIIF way: {result['speedup']:.2f}x "
                 f"({result['device_name']}, {result['torch_threads']} torch threads)")
    return "\n".join(lines)
