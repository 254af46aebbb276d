"""The model of a Triton Python-backend repository: this project's `Session`, answering batches.

Triton owns transport and dynamic batching; this model only runs what one `execute` call hands it. The
requests of a call are concatenated into one tile batch (each may itself carry several tiles), run once
through the session, and split back in order. A request whose input is malformed is answered with its
own error; the others in the same call are still served.

`PythonModelSettings` (`export.triton`, which writes them) are read from the model config's `parameters`,
once, at `initialize`. The `TritonPythonModel` class is what Triton's stub looks for in
`model.py`; `triton_python_backend_utils` exists only inside that stub, so it is imported there, lazily.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from deepliif.contract import FUSED_GRAPH, check_tile_batch
from deepliif.errors import ArgumentError, DeepLIIFError
from deepliif.logs import project_logger

from export.triton import PythonModelSettings

from .cache import default_cache_dir
from .session import Session
from .settings import process_environment, writable_process_environment

logger = project_logger("engine.triton")



def instance_gpu(device_id: int, visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES of a GPU instance's own stub process: only the GPU Triton placed it on.
    Each Python-backend instance is a process of its own, and every backend of the session runs on the
    first visible GPU, so narrowing the visible set is what puts instance N on GPU N."""
    if visible is None:
        return str(device_id)
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if not 0 <= device_id < len(devices):
        raise ArgumentError(f"Triton placed this instance on GPU {device_id}, but CUDA_VISIBLE_DEVICES={visible!r}")
    return devices[device_id]


class TileBatchServer:
    """One open session; `serve` answers a list of requests' input batches, in order."""

    def __init__(self, settings: PythonModelSettings, device: str) -> None:
        self.session = Session(settings.model_dir, backend=settings.backend, precision=settings.precision,
                               device=device, cache_dir=settings.cache_dir, onnx=settings.onnx)

    def serve(self, inputs: list[np.ndarray]) -> list[dict[str, np.ndarray] | DeepLIIFError]:
        answers: list[dict[str, np.ndarray] | DeepLIIFError] = []
        good: list[int] = []
        for index, batch in enumerate(inputs):
            try:
                check_tile_batch(batch)
            except DeepLIIFError as exc:
                answers.append(exc)
                continue
            answers.append({})
            good.append(index)
        if good:
            outputs = self.session.run(np.concatenate([inputs[i] for i in good]))
            start = 0
            for index in good:
                stop = start + len(inputs[index])
                answers[index] = {name: outputs[name][start:stop] for name in FUSED_GRAPH.output_names}
                start = stop
        return answers

    def close(self) -> None:
        self.session.close()


class TritonPythonModel:
    """Triton's Python-backend entry points around a `TileBatchServer`."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        settings = PythonModelSettings.from_model_config(config, version_dir)
        environment = process_environment()  # Triton's entry point: the stub's environment
        if settings.cache_dir is None:  # it names the cache
            settings = dataclasses.replace(settings, cache_dir=default_cache_dir(environment))
        device = "cpu"
        if args.get("model_instance_kind", "CPU").upper() == "GPU":
            gpu = instance_gpu(int(args.get("model_instance_device_id", 0)), environment.get("CUDA_VISIBLE_DEVICES"))
            writable_process_environment()["CUDA_VISIBLE_DEVICES"] = gpu  # before this process initialises CUDA
            device = "cuda"
        self.server = TileBatchServer(settings, device)
        logger.info("Triton model %s ready: %s on %s", config.get("name"), self.server.session.info.name, device)

    def execute(self, requests: list) -> list:
        """Tensors cross the stub by DLPack, never by `as_numpy()` or `Tensor(name, ndarray)`: the stub of
        Triton 24.10 (nvidia-pytriton 0.7.0) reads NumPy arrays through a pybind11 older than NumPy 2's dtype
        layout, so under NumPy 2 those read wrong bytes in and send empty outputs ("output tensor shape does
        not match size of output"). Outputs go as torch views of the arrays (no copy), whose capsules the
        stub releases cleanly; NumPy's own capsules make it log a traceback per tensor."""
        import torch
        import triton_python_backend_utils as pb_utils  # exists only inside Triton's Python-backend stub

        inputs = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, FUSED_GRAPH.input_name)) for r in requests]
        responses = []
        for answer in self.server.serve(inputs):
            if isinstance(answer, DeepLIIFError):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(answer))))
                continue
            tensors = [pb_utils.Tensor.from_dlpack(onnx_name, torch.from_numpy(np.ascontiguousarray(answer[name])))
                       for name, onnx_name in zip(FUSED_GRAPH.output_names, FUSED_GRAPH.onnx_output_names)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.server.close()
