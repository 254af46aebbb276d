"""PyTorch on CPU or CUDA: the fused pipeline module, fp32 or fp16 (normalisation kept fp32),
optionally channels_last and, on CUDA, CUDA-graph replay per batch size."""
from __future__ import annotations


import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from deepliif.errors import ArgumentError
from deepliif.logs import project_logger
from deepliif.model_dir import DeepLIIFModel
from deepliif.pipeline import NETWORK_TILE, FusedPipeline, TileRunner
from engine.errors import BackendUnavailableError

from engine.backends.precision import Precision

from .base import Backend, BackendInfo

logger = project_logger("engine")


@contextlib.contextmanager
def tf32_for(precision: Precision) -> Iterator[None]:
    """TF32 as this precision needs it, for the calls inside the block only. fp32 must stay within one
    grey level of the CPU reference, a promise TF32 convolutions (on by default for cuDNN in PyTorch) are
    not validated against; reduced precision is gated on its own. PyTorch's switches are process-wide, so
    they are set around each call and restored after it: a torch fp16 session opened after an fp32 one
    (as `bench` does) must not turn TF32 on for the fp32 one."""
    allowed = precision is not Precision.FP32
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@dataclass
class CapturedGraph:
    static_in: torch.Tensor
    static_out: dict[str, torch.Tensor]
    replay: Callable[[], None]


def captured_size(batch: int) -> int:
    """Batches are padded to the next power of two: at most log2(max batch) + 1 graphs, whatever sizes
    the tile loop sends (a graph per distinct size would grow memory with every new remainder batch)."""
    return 1 << (batch - 1).bit_length()


class GraphReplayer:
    """Replays one captured graph per padded batch size; `capture(size)` makes one.

    Graphs share one memory pool, so captures go largest first: each smaller capture then fits in memory
    the pool already holds instead of growing it. A batch larger than every graph captured so far drops
    them all and starts again from it; before a first capture `release` returns what the allocator keeps
    cached (an eager warm-up's activations). The tile loop sends its full batches first, so a re-capture
    happens at most once in practice."""

    def __init__(self, capture: Callable[[int], CapturedGraph], release: Callable[[], None] = lambda: None) -> None:
        self.capture = capture
        self.release = release
        self.graphs: dict[int, CapturedGraph] = {}

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        size = len(batch)
        padded = captured_size(size)
        if padded not in self.graphs:
            if self.graphs and padded > max(self.graphs):
                logger.info("batch %d is larger than every captured CUDA graph: capturing again, largest first",
                            padded)
                self.graphs.clear()
            if not self.graphs:
                self.release()
            self.graphs[padded] = self.capture(padded)
            logger.info("captured a CUDA graph for batch %d", padded)
        graph = self.graphs[padded]
        graph.static_in[:size].copy_(torch.from_numpy(np.ascontiguousarray(batch)))
        if padded > size:  # the padding repeats the last tile; its results are dropped
            graph.static_in[size:].copy_(graph.static_in[size - 1: size].expand(padded - size, -1, -1, -1))
        graph.replay()
        return {name: out[:size].cpu().numpy() for name, out in graph.static_out.items()}

    def clear(self) -> None:
        self.graphs.clear()


def resolve_torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("torch: no CUDA device is available to PyTorch here")
    if device not in ("cpu", "cuda"):
        raise ArgumentError(f"device must be auto, cpu or cuda; got {device!r}")
    return torch.device(device)


class TorchBackend(Backend):
    """The reference implementation as a backend. fp16 on CPU is refused: it is an emulation slower
    than fp32 there, never what a user wants."""

    def __init__(self, model: DeepLIIFModel, device: str = "auto", precision: Precision = Precision.FP32,
                 channels_last: bool = False, cuda_graphs: bool = False, micro_batch: int | None = None,
                 seg_intermediate: bool = False) -> None:
        self.device = resolve_torch_device(device)
        precision = Precision.parse(precision)
        if precision is Precision.INT8:
            raise BackendUnavailableError("torch: int8 runs from a calibrated Q/DQ ONNX (onnxruntime or "
                                          "tensorrt backend), not in PyTorch")
        if precision is Precision.FP16 and self.device.type == "cpu":
            raise BackendUnavailableError("torch: fp16 needs a CUDA device (on CPU it is slower than fp32)")
        if cuda_graphs and self.device.type != "cuda":
            raise ArgumentError("torch: CUDA graphs need the cuda device")
        pipeline = FusedPipeline(model, compute_dtype=precision.torch_dtype, seg_intermediate=seg_intermediate)
        self.output_names = pipeline.output_names
        if channels_last:
            pipeline = pipeline.to(memory_format=torch.channels_last)
        self.runner = TileRunner(pipeline, self.device, micro_batch)
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        # one side stream for every capture: graphs sharing a pool must be captured on the same stream
        self._capture_stream = torch.cuda.Stream(self.device) if cuda_graphs else None
        self.graphs = GraphReplayer(self._capture, torch.cuda.empty_cache) if cuda_graphs else None
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        detail = (f"{name}; torch {torch.__version__}; {torch.get_num_threads()} threads"
                  f"{'; channels_last' if channels_last else ''}{'; CUDA graphs' if cuda_graphs else ''}")
        self.info = BackendInfo("torch", self.device.type, precision, None, detail,
                                tf32=(precision is not Precision.FP32) if self.device.type == "cuda" else None)

    def run_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with tf32_for(self.info.precision):  # a graph captures with the switches its capture saw
            return self.runner.run(batch) if self.graphs is None else self.graphs.run(batch)

    def _capture(self, size: int) -> CapturedGraph:
        """Warm up and capture on the backend's one side stream, into the memory pool every captured graph
        shares, so graphs for several batch sizes do not each keep their own activations."""
        pipeline = self.runner.pipeline
        static_in = torch.zeros((size, NETWORK_TILE, NETWORK_TILE, 3), dtype=torch.uint8, device=self.device)
        side = self._capture_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside capture (cuDNN autotuning, allocator)
                pipeline(static_in)
            side.synchronize()
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                static_out = pipeline(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return CapturedGraph(static_in, dict(zip(self.output_names, static_out)), graph.replay)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
        if self.device.type == "cuda":
            self.runner.pipeline.to("cpu")
            torch.cuda.empty_cache()
