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


def _time_calls(name: str, calls: list, device: torch.device, tiles: int) -> Measurement:
    durations = []
    for call in calls:
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        durations.append(time.perf_counter() - start)
    return Measurement(name, tiles, sum(durations), durations)


def bench_deepliif_way_vs_batched(model: DeepLIIFModel, tiles: np.ndarray, batch_size: int,
                                  device: torch.device, warmup: int = 1) -> dict:
    """Tiles/s of both ways and their ratio; the warm-up calls are not counted."""
    baseline = DeepLIIFWayRunner(model, device=device)
    batched = TileRunner(FusedPipeline(model), device)
    batches = [tiles[i: i + batch_size] for i in range(0, len(tiles), batch_size)]
    for _ in range(warmup):
        baseline.run_tile(tiles[0])
        batched.run(tiles[:1])
    logger.info("timing the DeepLIIF way on %d tiles", len(tiles))
    a = _time_calls("deepliif_way", [lambda t=t: baseline.run_tile(t) for t in tiles], device, len(tiles))
    logger.info("timing the batched pipeline on %d tiles (batch %d)", len(tiles), batch_size)
    b = _time_calls(f"batched_b{batch_size}", [lambda b=b: batched.run(b) for b in batches], device, len(tiles))
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
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
