"""What the fused pipeline takes and gives, without PyTorch: tile size, output names, batch checks.

Everything that only moves tiles around (tiling, stitching, the serving backends, validation) imports
this instead of `deepliif.pipeline`, so a process that serves an exported graph never imports torch.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ArgumentError

NETWORK_TILE = 512
MODALITIES = ("Hema", "DAPI", "Lap2", "Marker")
OUTPUT_NAMES = MODALITIES + ("Seg",)
SEG_SOURCES = ("IHC",) + MODALITIES  # the input of each segmentation generator, in role order
# Each segmentation generator's own output before the average (DeepLIIF 1.2.7's `return_seg_intermediate`,
# named there `mod<k>-<Name>_s`), in role order; only the torch backend's pipeline gives them.
SEG_INTERMEDIATE_NAMES = tuple(f"{source}_s" for source in SEG_SOURCES)


@dataclass
class GraphContract:
    """The fused graph's interface, stated once (like Optimum's `OnnxConfig`): the exporter names the
    tensors from it, every backend checks and binds by it, the Triton config and validation read it.
    Renaming an ONNX output is a change to `onnx_outputs` and nothing else.

    `onnx_outputs` maps DeepLIIF's output names (file suffixes, result keys) to the graph's tensor names,
    in the order the pipeline returns them."""

    input_name: str = "ihc"
    onnx_outputs: dict[str, str] = field(default_factory=lambda: {name: name.lower() for name in OUTPUT_NAMES})
    dtype: str = "uint8"
    layout: str = "NHWC"
    batch_axis: str = "batch"
    tile: int = NETWORK_TILE
    channels: int = 3
    file_name: str = "deepliif.onnx"

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.onnx_outputs)

    @property
    def onnx_output_names(self) -> tuple[str, ...]:
        return tuple(self.onnx_outputs.values())

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return (self.input_name, *self.onnx_output_names)

    def by_output_name(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Arrays keyed by tensor name, re-keyed by DeepLIIF's output names in pipeline order."""
        return {name: arrays[onnx_name] for name, onnx_name in self.onnx_outputs.items()}

    def signature_problems(self, inputs: Mapping[str, tuple[str, Sequence]],
                           outputs: Mapping[str, tuple[str, Sequence]]) -> list[str]:
        """What differs from the contract, given `{tensor: (dtype name, shape)}` per group (a shape may be
        empty when the runtime does not report one). Empty: the graph is the fused pipeline."""
        problems = []
        for group, actual, expected in (("input", inputs, [self.input_name]),
                                        ("output", outputs, list(self.onnx_output_names))):
            if sorted(actual) != sorted(expected):
                problems.append(f"{group}s are {sorted(actual)}, expected {expected}")
                continue
            for name in expected:
                dtype, shape = actual[name]
                if dtype != self.dtype or (shape and (len(shape) != 4 or list(shape[1:]) != [self.tile, self.tile,
                                                                                             self.channels])):
                    problems.append(f"{group} {name} is {dtype} {list(shape)}, expected {self.dtype} "
                                    f"[{self.batch_axis}, {self.tile}, {self.tile}, {self.channels}]")
        return problems


FUSED_GRAPH = GraphContract()


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
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


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
