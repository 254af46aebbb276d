"""What the fused pipeline takes and gives, without PyTorch: tile size, output names, batch checks.

Everything that only moves tiles around (tiling, stitching, the serving backends, validation) imports
this instead of `deepliif.pipeline`, so a process that serves an exported graph never imports torch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import ArgumentError

NETWORK_TILE = 512
MODALITIES = ("Hema", "DAPI", "Lap2", "Marker")
OUTPUT_NAMES = MODALITIES + ("Seg",)
SEG_SOURCES = ("IHC",) + MODALITIES  # the input of each segmentation generator, in role order


def run_in_chunks(run: Callable[[np.ndarray], dict[str, np.ndarray]], batch: np.ndarray, step: int | None,
                  progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """`run` on `step` tiles at a time (None: all at once), outputs joined in tile order."""
    step = step or len(batch)
    parts = []
    for start in range(0, len(batch), step):
        chunk = batch[start: start + step]
        parts.append(run(chunk))
        if progress:
            progress(len(chunk))
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUT_NAMES}


def check_tile_batch(batch: np.ndarray) -> None:
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 \
            or batch.shape[1:] != (NETWORK_TILE, NETWORK_TILE, 3) or batch.shape[0] < 1:
        shape = getattr(batch, "shape", None)
        dtype = getattr(batch, "dtype", type(batch).__name__)
        raise ArgumentError(f"expected a uint8 batch of shape [B, {NETWORK_TILE}, {NETWORK_TILE}, 3] "
                            f"with B >= 1; got shape {shape} dtype {dtype}")


def check_seg_weights(seg_weights: Sequence[float] | None) -> tuple[float, ...]:
    """Weights for (IHC, Hema, DAPI, Lap2, Marker) segmentations; DeepLIIF's default is 1/5 each."""
    if seg_weights is None:
        return (0.2,) * len(SEG_SOURCES)
    weights = tuple(float(w) for w in seg_weights)
    if len(weights) != len(SEG_SOURCES) or any(not np.isfinite(w) or w < 0 for w in weights):
        raise ArgumentError(f"seg_weights must be {len(SEG_SOURCES)} finite non-negative numbers "
                            f"for {', '.join(SEG_SOURCES)}; got {list(seg_weights)}")
    return weights
