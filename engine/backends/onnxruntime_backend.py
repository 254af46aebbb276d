"""ONNX Runtime on the fused ONNX: TensorRT EP, then CUDA EP, then CPU EP, whichever the package offers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deepliif.errors import ArgumentError, ArtifactError, BackendUnavailableError
from deepliif.pipeline import OUTPUT_NAMES, run_in_chunks

from export.config import INPUT_NAME, OUTPUT_ONNX_NAMES, Precision

from .. import logger
from .base import Backend, BackendInfo

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
INSTALL_HINT = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA/TensorRT execution providers)"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc}); {INSTALL_HINT}") from exc
    return onnxruntime


def available_providers(device: str = "auto") -> list[str]:
    """Providers in preference order; `device` 'cpu' keeps only the CPU EP, 'cuda' drops it."""
    offered = set(_onnxruntime().get_available_providers())
    providers = [p for p in PROVIDER_ORDER if p in offered]
    if device == "cpu":
        return [p for p in providers if p == "CPUExecutionProvider"]
    if device == "cuda":
        return [p for p in providers if p != "CPUExecutionProvider"]
    return providers


class OnnxRuntimeBackend(Backend):
    """An InferenceSession on the fused pipeline ONNX.

    On CPU, `threads` sets intra-op parallelism (default: every core this process may use) and tiles go
    through one at a time (`micro_batch` 1), which measured faster per tile than whole batches on CPU
    (docs/BENCHMARKS.md). On a GPU provider the whole batch goes at once, with IO binding so outputs stay
    on the device until the final copy.
    """

    def __init__(self, onnx_path: Path, device: str = "auto", precision: Precision = Precision.FP32,
                 threads: int | None = None, micro_batch: int | None = None) -> None:
        ort = _onnxruntime()
        path = Path(onnx_path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such ONNX file")
        providers = available_providers(device)
        if not providers:
            raise BackendUnavailableError(f"onnxruntime has no execution provider for device {device!r} "
                                          f"(offered: {ort.get_available_providers()}); {INSTALL_HINT}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"onnxruntime cannot load {path}: {exc}") from exc
        self._check_signature(path)
        active = self.session.get_providers()
        self.on_gpu = active[0] != "CPUExecutionProvider"
        if micro_batch is not None and micro_batch < 1:
            raise ArgumentError(f"micro_batch must be at least 1; got {micro_batch}")
        self.micro_batch = micro_batch or (None if self.on_gpu else 1)
        device_name = "cuda" if self.on_gpu else "cpu"
        self.info = BackendInfo("onnxruntime", device_name, precision, None,
                                f"providers {','.join(active)}; {options.intra_op_num_threads} threads")
        logger.info("onnxruntime session on %s: %s", path.name, self.info.detail)

    def _check_signature(self, path: Path) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or sorted(outputs) != sorted(OUTPUT_ONNX_NAMES):
            raise ArtifactError(f"{path} is not a DeepLIIF fused-pipeline ONNX: inputs {inputs}, "
                                f"outputs {outputs}")

    def run_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return run_in_chunks(self._run, batch, self.micro_batch)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch)
        if self.on_gpu:
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, batch)
            for name in OUTPUT_ONNX_NAMES:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            arrays = binding.copy_outputs_to_cpu()
            names = [o.name for o in self.session.get_outputs()]
        else:
            names = list(OUTPUT_ONNX_NAMES)
            arrays = self.session.run(names, {INPUT_NAME: batch})
        by_name = dict(zip(names, arrays))
        return {name: by_name[name.lower()] for name in OUTPUT_NAMES}

    def close(self) -> None:
        self.session = None
