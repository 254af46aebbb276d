"""PyTorch on CPU or CUDA: the fused pipeline module, fp32 or fp16 (normalisation kept fp32),
optionally channels_last and, on CUDA, CUDA-graph replay per batch size."""
from __future__ import annotations

import numpy as np
import torch

from deepliif.errors import ArgumentError, BackendUnavailableError
from deepliif.model_dir import DeepLIIFModel
from deepliif.pipeline import NETWORK_TILE, OUTPUT_NAMES, FusedPipeline, TileRunner

from export.config import Precision

from .. import logger
from .base import Backend, BackendInfo


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
                 channels_last: bool = False, cuda_graphs: bool = False, micro_batch: int | None = None) -> None:
        self.device = resolve_torch_device(device)
        precision = Precision.parse(precision)
        if precision is Precision.INT8:
            raise BackendUnavailableError("torch: int8 runs from a calibrated Q/DQ ONNX (onnxruntime or "
                                          "tensorrt backend), not in PyTorch")
        if precision is Precision.FP16 and self.device.type == "cpu":
            raise BackendUnavailableError("torch: fp16 needs a CUDA device (on CPU it is slower than fp32)")
        if cuda_graphs and self.device.type != "cuda":
            raise ArgumentError("torch: CUDA graphs need the cuda device")
        pipeline = FusedPipeline(model, compute_dtype=precision.torch_dtype)
        if channels_last:
            pipeline = pipeline.to(memory_format=torch.channels_last)
        self.runner = TileRunner(pipeline, self.device, micro_batch)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        detail = (f"{name}; torch {torch.__version__}; {torch.get_num_threads()} threads"
                  f"{'; channels_last' if channels_last else ''}{'; CUDA graphs' if cuda_graphs else ''}")
        self.info = BackendInfo("torch", self.device.type, precision, None, detail)

    def run_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if not self.cuda_graphs:
            return self.runner.run(batch)
        graph, static_in, static_out = self._graph_for(len(batch))
        static_in.copy_(torch.from_numpy(np.ascontiguousarray(batch)))
        graph.replay()
        return {name: out.cpu().numpy() for name, out in zip(OUTPUT_NAMES, static_out)}

    def _graph_for(self, size: int):
        """Capture once per batch size: replay then costs one launch instead of ~700 kernel launches."""
        if size not in self._graphs:
            pipeline = self.runner.pipeline
            static_in = torch.zeros((size, NETWORK_TILE, NETWORK_TILE, 3), dtype=torch.uint8, device=self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.inference_mode(), torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside capture (cuDNN autotuning, allocator)
                    pipeline(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                static_out = pipeline(static_in)
            self._graphs[size] = (graph, static_in, static_out)
            logger.info("captured a CUDA graph for batch %d", size)
        return self._graphs[size]

    def close(self) -> None:
        self._graphs.clear()
        if self.device.type == "cuda":
            self.runner.pipeline.to("cpu")
            torch.cuda.empty_cache()
