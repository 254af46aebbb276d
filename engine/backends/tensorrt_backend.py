"""TensorRT plans: `execute_async_v3` with tensor addresses on torch CUDA buffers and a CUDA stream.

The plan's `engine.json` is checked before deserialising: a plan for another GPU or TensorRT version is
refused with the reason (TensorRT itself would fail with a far less helpful message, or crash). After
deserialising, the engine's own I/O tensors are checked against the fused-graph contract, and every
return value TensorRT documents as a failure signal (`deserialize_cuda_engine` None, `set_input_shape`
and `execute_async_v3` False) is turned into an error that says what failed.
"""
from __future__ import annotations


import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepliif.errors import ArgumentError
from deepliif.contract import FUSED_GRAPH, NETWORK_TILE, OUTPUT_NAMES
from deepliif.logs import project_logger
from engine.errors import ArtifactError, BackendUnavailableError

from engine.backends.precision import Precision
from .tensorrt_plan import METADATA_FILE, EngineMetadata, GpuInfo, tensorrt_module

from .base import Backend, BackendInfo

logger = project_logger("engine")


class CudaStream:
    """Everything the backend asks of torch.cuda, in one place: the seam contract tests replace."""

    def __init__(self, device_index: int) -> None:
        import torch
        if not torch.cuda.is_available():
            raise BackendUnavailableError("tensorrt: no CUDA GPU is visible here")
        self.device = torch.device("cuda", device_index)
        self._stream = torch.cuda.Stream(self.device)

    @property
    def handle(self) -> int:
        return self._stream.cuda_stream

    def scope(self) -> contextlib.AbstractContextManager:
        import torch
        return torch.cuda.stream(self._stream)

    def device_scope(self) -> contextlib.AbstractContextManager:
        """The device current while the block runs: TensorRT deserialises engines and creates execution
        contexts on the current device, so without it any index but 0 would put the engine on GPU 0."""
        import torch
        return torch.cuda.device(self.device)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def empty(self, shape: tuple[int, ...]):
        """A uint8 buffer in this device's memory."""
        import torch
        return torch.empty(shape, dtype=torch.uint8, device=self.device)


def open_stream(device_index: int) -> CudaStream:
    return CudaStream(device_index)


class TensorRTBackend(Backend):
    def __init__(self, plan_path: Path, device_index: int = 0) -> None:
        trt = tensorrt_module()
        self.stream = open_stream(device_index)
        plan_path = Path(plan_path)
        metadata = EngineMetadata.read(plan_path.with_name(METADATA_FILE))
        metadata.check_plan_file(plan_path)
        metadata.check_runtime(trt.__version__, GpuInfo.current(device_index))
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.trt_logger)
        if metadata.version_compatible:
            # a version-compatible plan carries its own lean runtime (host code); TensorRT refuses to run
            # it unless allowed (TensorRT "Version Compatibility": trust only plans you built). Ours are.
            self.runtime.engine_host_code_allowed = True
        with self.stream.device_scope():
            self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self.engine is None:
                raise ArtifactError(f"TensorRT could not deserialise {plan_path} (see the TensorRT messages above)")
            check_engine_io(trt, self.engine, plan_path)
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ArtifactError(f"TensorRT could not create an execution context for {plan_path} "
                                "(out of device memory?)")
        self.min_batch = metadata.profile["min"][0]
        self._buffers: _Buffers | None = None
        self.info = BackendInfo("tensorrt", "cuda", Precision.parse(metadata.precision), metadata.profile["max"][0],
                                f"{metadata.gpu_name}; TensorRT {trt.__version__}; profile {metadata.profile}",
                                tf32=metadata.tf32, engine_cache=str(Path(plan_path).parent))
        logger.info("TensorRT plan %s loaded: %s", plan_path, self.info.detail)

    def run_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch
        size = len(batch)
        padded = max(size, self.min_batch)  # the profile's minimum: padded with copies, their results dropped
        shape = (padded, NETWORK_TILE, NETWORK_TILE, 3)
        buffers = self._buffers_for(padded)
        with self.stream.scope():
            tiles = buffers.tiles[:padded]
            tiles[:size].copy_(torch.from_numpy(np.ascontiguousarray(batch)))
            if padded > size:
                tiles[size:].copy_(tiles[size - 1: size].expand(padded - size, -1, -1, -1))
            if not self.context.set_input_shape(FUSED_GRAPH.input_name, shape):
                raise ArgumentError(f"TensorRT refused input shape {shape}: outside the plan's profile "
                                    f"(batch {self.min_batch}..{self.info.max_batch})")
            for name in OUTPUT_NAMES:
                planned = tuple(self.context.get_tensor_shape(FUSED_GRAPH.onnx_outputs[name]))
                if planned != shape:
                    raise ArtifactError(f"TensorRT plan gives {name} the shape {planned} for input {shape}; the "
                                        "fused graph keeps the batch and the tile")
            if not self.context.execute_async_v3(self.stream.handle):
                raise ArtifactError("TensorRT execution failed (see the TensorRT messages above)")
            for name in OUTPUT_NAMES:
                buffers.host[name][:size].copy_(buffers.outputs[name][:size], non_blocking=True)
        self.stream.synchronize()
        return {name: buffers.host[name][:size].numpy().copy() for name in OUTPUT_NAMES}  # the buffers are reused

    def _buffers_for(self, batch: int) -> _Buffers:
        """Device buffers (and pinned host copies) for batches up to the largest seen, allocated and bound
        once, as Polygraphy's TrtRunner does: a smaller batch uses their first rows, whose addresses are
        the same; only a larger batch allocates and binds again."""
        if self._buffers is None or self._buffers.capacity < batch:
            self._buffers = _Buffers.allocate(batch, self.stream)
            self._bind(FUSED_GRAPH.input_name, self._buffers.tiles.data_ptr())
            for name, tensor in self._buffers.outputs.items():
                self._bind(FUSED_GRAPH.onnx_outputs[name], tensor.data_ptr())
        return self._buffers

    def _bind(self, name: str, address: int) -> None:
        if not self.context.set_tensor_address(name, address):
            raise ArtifactError(f"TensorRT refused the address of tensor {name!r}")

    def close(self) -> None:
        self._buffers = None
        self.context = None
        self.engine = None


@dataclass
class _Buffers:
    capacity: int
    tiles: object  # torch.Tensor on the device, (capacity, 512, 512, 3) uint8
    outputs: dict  # name -> device torch.Tensor of the same shape
    host: dict  # name -> host torch.Tensor (pinned on a GPU) for the copies back

    @classmethod
    def allocate(cls, capacity: int, stream: CudaStream) -> _Buffers:
        import torch
        shape = (capacity, NETWORK_TILE, NETWORK_TILE, 3)
        pinned = stream.device.type == "cuda"
        return cls(capacity, stream.empty(shape), {name: stream.empty(shape) for name in OUTPUT_NAMES},
                   {name: torch.empty(shape, dtype=torch.uint8, pin_memory=pinned) for name in OUTPUT_NAMES})


def check_engine_io(trt, engine, plan_path: Path) -> None:
    """The engine's I/O tensors must be the fused graph's: one uint8 input `ihc`, the five uint8 outputs."""
    expected = {FUSED_GRAPH.input_name: trt.TensorIOMode.INPUT,
                **{name: trt.TensorIOMode.OUTPUT for name in FUSED_GRAPH.onnx_output_names}}
    actual = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        actual[name] = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name))
    problems = []
    if set(actual) != set(expected):
        problems.append(f"tensors are {sorted(actual)}, expected {sorted(expected)}")
    for name, mode in expected.items():
        if name not in actual:
            continue
        actual_mode, dtype = actual[name]
        if actual_mode != mode:
            problems.append(f"{name} is {actual_mode}, expected {mode}")
        if dtype != trt.DataType.UINT8:
            problems.append(f"{name} is {dtype}, expected uint8")
    if problems:
        raise ArtifactError(f"{plan_path} is not a DeepLIIF fused-pipeline plan: {'; '.join(problems)}")
