"""ONNX Runtime: outputs paired by name whatever the graph's output order, and the provider options."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from engine.errors import BackendUnavailableError
from engine.backends import onnxruntime_backend
from engine.backends.onnxruntime_backend import OnnxRuntimeBackend, available_providers, provider_options
from engine.samples import synthetic_ihc
from engine.backends.precision import Precision
from export.config import OnnxExportConfig
from export.onnx_export import export_pipeline

# The option names ONNX Runtime documents for each provider (onnxruntime.ai, "TensorRT Execution
# Provider" and "CUDA Execution Provider" pages); an unknown key makes session creation fail on a GPU.
DOCUMENTED = {
    "TensorrtExecutionProvider": {
        "device_id", "trt_max_workspace_size", "trt_fp16_enable", "trt_int8_enable", "trt_engine_cache_enable",
        "trt_engine_cache_path", "trt_timing_cache_enable", "trt_timing_cache_path", "trt_profile_min_shapes",
        "trt_profile_opt_shapes", "trt_profile_max_shapes", "trt_dla_enable", "trt_builder_optimization_level"},
    "CUDAExecutionProvider": {"device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
                              "do_copy_in_default_stream", "use_tf32", "enable_cuda_graph", "prefer_nhwc"},
}


@pytest.fixture(scope="module")
def reordered_onnx(generated_models, tmp_path_factory) -> tuple[Path, dict]:
    """The fused graph with its outputs listed in reverse: a user's --onnx need not follow our order."""
    model = load_model_dir(generated_models[Layout.CHECKPOINT])
    path = tmp_path_factory.mktemp("reordered") / "deepliif.onnx"
    export_pipeline(model, path, OnnxExportConfig())
    proto = onnx.load(str(path))
    outputs = list(proto.graph.output)[::-1]
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)
    onnx.save(proto, str(path))
    tiles = np.stack([synthetic_ihc(seed=s) for s in (4, 5)])
    return path, TileRunner(FusedPipeline(model)).run(tiles) | {"tiles": tiles}


@pytest.mark.parametrize("io_binding", [False, True])
def test_outputs_are_paired_with_their_names(reordered_onnx, io_binding: bool) -> None:
    """Regression: with IO binding, outputs were paired with session.get_outputs() order, so a graph
    whose outputs are listed in another order returned Seg under the name Hema."""
    path, expected = reordered_onnx
    with OnnxRuntimeBackend(path, device="cpu", io_binding=io_binding) as backend:
        actual = backend.run(expected["tiles"])
    for name in OUTPUT_NAMES:
        assert np.abs(actual[name].astype(int) - expected[name].astype(int)).max() <= 1, name


def test_tensorrt_ep_options(tmp_path: Path) -> None:
    fp16 = provider_options("TensorrtExecutionProvider", Precision.FP16, tmp_path, batch_range=(1, 4, 16))
    assert set(fp16) <= DOCUMENTED["TensorrtExecutionProvider"]
    # no precision flag at any precision: the EP then builds a strongly typed network from the graph's types
    assert fp16["trt_fp16_enable"] is False and fp16["trt_int8_enable"] is False
    assert fp16["trt_engine_cache_enable"] and fp16["trt_engine_cache_path"] == str(tmp_path)
    assert fp16["trt_timing_cache_enable"] and fp16["trt_timing_cache_path"] == str(tmp_path)
    assert fp16["trt_profile_min_shapes"] == "ihc:1x512x512x3"
    assert fp16["trt_profile_opt_shapes"] == "ihc:4x512x512x3"
    assert fp16["trt_profile_max_shapes"] == "ihc:16x512x512x3"
    int8 = provider_options("TensorrtExecutionProvider", Precision.INT8, tmp_path)
    assert int8["trt_fp16_enable"] is False and int8["trt_int8_enable"] is False


def test_cuda_ep_keeps_fp32_off_tf32() -> None:
    fp32 = provider_options("CUDAExecutionProvider", Precision.FP32, None)
    assert set(fp32) <= DOCUMENTED["CUDAExecutionProvider"] and fp32["use_tf32"] == 0
    assert provider_options("CUDAExecutionProvider", Precision.FP16, None)["use_tf32"] == 1
    assert provider_options("CUDAExecutionProvider", Precision.INT8, None)["use_tf32"] == 0  # fp32 edge convs
    assert provider_options("CPUExecutionProvider", Precision.FP32, None) == {}


@pytest.mark.parametrize("precision", list(Precision))
def test_cuda_ep_searches_convolutions_once_per_shape_class(precision: Precision) -> None:
    """The default exhaustive cuDNN search runs again for every new batch shape (remainder batches)."""
    options = provider_options("CUDAExecutionProvider", precision, None)
    assert set(options) <= DOCUMENTED["CUDAExecutionProvider"]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options.get("prefer_nhwc", 0) == (1 if precision is Precision.FP16 else 0)


def test_int8_never_runs_on_the_cuda_ep(monkeypatch) -> None:
    """The CUDA EP runs Q/DQ as float ops (slower than fp32): int8 goes to the TensorRT EP or is refused."""
    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime_backend, "_onnxruntime",
                        lambda: type("FakeOrt", (), {"get_available_providers": staticmethod(lambda: offered)}))
    assert available_providers("cuda", Precision.INT8) == ["TensorrtExecutionProvider"]
    assert available_providers("auto", Precision.INT8) == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    offered.remove("TensorrtExecutionProvider")
    with pytest.raises(BackendUnavailableError, match="int8 on the CUDA EP runs the Q/DQ graph as float"):
        available_providers("auto", Precision.INT8)
    assert available_providers("cpu", Precision.INT8) == ["CPUExecutionProvider"]


def test_fp32_never_goes_to_the_tensorrt_ep(monkeypatch) -> None:
    """TensorRT turns TF32 on by default and the EP has no switch for it: fp32 runs on the CUDA EP."""
    class FakeOrt:
        @staticmethod
        def get_available_providers():
            return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(onnxruntime_backend, "_onnxruntime", lambda: FakeOrt)
    assert available_providers("cuda", Precision.FP32) == ["CUDAExecutionProvider"]
    assert available_providers("cuda", Precision.FP16) == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert available_providers("cpu", Precision.FP16) == ["CPUExecutionProvider"]


def test_the_tf32_state_each_provider_runs_with() -> None:
    """What `doctor` reports per backend: the CUDA EP as configured, TensorRT's default (on), none on CPU."""
    tf32_of = onnxruntime_backend._tf32_of
    assert tf32_of("CUDAExecutionProvider", Precision.FP32) is False
    assert tf32_of("CUDAExecutionProvider", Precision.INT8) is False
    assert tf32_of("CUDAExecutionProvider", Precision.FP16) is True
    assert tf32_of("TensorrtExecutionProvider", Precision.FP16) is True
    assert tf32_of("CPUExecutionProvider", Precision.FP32) is None
