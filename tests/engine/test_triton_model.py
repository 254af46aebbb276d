"""The Python-backend model without a server: requests in order, a bad request answered alone, GPU
placement, and a `triton_python_backend_utils` double that enforces the DLPack-only rule (the real stub
under NumPy 2 reads `as_numpy()` and `Tensor(name, ndarray)` wrong; tests/export/test_triton_server.py
runs the real one)."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from deepliif.contract import FUSED_GRAPH
from deepliif.errors import ArgumentError
from deepliif.model_dir import Layout
from engine.triton_model import TileBatchServer, TritonPythonModel, instance_gpu
from export.triton import TritonConfig, write_python_repository


def test_a_gpu_instance_sees_only_its_own_gpu() -> None:
    assert instance_gpu(1, None) == "1"
    assert instance_gpu(1, "4, 6") == "6"  # Triton's index counts the GPUs this server was given
    with pytest.raises(ArgumentError, match="GPU 2"):
        instance_gpu(2, "4,6")


@pytest.fixture(scope="module")
def repository(generated_models: dict[Layout, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("python-repo")
    return write_python_repository(root / "repo", TritonConfig(instance_kind="cpu"), generated_models[Layout.CHECKPOINT],
                                   backend="onnxruntime", cache_dir=root / "cache")


class _InputTensor:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def as_numpy(self):
        raise AssertionError("as_numpy() reads wrong bytes in the real stub under NumPy 2")


class _OutputTensor:
    def __init__(self, name: str, array) -> None:
        raise AssertionError("Tensor(name, ndarray) sends empty outputs in the real stub under NumPy 2")

    @classmethod
    def from_dlpack(cls, name: str, source) -> _OutputTensor:
        tensor = object.__new__(cls)
        tensor.name, tensor.array = name, np.from_dlpack(source).copy()
        return tensor


class _Response:
    def __init__(self, output_tensors, error=None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _OutputTensor
    module.InferenceResponse = _Response
    module.TritonError = lambda message: message
    module.get_input_tensor_by_name = lambda request, name: request[name]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _initialised(repository: Path) -> TritonPythonModel:
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(_model_config(repository)), "model_repository": str(repository),
                      "model_version": "1", "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    return model


def _model_config(repository: Path) -> dict:
    """The parameters as Triton hands them to the model (a JSON map), read from the written config."""
    from export.triton import parse_pbtxt
    parsed = parse_pbtxt((repository / "config.pbtxt").read_text())
    return {"name": parsed["name"], "parameters": {p["key"]: p["value"] for p in parsed["parameters"]}}


def test_execute_answers_each_request_with_its_own_tiles(repository: Path, pb_utils) -> None:
    model = _initialised(repository)
    try:
        rng = np.random.default_rng(5)
        batches = [rng.integers(0, 256, (n, 512, 512, 3), dtype=np.uint8) for n in (2, 1)]
        responses = model.execute([{FUSED_GRAPH.input_name: _InputTensor(b)} for b in batches])
        expected = model.server.session.run(np.concatenate(batches))
        assert [r.error for r in responses] == [None, None]
        for onnx_name, name in zip(FUSED_GRAPH.onnx_output_names, FUSED_GRAPH.output_names):
            np.testing.assert_array_equal(np.concatenate([r.outputs[onnx_name] for r in responses]), expected[name])
    finally:
        model.finalize()


def test_a_malformed_request_is_answered_alone(repository: Path) -> None:
    model = _initialised(repository)
    server: TileBatchServer = model.server
    try:
        good = np.zeros((1, 512, 512, 3), np.uint8)
        answers = server.serve([np.zeros((1, 256, 256, 3), np.uint8), good, good.astype(np.float32)])
        assert isinstance(answers[0], ArgumentError) and isinstance(answers[2], ArgumentError)
        assert "got shape (1, 256, 256, 3)" in str(answers[0])
        np.testing.assert_array_equal(answers[1]["Seg"], server.session.run(good)["Seg"])
    finally:
        model.finalize()
