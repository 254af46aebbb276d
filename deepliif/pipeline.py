"""The fused pipeline: one module from uint8 IHC tiles to the five uint8 DeepLIIF images.

Input `[B, 512, 512, 3]` uint8 (NHWC, as decoded images are); in-graph normalisation; G1-G4 translate;
the five segmentation generators run on the IHC input and on each generated modality; Seg is their
weighted average; every output is converted back to uint8 exactly as DeepLIIF does (`(y + 1) / 2 * 255`,
truncated). This one graph is what every backend (torch, ONNX Runtime, TensorRT) serves.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .contract import (MODALITIES, NETWORK_TILE, OUTPUT_NAMES, SEG_INTERMEDIATE_NAMES, SEG_SOURCES,
                       check_seg_weights, check_tile_batch, run_in_chunks)
from .errors import ArgumentError
from .model_dir import DeepLIIFModel
from .networks import NormMode, set_norm_mode

__all__ = ["MODALITIES", "NETWORK_TILE", "OUTPUT_NAMES", "SEG_INTERMEDIATE_NAMES", "SEG_SOURCES", "DeepLIIFWayRunner",
           "FusedPipeline", "TileRunner", "check_seg_weights", "check_tile_batch", "run_in_chunks", "to_network_input",
           "to_uint8_image"]


def to_network_input(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], with DeepLIIF's operation order (ToTensor, Normalize).

    The cast comes first: TensorRT's ONNX parser takes uint8 only at the graph boundary, where the input
    must feed a Cast directly (onnx-tensorrt ModelImporter: "TensorRT does not support UINT8 types for
    intermediate tensors"), so the transpose runs on floats. Same values either way: the cast is exact.
    The result is made NCHW-contiguous as ToTensor's is: a permuted (channels_last-strided) input makes
    oneDNN keep channels_last, every norm layer copy back, and BatchNorm reduce in another order.
    """
    x = tiles.float().permute(0, 3, 1, 2).contiguous() / 255
    return (x - 0.5) / 0.5


def to_uint8_image(y: torch.Tensor) -> torch.Tensor:
    """float NCHW in [-1, 1] -> uint8 NHWC, truncating like DeepLIIF's tensor2im.

    The cast to uint8 is the last operation, so each graph output comes straight from a Cast (the
    TensorRT boundary rule of `to_network_input`); transposing before or after the cast gives the same bytes.
    """
    scaled = (_fp32(y) + 1) / 2 * 255
    return scaled.clamp(0, 255).permute(0, 2, 3, 1).contiguous().to(torch.uint8)


def _fp32(y: torch.Tensor) -> torch.Tensor:
    """fp32 without a no-op cast (which an exported graph would otherwise carry)."""
    return y if y.dtype == torch.float32 else y.float()


def run_generators(x: torch.Tensor, translators: Sequence[nn.Module], segmenters: Sequence[nn.Module],
                   seg_weights: torch.Tensor, seg_intermediate: bool = False) -> list[torch.Tensor]:
    """The nine generators on a normalised batch: [Hema, DAPI, Lap2, Marker, Seg] as float tensors, and
    with `seg_intermediate` each segmentation generator's own output after them (role order).

    `segmenters` and `seg_weights` are in role order (IHC, Hema, DAPI, Lap2, Marker). DeepLIIF sums the
    modality segmentations first and the IHC one last; the same order keeps the float rounding identical.
    """
    modalities = [g(x) for g in translators]
    ihc_seg, *modality_segs = segmenters
    segs = [g(m) for g, m in zip(modality_segs, modalities)] + [ihc_seg(x)]
    weights = torch.cat([seg_weights[1:], seg_weights[:1]])
    seg = torch.stack([_fp32(s) * w for s, w in zip(segs, weights)]).sum(dim=0)
    return modalities + [seg] + ([segs[-1], *segs[:-1]] if seg_intermediate else [])


class FusedPipeline(nn.Module):
    """Nine generators as one module, batch-safe because every norm layer is per-sample."""

    def __init__(self, model: DeepLIIFModel, seg_weights: Sequence[float] | None = None,
                 compute_dtype: torch.dtype = torch.float32, seg_intermediate: bool = False) -> None:
        """`compute_dtype` float16/bfloat16 runs the convolutions in that type on copies of the weights;
        normalisation statistics, the Seg average and the uint8 conversion stay fp32. `seg_intermediate`
        also returns each segmentation generator's own output (`output_names` says which come back);
        exported graphs are traced without them."""
        super().__init__()
        self.seg_intermediate = seg_intermediate
        self.output_names = OUTPUT_NAMES + (SEG_INTERMEDIATE_NAMES if seg_intermediate else ())
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ArgumentError(f"compute_dtype must be float32, float16 or bfloat16; got {compute_dtype}")
        translators, segmenters = list(model.translators), list(model.segmenters)
        if compute_dtype != torch.float32:
            translators = [copy.deepcopy(g).to(compute_dtype) for g in translators]
            segmenters = [copy.deepcopy(g).to(compute_dtype) for g in segmenters]
        self.compute_dtype = compute_dtype
        self.translators = nn.ModuleList(translators)
        self.segmenters = nn.ModuleList(segmenters)
        weights = check_seg_weights(seg_weights)
        self.register_buffer("seg_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, ihc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = to_network_input(ihc)
        if self.compute_dtype != torch.float32:
            x = x.to(self.compute_dtype)
        outputs = run_generators(x, self.translators, self.segmenters, self.seg_weights, self.seg_intermediate)
        return tuple(to_uint8_image(y) for y in outputs)


class TileRunner:
    """Runs uint8 NHWC tile batches through a FusedPipeline on one device; owns no other state.

    `micro_batch` is how many tiles go through the networks at once. On CPU it defaults to 1: there,
    batching measured ~10% slower per tile (cache effects, docs/BENCHMARKS.md); results are the same.
    On GPU the whole batch goes at once.
    """

    def __init__(self, pipeline: FusedPipeline, device: torch.device | str = "cpu",
                 micro_batch: int | None = None) -> None:
        self.device = torch.device(device)
        self.pipeline = pipeline.to(self.device).eval()
        if micro_batch is not None and micro_batch < 1:
            raise ArgumentError(f"micro_batch must be at least 1; got {micro_batch}")
        self.micro_batch = micro_batch or (1 if self.device.type == "cpu" else None)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        check_tile_batch(batch)
        return run_in_chunks(self._run, batch, self.micro_batch)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = self.pipeline(torch.from_numpy(_writable(batch)).to(self.device))
        return {name: out.cpu().numpy() for name, out in zip(self.pipeline.output_names, outputs)}


def _writable(array: np.ndarray) -> np.ndarray:
    """torch.from_numpy needs a writable, contiguous array; copy only when the input is not one."""
    return np.require(array, requirements=("C", "W"))


class DeepLIIFWayRunner:
    """The published way to run DeepLIIF, kept as the baseline and the reference for parity.

    One tile at a time, the nine generators called one after another, fp32 eager, with the original
    BatchNorm behaviour (statistics of the batch, which for one tile are the tile's own).
    """

    def __init__(self, model: DeepLIIFModel, seg_weights: Sequence[float] | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.translators = [self._batch_mode_copy(g) for g in model.translators]
        self.segmenters = [self._batch_mode_copy(g) for g in model.segmenters]
        self.seg_weights = torch.tensor(check_seg_weights(seg_weights), device=self.device)

    def _batch_mode_copy(self, module: nn.Module) -> nn.Module:
        clone = copy.deepcopy(module).to(self.device).float().eval()
        set_norm_mode(clone, NormMode.BATCH)
        return clone

    def run_tile(self, tile: np.ndarray) -> dict[str, np.ndarray]:
        check_tile_batch(tile[None])
        with torch.no_grad():
            x = to_network_input(torch.from_numpy(_writable(tile))[None].to(self.device))
            outputs = run_generators(x, self.translators, self.segmenters, self.seg_weights)
        return {name: to_uint8_image(y)[0].cpu().numpy() for name, y in zip(OUTPUT_NAMES, outputs)}
