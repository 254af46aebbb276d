"""A test double of the part of the `tensorrt` Python API this project calls, for machines without a GPU.

It is installed as `sys.modules["tensorrt"]` by the `fake_tensorrt` fixture. It enforces the documented
preconditions the project must meet, so the real build -> publish -> load -> run -> fallback code is
driven through the same rules it meets on a GPU:

- OnnxParser walks the graph it is given: uint8 only at the boundary ("UINT8 is only supported as network
  input or output tensor types", onnx-tensorrt docs/operators.md), opset 9-20.
- The builder needs an optimisation profile for every dynamic input, and TF32 is on until cleared
  (BuilderFlag.TF32: "Enabled by default").
- A timing cache carries the device and version it was made on; `set_timing_cache(cache, False)` returns
  False for another one (ITimingCache.combine / IBuilderConfig docs); `get_timing_cache()` is None
  until one is set.
- The runtime refuses (returns None) a plan for another device or TensorRT version, and a
  version-compatible plan unless `engine_host_code_allowed` is True (TensorRT "Version Compatibility").
- The execution context refuses unknown tensor names and shapes outside the profile (returns False),
  and runs only when every I/O address and the input shape are set. It computes the plan's graph with
  ONNX Runtime on the CPU, reading and writing the bound addresses, as a GPU would its device buffers.

`CALLS` records what the code under test asked for; `STATE` switches failure modes on.
"""
from __future__ import annotations

import ctypes
import json

import numpy as np
import onnx
from onnx import TensorProto

__version__ = "11.4.0.106"
# "current": whether the backend made its device current (TensorRT deserialises engines and creates
# contexts on the current device); deserialising or creating a context without it is refused
DEVICE = {"name": "Fake GPU (test double)", "compute_capability": "9.0", "current": False}
# "perturb": grey levels added to every output, as a plan whose kernels compute something else would
STATE = {"build_fails": False, "execute_fails": False, "timing_cache_none": False, "device_fault": False,
         "perturb": 0, "context_fails": False}
# what the CUDA stand-in (tests/conftest.py `DeviceStream`) registers: device allocations by address (their
# sizes) and streams by handle; a stream with work not yet synchronised is in PENDING
DEVICE_MEMORY: dict[int, int] = {}
STREAMS: set[int] = set()
PENDING: set[int] = set()
CALLS: list[tuple] = []
NETWORK_TILE = 512  # the fused graph's tile (the double knows the contract it stands in for)
MAGIC = b"FAKE-TENSORRT-PLAN\n"


def reset() -> None:
    DEVICE.update(name="Fake GPU (test double)", compute_capability="9.0")
    STATE.update(build_fails=False, execute_fails=False, timing_cache_none=False, perturb=0, context_fails=False)
    PENDING.clear()
    CALLS.clear()


class Logger:
    ERROR, WARNING, INFO = 1, 2, 3

    def __init__(self, severity: int = WARNING) -> None:
        self.severity = severity
        self.messages: list[str] = []

    def log(self, message: str) -> None:
        self.messages.append(message)


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 1


class MemoryPoolType:
    WORKSPACE = 0


class BuilderFlag:
    FP16, INT8 = 0, 1  # TensorRT 10's precision flags: refused on a strongly typed network
    TF32 = 6
    VERSION_COMPATIBLE = 13


class TensorIOMode:
    NONE, INPUT, OUTPUT = "NONE", "INPUT", "OUTPUT"


class DataType:
    FLOAT, HALF, INT8, INT32, BOOL, UINT8 = "FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8"


_ONNX_TYPES = {TensorProto.FLOAT: DataType.FLOAT, TensorProto.FLOAT16: DataType.HALF,
               TensorProto.UINT8: DataType.UINT8, TensorProto.INT8: DataType.INT8}


def _tensors(values) -> list[dict]:
    return [{"name": v.name, "dtype": _ONNX_TYPES.get(v.type.tensor_type.elem_type, "OTHER"),
             "dims": [d.dim_value if d.dim_value else -1 for d in v.type.tensor_type.shape.dim]} for v in values]


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx_bytes: bytes | None = None
        self.inputs: list[dict] = []
        self.outputs: list[dict] = []


class ParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self.errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> ParserError:
        return self.errors[index]

    def parse_from_file(self, path: str) -> bool:
        CALLS.append(("parse_from_file", path))
        data = open(path, "rb").read()
        proto = onnx.load_from_string(data)
        self.errors = [ParserError(e) for e in _uint8_errors(proto) + _opset_errors(proto)]
        if self.errors:
            return False
        self.network.onnx_bytes = data
        self.network.inputs = _tensors(proto.graph.input)
        self.network.outputs = _tensors(proto.graph.output)
        return True


def _opset_errors(proto: onnx.ModelProto) -> list[str]:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return [] if 9 <= opset <= 20 else [f"unsupported opset {opset}"]


def _uint8_errors(proto: onnx.ModelProto) -> list[str]:
    """What the ModelImporter refuses: a uint8 tensor anywhere but a graph input feeding Casts or a graph
    output made by a Cast."""
    uint8_inputs = {v.name for v in proto.graph.input if v.type.tensor_type.elem_type == TensorProto.UINT8}
    uint8_outputs = {v.name for v in proto.graph.output if v.type.tensor_type.elem_type == TensorProto.UINT8}
    errors = []
    for node in proto.graph.node:
        if node.op_type != "Cast" and uint8_inputs.intersection(node.input):
            errors.append(f"{node.name}: TensorRT does not support UINT8 types for intermediate tensors")
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to == TensorProto.UINT8 and node.output[0] not in uint8_outputs:
            errors.append(f"{node.name}: TensorRT does not support UINT8 types for intermediate tensors")
        if node.op_type != "Cast" and uint8_outputs.intersection(node.output):
            errors.append(f"{node.name}: a UINT8 network output must be produced by a Cast")
    return errors


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[list, list, list]] = {}

    def set_shape(self, name: str, low, opt, high) -> None:
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise ValueError(f"profile for {name} is not min <= opt <= max: {low} {opt} {high}")
        self.shapes[name] = (list(low), list(opt), list(high))


class ITimingCache:
    def __init__(self, header: dict, entries: int = 0) -> None:
        self.header = header
        self.entries = entries

    def serialize(self) -> bytes:
        return json.dumps({**self.header, "entries": self.entries}).encode()


def _device_header() -> dict:
    return {"compute_capability": DEVICE["compute_capability"], "tensorrt": __version__}


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # TF32 is enabled by default
        self.pools: dict[int, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool: int, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_flag(self, flag: int) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: int) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag: int) -> bool:
        return flag in self.flags

    def create_timing_cache(self, serialized: bytes) -> ITimingCache:
        if not serialized:
            return ITimingCache(_device_header())
        data = json.loads(bytes(serialized))
        return ITimingCache({k: data[k] for k in ("compute_capability", "tensorrt")}, data["entries"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        CALLS.append(("set_timing_cache", cache.header, ignore_mismatch))
        if cache.header != _device_header() and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return None if STATE["timing_cache_none"] else self.timing_cache


class IHostMemory(bytes):
    pass


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        CALLS.append(("build", sorted(config.flags)))
        if network.onnx_bytes is None or STATE["build_fails"]:
            self.logger.log("build failed")
            return None
        if not network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            self.logger.log("the network is not strongly typed: its precision would not be the graph's")
            return None
        if config.flags & {BuilderFlag.FP16, BuilderFlag.INT8}:
            self.logger.log("precision flags are not allowed on a strongly typed network")
            return None
        for tensor in network.inputs:
            if -1 in tensor["dims"] and not any(tensor["name"] in p.shapes for p in config.profiles):
                self.logger.log(f"no optimization profile for dynamic input {tensor['name']}")
                return None
        if config.timing_cache is not None:
            config.timing_cache.entries += 1
        header = {**_device_header(), "version_compatible": BuilderFlag.VERSION_COMPATIBLE in config.flags,
                  "tf32": BuilderFlag.TF32 in config.flags, "inputs": network.inputs, "outputs": network.outputs,
                  "profile": {name: shapes for p in config.profiles for name, shapes in p.shapes.items()}}
        return IHostMemory(MAGIC + json.dumps(header).encode() + b"\n" + network.onnx_bytes)


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
        CALLS.append(("deserialize", self.engine_host_code_allowed))
        if not bytes(data).startswith(MAGIC):
            self.logger.log("magic tag does not match")
            return None
        if not DEVICE["current"]:
            self.logger.log("deserialised with no device made current: the engine lands on GPU 0")
            return None
        header_line, onnx_bytes = bytes(data)[len(MAGIC):].split(b"\n", 1)
        header = json.loads(header_line)
        if header["compute_capability"] != DEVICE["compute_capability"]:
            self.logger.log("plan built for another device")
            return None
        if header["version_compatible"] and not self.engine_host_code_allowed:
            self.logger.log("version-compatible plan needs engine_host_code_allowed")
            return None
        if not header["version_compatible"] and header["tensorrt"] != __version__:
            self.logger.log("plan built with another TensorRT version")
            return None
        return ICudaEngine(header, onnx_bytes)


class ICudaEngine:
    def __init__(self, header: dict, onnx_bytes: bytes) -> None:
        self.header = header
        self.onnx_bytes = onnx_bytes
        self.tensors = {t["name"]: (TensorIOMode.INPUT, t) for t in header["inputs"]}
        self.tensors.update({t["name"]: (TensorIOMode.OUTPUT, t) for t in header["outputs"]})

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> str:
        return self.tensors[name][0] if name in self.tensors else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> str:
        return self.tensors[name][1]["dtype"]

    def create_execution_context(self) -> IExecutionContext | None:
        if not DEVICE["current"] or STATE["context_fails"]:
            return None  # on the wrong device (what the backend must not do), or out of device memory
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self._session = None

    def set_input_shape(self, name: str, shape) -> bool:
        low, _, high = self.engine.header["profile"].get(name, (None, None, None))
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT or low is None or len(shape) != len(low) or \
                not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        """Only addresses inside a device allocation: 0 and host (or pinned host) pointers are refused."""
        CALLS.append(("set_tensor_address", name))
        if name not in self.engine.tensors or _allocation_end(address) is None:
            return False
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        """An input's shape as set; an output's as the set input shapes give it (the fused graph keeps the
        batch and the 512x512x3 tile); -1 where not yet known, as TensorRT reports it."""
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes.get(name, (-1, NETWORK_TILE, NETWORK_TILE, 3))
        batch = next(iter(self.shapes.values()), (-1,))[0]
        return (batch, NETWORK_TILE, NETWORK_TILE, 3)

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Needs a real (non-default) stream, every tensor bound inside its allocation for the shapes set;
        its results are the stream's until the stream is synchronised."""
        CALLS.append(("execute", stream_handle))
        if stream_handle == 0 or stream_handle not in STREAMS:
            return False
        if STATE["device_fault"]:  # what the CUDA runtime reports for a kernel's out-of-bounds access
            raise RuntimeError("CUDA error: an illegal memory access was encountered (cudaErrorIllegalAddress)")
        inputs = [n for n, (mode, _) in self.engine.tensors.items() if mode == TensorIOMode.INPUT]
        if STATE["execute_fails"] or set(self.addresses) != set(self.engine.tensors) or \
                any(n not in self.shapes for n in inputs):
            return False
        if not self._bound_buffers_fit():
            raise RuntimeError("CUDA error: an illegal memory access was encountered (cudaErrorIllegalAddress)")
        feeds = {n: _read(self.addresses[n], self.shapes[n]) for n in inputs}
        names = [t["name"] for t in self.engine.header["outputs"]]
        for name, value in zip(names, self._onnxruntime().run(names, feeds)):
            if STATE["perturb"]:
                value = np.clip(value.astype(np.int16) + STATE["perturb"], 0, 255).astype(np.uint8)
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        PENDING.add(stream_handle)
        return True

    def _bound_buffers_fit(self) -> bool:
        for name, address in self.addresses.items():
            size = int(np.prod(self.get_tensor_shape(name)))
            end = _allocation_end(address)
            if end is None or address + size > end:
                return False
        return True

    def _onnxruntime(self):
        if self._session is None:
            import onnxruntime
            self._session = onnxruntime.InferenceSession(self.engine.onnx_bytes,
                                                         providers=["CPUExecutionProvider"])
        return self._session


def _allocation_end(address: int) -> int | None:
    """The end of the device allocation holding `address`; None outside every one."""
    for start, size in DEVICE_MEMORY.items():
        if start <= address < start + size:
            return start + size
    return None


def _read(address: int, shape: tuple) -> np.ndarray:
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_uint8 * count).from_address(address)).reshape(shape).copy()
