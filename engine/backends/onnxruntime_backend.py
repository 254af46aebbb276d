"""ONNX Runtime on the fused ONNX: TensorRT EP, then CUDA EP, then CPU EP, whichever the package offers."""
from __future__ import annotations


import os
from pathlib import Path

import numpy as np

from deepliif.errors import ArgumentError
from deepliif.contract import FUSED_GRAPH, NETWORK_TILE, run_in_chunks
from deepliif.logs import project_logger
from engine.errors import ArtifactError, BackendUnavailableError

from engine.backends.precision import Precision

from .base import Backend, BackendInfo

logger = project_logger("engine")

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
INSTALL_HINT = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA/TensorRT execution providers)"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc}); {INSTALL_HINT}") from exc
    return onnxruntime


def available_providers(device: str = "auto", precision: Precision = Precision.FP32) -> list[str]:
    """Providers in preference order; `device` 'cpu' keeps only the CPU EP, 'cuda' drops it.

    The TensorRT EP is left out for fp32: TensorRT enables TF32 by default and the EP documents no option to
    turn it off, which breaks the fp32 contract (one grey level); the CUDA EP runs fp32 with TF32 off and
    the `tensorrt` backend builds fp32 plans with TF32 cleared. The CUDA EP is left out for int8: it runs
    the graph's Q/DQ pairs as float operations, slower than fp32 and nothing like what the gate promised;
    int8 on a GPU needs the TensorRT EP (or the `tensorrt` backend).
    """
    offered = set(_onnxruntime().get_available_providers())
    providers = [p for p in PROVIDER_ORDER if p in offered]
    precision = Precision.parse(precision)
    if precision is Precision.FP32:
        providers = [p for p in providers if p != "TensorrtExecutionProvider"]
    if precision is Precision.INT8 and device != "cpu" and "CUDAExecutionProvider" in providers:
        if "TensorrtExecutionProvider" not in providers:
            raise BackendUnavailableError(
                "onnxruntime: int8 on the CUDA EP runs the Q/DQ graph as float operations, slower than fp32; "
                "int8 on a GPU needs ONNX Runtime's TensorRT EP or the tensorrt backend (or --device cpu)")
        providers = [p for p in providers if p != "CUDAExecutionProvider"]
    if device == "cpu":
        return [p for p in providers if p == "CPUExecutionProvider"]
    if device == "cuda":
        return [p for p in providers if p != "CPUExecutionProvider"]
    return providers


def provider_options(provider: str, precision: Precision, cache_dir: Path | None, device_id: int = 0,
                     batch_range: tuple[int, int, int] = (1, 8, 16)) -> dict:
    """Options for one execution provider (ONNX Runtime docs, TensorRT and CUDA Execution Provider pages).

    TensorRT EP: engines and timing caches persist under the artifact cache (else it rebuilds every engine
    at every start); the batch dimension gets an explicit profile (else a new engine per new batch size).
    `trt_fp16_enable` and `trt_int8_enable` stay off for every precision: ONNX Runtime builds a strongly
    typed TensorRT network only when no precision flag is set (microsoft/onnxruntime PR 18707: "obey the
    precision given in the ONNX file", the flags overriding it), and TensorRT's explicit-quantization guide
    says not to set precision flags with Q/DQ. The fp16 and int8 graphs carry their own types; with a flag
    on, TensorRT could run the deliberate fp32 parts (normalisation, the Seg average, the last scale before
    truncation) in fp16, and serve something other than the graph that passed the gate.
    CUDA EP: TF32 only for fp16 graphs; a heuristic convolution search, because the default exhaustive one
    runs again for every new batch shape (a tile loop's remainder batches); NHWC kernels for fp16.
    """
    precision = Precision.parse(precision)
    if provider == "TensorrtExecutionProvider":
        low, opt, high = batch_range
        shape = "x".join(str(d) for d in (NETWORK_TILE, NETWORK_TILE, 3))
        options = {"device_id": device_id, "trt_fp16_enable": False, "trt_int8_enable": False,
                   "trt_profile_min_shapes": f"{FUSED_GRAPH.input_name}:{low}x{shape}",
                   "trt_profile_opt_shapes": f"{FUSED_GRAPH.input_name}:{opt}x{shape}",
                   "trt_profile_max_shapes": f"{FUSED_GRAPH.input_name}:{high}x{shape}"}
        if cache_dir is not None:
            path = str(Path(cache_dir))
            options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": path,
                            "trt_timing_cache_enable": True, "trt_timing_cache_path": path})
        return options
    if provider == "CUDAExecutionProvider":
        # TF32 only where every convolution is already fp16: INT8 Q/DQ graphs keep fp32 edge convolutions,
        # and their gate measured them without TF32
        options = {"device_id": device_id, "use_tf32": 1 if precision is Precision.FP16 else 0,
                   "cudnn_conv_algo_search": "HEURISTIC"}
        if precision is Precision.FP16:
            options["prefer_nhwc"] = 1
        return options
    return {}


def _tf32_of(provider: str, precision: Precision) -> bool | None:
    """TF32 as the first provider runs it: the CUDA EP as `provider_options` sets it; TensorRT (EP) keeps
    its default, on (fp32 never goes there); the CPU has no TF32."""
    if provider == "CUDAExecutionProvider":
        return bool(provider_options(provider, precision, None)["use_tf32"])
    return True if provider == "TensorrtExecutionProvider" else None


def onnxruntime_version() -> str:
    return _onnxruntime().__version__


def save_optimized(source: Path, target: Path, threads: int | None = None) -> None:
    """Write the graph as the CPU provider optimises it (all levels, so its layouts suit this CPU);
    `OnnxRuntimeBackend(..., preoptimized=True)` then loads it without running the optimiser again.

    The weights go to `<target>.data` beside a small graph file: ONNX Runtime then reads them straight from
    that file instead of parsing a 1.5 GB protobuf, which cut session creation for the full-size model from
    3.7-6.1 s to 1.1 s on this project's 2-core CI machine (docs/BENCHMARKS.md section 2). The option names are
    ONNX Runtime's session config keys (onnxruntime_session_options_config_keys.h)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.log_severity_level = 3
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     external_weights_name(target))
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ArtifactError(f"onnxruntime cannot optimise {source}: {exc}") from exc
    if not Path(target).is_file():
        raise ArtifactError(f"onnxruntime wrote no optimised graph for {source}")


def external_weights_name(graph: Path) -> str:
    """The file beside an optimised graph that holds its weights (a name relative to the graph's folder)."""
    return f"{Path(graph).name}.data"


class OnnxRuntimeBackend(Backend):
    """An InferenceSession on the fused pipeline ONNX.

    On CPU, `threads` sets intra-op parallelism (default: every core this process may use) and tiles go
    through one at a time (`micro_batch` 1), which measured faster per tile than whole batches on CPU
    (docs/BENCHMARKS.md). On a GPU provider the whole batch goes at once, with IO binding so outputs stay
    on the device until the final copy. `cache_dir` holds the TensorRT EP's engines and timing caches.
    `preoptimized`: the file was written by `save_optimized` for this CPU; skip the optimiser.
    """

    def __init__(self, onnx_path: Path, device: str = "auto", precision: Precision = Precision.FP32,
                 threads: int | None = None, micro_batch: int | None = None, cache_dir: Path | None = None,
                 io_binding: bool | None = None, preoptimized: bool = False) -> None:
        ort = _onnxruntime()
        path = Path(onnx_path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such ONNX file")
        precision = Precision.parse(precision)
        providers = available_providers(device, precision)
        if not providers:
            raise BackendUnavailableError(f"onnxruntime has no execution provider for device {device!r} "
                                          f"(offered: {ort.get_available_providers()}); {INSTALL_HINT}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if preoptimized \
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3
        if cache_dir is not None and "TensorrtExecutionProvider" in providers:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        configured = [(p, provider_options(p, precision, cache_dir)) for p in providers]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=configured)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"onnxruntime cannot load {path}: {exc}") from exc
        self._check_signature(path)
        active = self.session.get_providers()
        if active[0] != providers[0]:
            logger.warning("onnxruntime could not start %s; running on %s", providers[0], active[0])
        self.on_gpu = active[0] != "CPUExecutionProvider"
        self.io_binding = self.on_gpu if io_binding is None else io_binding
        if micro_batch is not None and micro_batch < 1:
            raise ArgumentError(f"micro_batch must be at least 1; got {micro_batch}")
        self.micro_batch = micro_batch or (None if self.on_gpu else 1)
        device_name = "cuda" if self.on_gpu else "cpu"
        self.info = BackendInfo("onnxruntime", device_name, precision, None,
                                f"providers {','.join(active)}; {options.intra_op_num_threads} threads",
                                tf32=_tf32_of(active[0], precision),
                                engine_cache=str(cache_dir) if active[0] == "TensorrtExecutionProvider" and cache_dir
                                else None)
        logger.info("onnxruntime session on %s: %s", path.name, self.info.detail)

    def _check_signature(self, path: Path) -> None:
        def described(args) -> dict[str, tuple[str, list]]:  # ORT reports types as "tensor(uint8)"
            return {a.name: (a.type.removeprefix("tensor(").removesuffix(")"), list(a.shape)) for a in args}
        problems = FUSED_GRAPH.signature_problems(described(self.session.get_inputs()),
                                                  described(self.session.get_outputs()))
        if problems:
            raise ArtifactError(f"{path} is not a DeepLIIF fused-pipeline ONNX: {'; '.join(problems)}")

    def run_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return run_in_chunks(self._run, batch, self.micro_batch)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch)
        names = list(FUSED_GRAPH.onnx_output_names)
        if self.io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input(FUSED_GRAPH.input_name, batch)
            for name in names:
                binding.bind_output(name, "cuda" if self.on_gpu else "cpu")
            self.session.run_with_iobinding(binding)
            arrays = binding.copy_outputs_to_cpu()  # in the order the outputs were bound: `names`
        else:
            arrays = self.session.run(names, {FUSED_GRAPH.input_name: batch})
        return FUSED_GRAPH.by_output_name(dict(zip(names, arrays)))

    def close(self) -> None:
        self.session = None
