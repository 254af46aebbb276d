"""TensorRT plans: `execute_async_v3` with tensor addresses on torch CUDA buffers and a CUDA stream.

The plan's `engine.json` is checked before deserialising: a plan for another GPU or TensorRT version is
refused with the reason (TensorRT itself would fail with a far less helpful message, or crash).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from deepliif.errors import ArtifactError, BackendUnavailableError
from deepliif.pipeline import NETWORK_TILE, OUTPUT_NAMES

from export.config import INPUT_NAME, Precision
from export.tensorrt_build import METADATA_FILE, EngineMetadata, GpuInfo, tensorrt_module

from .. import logger
from .base import Backend, BackendInfo


class TensorRTBackend(Backend):
    def __init__(self, plan_path: Path, device_index: int = 0) -> None:
        import torch

        trt = tensorrt_module()
        if not torch.cuda.is_available():
            raise BackendUnavailableError("tensorrt: no CUDA GPU is visible here")
        plan_path = Path(plan_path)
        metadata = EngineMetadata.read(plan_path.with_name(METADATA_FILE))
        metadata.check_plan_file(plan_path)
        metadata.check_runtime(trt.__version__, GpuInfo.current(device_index))
        self.torch = torch
        self.device = torch.device("cuda", device_index)
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.trt_logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialise {plan_path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.min_batch = metadata.profile["min"][0]
        self.info = BackendInfo("tensorrt", "cuda", Precision.parse(metadata.precision), metadata.profile["max"][0],
                                f"{metadata.gpu_name}; TensorRT {trt.__version__}; profile {metadata.profile}")
        logger.info("TensorRT plan %s loaded: %s", plan_path, self.info.detail)

    def run_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        size = len(batch)
        padded = batch
        if size < self.min_batch:  # the profile's minimum: pad with copies, drop their results
            padded = np.concatenate([batch, np.repeat(batch[-1:], self.min_batch - size, axis=0)])
        shape = (len(padded), NETWORK_TILE, NETWORK_TILE, 3)
        with torch.cuda.stream(self.stream):
            tiles = torch.from_numpy(np.ascontiguousarray(padded)).to(self.device)
            outputs = {name: torch.empty(shape, dtype=torch.uint8, device=self.device) for name in OUTPUT_NAMES}
            self.context.set_input_shape(INPUT_NAME, shape)
            self.context.set_tensor_address(INPUT_NAME, tiles.data_ptr())
            for name, tensor in outputs.items():
                self.context.set_tensor_address(name.lower(), tensor.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ArtifactError("TensorRT execution failed (see the TensorRT messages above)")
            host = {name: tensor[:size].to("cpu", non_blocking=True) for name, tensor in outputs.items()}
        self.stream.synchronize()
        return {name: tensor.numpy() for name, tensor in host.items()}

    def close(self) -> None:
        self.context = None
        self.engine = None
