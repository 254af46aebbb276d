"""The GPU path driven through the `tensorrt` test double: build -> publish -> load -> run -> fallback.

What the double enforces is documented in tests/tensorrt_double.py; only CUDA memory and streams are
replaced (host buffers the double knows as device memory, see `DeviceStream` in tests/conftest.py). Results are compared with the PyTorch reference.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from deepliif.errors import ArgumentError
from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from engine.errors import ArtifactError, IncompatibleArtifactError
from engine.backends.tensorrt_backend import TensorRTBackend, check_engine_io
from engine.samples import synthetic_ihc
from engine.session import Session
from export.config import OnnxExportConfig
from export.onnx_export import export_pipeline
from export.tensorrt_build import (METADATA_FILE, PLAN_FILE, EngineMetadata, GpuInfo, TensorRTBuildConfig,
                                   build_plan, timing_cache_path)

TILES = np.stack([synthetic_ihc(seed=s) for s in range(3)])


@pytest.fixture(scope="module")
def model_dir(generated_models) -> Path:
    return generated_models[Layout.CHECKPOINT]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, np.ndarray]:
    return TileRunner(FusedPipeline(load_model_dir(model_dir))).run(TILES)


@pytest.fixture(scope="module")
def onnx_path(model_dir: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trt-onnx") / "deepliif.onnx"
    export_pipeline(load_model_dir(model_dir), path, OnnxExportConfig())
    return path


def _close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(OUTPUT_NAMES)
    for name in OUTPUT_NAMES:
        diff = np.abs(actual[name].astype(int) - expected[name].astype(int))
        assert diff.max() <= 1, f"{name} differs by {diff.max()}"


def test_session_builds_publishes_loads_and_runs_a_plan(fake_tensorrt, model_dir, reference, tmp_path) -> None:
    with Session(model_dir, backend="tensorrt", cache_dir=tmp_path, batch_size=2) as session:
        assert session.info.name == "tensorrt" and session.info.max_batch == 16
        _close(session.run(TILES), reference)
    plans = list(tmp_path.glob(f"*/{PLAN_FILE}"))
    assert len(plans) == 1
    assert session.info.tf32 is False and session.info.engine_cache == str(plans[0].parent)  # what doctor shows
    metadata = EngineMetadata.read(plans[0].with_name(METADATA_FILE))
    assert metadata.precision == "fp32" and metadata.tf32 is False
    build_flags = [call[1] for call in fake_tensorrt.CALLS if call[0] == "build"]
    assert build_flags and fake_tensorrt.BuilderFlag.TF32 not in build_flags[0]  # fp32 plans: TF32 cleared
    gpu = GpuInfo.current()
    assert timing_cache_path(tmp_path, fake_tensorrt.__version__, gpu).name == "timing-sm90-trt11.4.0.106.cache"
    assert timing_cache_path(tmp_path, fake_tensorrt.__version__, gpu).is_file()
    fake_tensorrt.CALLS.clear()
    with Session(model_dir, backend="tensorrt", cache_dir=tmp_path, batch_size=2) as again:  # warm cache
        _close(again.run(TILES[:1]), {k: v[:1] for k, v in reference.items()})
    assert not [c for c in fake_tensorrt.CALLS if c[0] == "build"]


def test_a_plan_is_checked_against_onnx_runtime_before_it_is_published(fake_tensorrt, model_dir, tmp_path,
                                                                         monkeypatch) -> None:
    """A plan whose kernels compute something else (the double adds 2 grey levels to every output) is
    refused in the cache build: nothing is published, and `auto` serves the next backend instead."""
    from engine.artifacts import PLAN_CHECK_FILE
    with Session(model_dir, backend="tensorrt", cache_dir=tmp_path / "good", batch_size=2):
        pass
    check = json.loads(next((tmp_path / "good").glob(f"*/{PLAN_CHECK_FILE}")).read_text())
    assert check["passed"] and check["reference"] == "onnxruntime cpu" and max(check["max_abs"].values()) <= 1
    fake_tensorrt.STATE["perturb"] = 2
    with pytest.raises(ArtifactError, match="misses its fp32 contract against ONNX Runtime on the CPU"):
        Session(model_dir, backend="tensorrt", cache_dir=tmp_path / "bad", batch_size=2)
    assert not list((tmp_path / "bad").glob(f"*/{PLAN_FILE}"))  # never published
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with Session(model_dir, backend="auto", cache_dir=tmp_path / "bad", batch_size=2) as session:
        assert session.info.name == "onnxruntime" and "misses its fp32 contract" in session.skipped[0]


@pytest.mark.parametrize("failure", ["build_fails", "execute_fails"])
def test_auto_falls_back_on_any_backend_failure(fake_tensorrt, model_dir, reference, tmp_path, failure,
                                                monkeypatch, caplog) -> None:
    """Regression: auto used to fall back only on 'unavailable'; a failed plan build stopped the kernel."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU order: tensorrt first
    fake_tensorrt.STATE[failure] = True
    with caplog.at_level(logging.WARNING, logger="deepliif_engine.engine"), \
            Session(model_dir, backend="auto", cache_dir=tmp_path, batch_size=2) as session:
        assert session.info.name == "onnxruntime"
        _close(session.run(TILES), reference)
    assert len(session.skipped) == 1 and session.skipped[0].startswith("tensorrt: ")
    expected = "build failed" if failure == "build_fails" else "execution failed"
    assert expected in session.skipped[0]
    assert any("tensorrt cannot serve here" in r.getMessage() for r in caplog.records)


def test_after_a_cuda_device_fault_auto_falls_back_to_the_cpu_not_to_another_cuda_backend(
        fake_tensorrt, model_dir, reference, tmp_path, monkeypatch, caplog) -> None:
    """A device-side fault is sticky for the process: every later CUDA call fails the same way."""
    from engine.devices import is_sticky_cuda_fault
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_tensorrt.STATE["device_fault"] = True
    with caplog.at_level(logging.WARNING, logger="deepliif_engine.engine"), \
            Session(model_dir, backend="auto", cache_dir=tmp_path, batch_size=2) as session:
        assert (session.info.name, session.info.device, session.device) == ("onnxruntime", "cpu", "cpu")
        _close(session.run(TILES), reference)
    assert session.skipped[0].startswith("tensorrt: ") and "illegal memory access" in session.skipped[0]
    assert "device fault stays for the life of the process" in session.skipped[1]
    assert any("falling back to the CPU" in r.getMessage() for r in caplog.records)
    assert is_sticky_cuda_fault(RuntimeError("wrapped")) is False
    try:
        raise RuntimeError("probe failed") from RuntimeError("CUDA error: unspecified launch failure")
    except RuntimeError as chained:
        assert is_sticky_cuda_fault(chained)


def test_auto_falls_back_when_a_plan_does_not_deserialise(fake_tensorrt, model_dir, tmp_path, monkeypatch) -> None:
    """A plan that TensorRT refuses (here: built on another device, hidden from the sidecar check) is
    rebuilt once; when that fails too, auto moves on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_runtime = fake_tensorrt.Runtime

    class RefusingRuntime(real_runtime):
        def deserialize_cuda_engine(self, data):
            return None

    monkeypatch.setattr(fake_tensorrt, "Runtime", RefusingRuntime)
    with Session(model_dir, backend="auto", cache_dir=tmp_path, batch_size=2) as session:
        assert session.info.name == "onnxruntime"
    assert "could not deserialise" in session.skipped[0]


def test_version_compatible_plans_allow_host_code(fake_tensorrt, onnx_path, tmp_path) -> None:
    config = TensorRTBuildConfig(1, 2, 4, workspace_gib=1, version_compatible=True)
    build_plan(onnx_path, tmp_path, config)
    runtime = fake_tensorrt.Runtime(fake_tensorrt.Logger())
    fake_tensorrt.DEVICE["current"] = True  # only host code is missing
    assert runtime.deserialize_cuda_engine((tmp_path / PLAN_FILE).read_bytes()) is None  # the double enforces it
    fake_tensorrt.DEVICE["current"] = False
    with TensorRTBackend(tmp_path / PLAN_FILE) as backend:
        assert backend.runtime.engine_host_code_allowed is True
        assert backend.info.max_batch == 4


def test_shapes_outside_the_profile_and_foreign_plans_are_refused(fake_tensorrt, onnx_path, tmp_path) -> None:
    build_plan(onnx_path, tmp_path, TensorRTBuildConfig(1, 2, 2, workspace_gib=1))
    with TensorRTBackend(tmp_path / PLAN_FILE) as backend:
        with pytest.raises(ArgumentError, match="outside the plan's profile"):
            backend.run_impl(TILES)  # 3 tiles past a max of 2: set_input_shape returns False
    fake_tensorrt.DEVICE["compute_capability"] = "8.0"
    with pytest.raises(IncompatibleArtifactError, match="compute capability 9.0"):
        TensorRTBackend(tmp_path / PLAN_FILE)


def test_timing_cache_from_another_device_is_replaced(fake_tensorrt, onnx_path, tmp_path, caplog) -> None:
    cache = tmp_path / "timing.cache"
    fake_tensorrt.DEVICE["compute_capability"] = "8.0"
    build_plan(onnx_path, tmp_path / "a100", TensorRTBuildConfig(1, 1, 2, workspace_gib=1, timing_cache=cache))
    assert json.loads(cache.read_bytes())["compute_capability"] == "8.0"
    fake_tensorrt.DEVICE["compute_capability"] = "9.0"
    with caplog.at_level(logging.WARNING, logger="deepliif_engine.export"):
        build_plan(onnx_path, tmp_path / "h100", TensorRTBuildConfig(1, 1, 2, workspace_gib=1, timing_cache=cache))
    assert any("another device" in r.getMessage() for r in caplog.records)
    refused, accepted = [c for c in fake_tensorrt.CALLS if c[0] == "set_timing_cache"][-2:]
    assert refused[1]["compute_capability"] == "8.0" and accepted[1]["compute_capability"] == "9.0"
    assert json.loads(cache.read_bytes())["compute_capability"] == "9.0"


def test_missing_timing_cache_is_not_fatal(fake_tensorrt, onnx_path, tmp_path) -> None:
    fake_tensorrt.STATE["timing_cache_none"] = True
    cache = tmp_path / "timing.cache"
    build_plan(onnx_path, tmp_path, TensorRTBuildConfig(1, 1, 2, workspace_gib=1, timing_cache=cache))
    assert (tmp_path / PLAN_FILE).is_file() and not cache.exists()


class _Engine:
    def __init__(self, tensors: dict) -> None:
        self.tensors = tensors
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str):
        return self.tensors[name][1]


def test_engine_io_is_checked_against_the_contract(fake_tensorrt) -> None:
    trt = fake_tensorrt
    good = {"ihc": (trt.TensorIOMode.INPUT, trt.DataType.UINT8),
            **{n: (trt.TensorIOMode.OUTPUT, trt.DataType.UINT8) for n in ("hema", "dapi", "lap2", "marker", "seg")}}
    check_engine_io(trt, _Engine(good), Path("p.plan"))
    renamed = {("segmentation" if k == "seg" else k): v for k, v in good.items()}
    with pytest.raises(ArtifactError, match="tensors are"):
        check_engine_io(trt, _Engine(renamed), Path("p.plan"))
    floats = {**good, "hema": (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT)}
    with pytest.raises(ArtifactError, match="hema is FLOAT, expected uint8"):
        check_engine_io(trt, _Engine(floats), Path("p.plan"))


def test_the_double_parser_refuses_uint8_inside_the_graph(fake_tensorrt, tmp_path) -> None:
    """The double rejects what TensorRT rejects, independently of export/parser_rules, so a graph with
    the old (transpose-before-cast) boundary cannot get through the contract tests either."""
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Transpose", ["ihc"], ["t"], name="/Transpose", perm=[0, 3, 1, 2]),
             helper.make_node("Cast", ["t"], ["seg"], name="/Cast", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ihc", TensorProto.UINT8, ["b", 2, 2, 3])],
                              [helper.make_tensor_value_info("seg", TensorProto.FLOAT, ["b", 3, 2, 2])])
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    trt = fake_tensorrt
    parser = trt.OnnxParser(trt.Builder(trt.Logger()).create_network(), trt.Logger())
    assert not parser.parse_from_file(str(path))
    assert "UINT8 types for intermediate tensors" in str(parser.get_error(0)) and "/Transpose" in str(parser.get_error(0))


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("int8", False), ("fp16", True)])
def test_tf32_stays_on_only_where_the_gate_measured_nothing_it_could_change(fake_tensorrt, precision: str,
                                                                            tf32: bool) -> None:
    """INT8 plans keep edge convolutions in fp32, and their gate ran without TF32: TF32 must be cleared."""
    from engine.backends.precision import Precision
    from export.tensorrt_build import _builder_config
    builder = fake_tensorrt.Builder(fake_tensorrt.Logger())
    config = _builder_config(fake_tensorrt, builder, TensorRTBuildConfig(1, 2, 4, workspace_gib=1),
                             Precision.parse(precision))
    assert (fake_tensorrt.BuilderFlag.TF32 in config.flags) is tf32


def test_device_buffers_are_allocated_and_bound_once_and_results_do_not_alias_them(
        fake_tensorrt, onnx_path, reference, tmp_path) -> None:
    """Polygraphy's TrtRunner shape: buffers for the largest batch so far, bound once; smaller batches use
    their first rows. Results are copies: the next batch must not overwrite what stitching still holds."""
    build_plan(onnx_path, tmp_path, TensorRTBuildConfig(1, 2, 4, workspace_gib=1))
    with TensorRTBackend(tmp_path / PLAN_FILE) as backend:
        fake_tensorrt.CALLS.clear()
        first = backend.run(TILES[:2])
        kept = {name: array.copy() for name, array in first.items()}
        for size in (1, 2, 2):
            _close(backend.run(TILES[:size]), {k: v[:size] for k, v in reference.items()})
        binds = [c for c in fake_tensorrt.CALLS if c[0] == "set_tensor_address"]
        assert len(binds) == 6  # the input and five outputs, once
        backend.run(TILES[:3])  # a larger batch: new buffers, bound again
        assert len([c for c in fake_tensorrt.CALLS if c[0] == "set_tensor_address"]) == 12
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(first[name], kept[name], err_msg=name)


def test_the_engine_and_its_context_are_made_on_the_backends_own_device(fake_tensorrt, onnx_path, tmp_path,
                                                                        monkeypatch) -> None:
    """TensorRT deserialises and creates contexts on the current device: without the backend's device
    scope, an index other than 0 would put the engine on GPU 0 (the double refuses both then)."""
    from engine.backends import tensorrt_backend
    host_stream = type(tensorrt_backend.open_stream(0))  # the fixture's stand-in for CUDA
    build_plan(onnx_path, tmp_path, TensorRTBuildConfig(1, 2, 4, workspace_gib=1))
    with TensorRTBackend(tmp_path / PLAN_FILE) as backend:
        assert backend.context is not None and fake_tensorrt.DEVICE["current"] is False  # scope left after
    monkeypatch.setattr(host_stream, "device_scope", lambda self: contextlib.nullcontext())
    with pytest.raises(ArtifactError, match="could not deserialise"):
        TensorRTBackend(tmp_path / PLAN_FILE)


# Mutations of the GPU code and the contract test each one fails (the double's rules, not a GPU, catch them):
# - dropping the stream synchronisation -> every test running the backend (fake_tensorrt's teardown: PENDING)
# - binding host or unallocated memory, or 0 -> test_buffers_must_be_device_allocations
# - executing on the default stream -> test_the_default_stream_is_refused
# - turning a precision flag on, or building weakly typed -> test_precision_comes_from_the_graph_alone
# - returning padded tiles -> test_session_builds_publishes_loads_and_runs_a_plan (shapes), _close
# - leaving TF32 on for fp32 -> test_tf32_stays_on_only_where_the_gate_measured_nothing_it_could_change
# - disabling the TensorRT EP's engine cache -> tests/engine/backends: test_tensorrt_ep_options
# - skipping the engine I/O dtype check -> test_engine_io_is_checked_against_the_contract
# - removing host-code permission for version-compatible plans -> test_version_compatible_plans_allow_host_code
# - a plan computing something else -> test_a_plan_is_checked_against_onnx_runtime_before_it_is_published


def test_buffers_must_be_device_allocations(fake_tensorrt, onnx_path, tmp_path, monkeypatch) -> None:
    from engine.backends import tensorrt_backend
    build_plan(onnx_path, tmp_path, TensorRTBuildConfig(1, 2, 4, workspace_gib=1))
    host = tensorrt_backend._Buffers(4, torch.empty((4, 512, 512, 3), dtype=torch.uint8),
                                     {n: torch.empty((4, 512, 512, 3), dtype=torch.uint8) for n in OUTPUT_NAMES},
                                     {n: torch.empty((4, 512, 512, 3), dtype=torch.uint8) for n in OUTPUT_NAMES})
    monkeypatch.setattr(tensorrt_backend._Buffers, "allocate", classmethod(lambda cls, capacity, stream: host))
    with TensorRTBackend(tmp_path / PLAN_FILE) as backend, pytest.raises(ArtifactError, match="refused the address"):
        backend.run(TILES[:1])


def test_the_default_stream_is_refused(fake_tensorrt, onnx_path, tmp_path) -> None:
    build_plan(onnx_path, tmp_path, TensorRTBuildConfig(1, 2, 4, workspace_gib=1))
    with TensorRTBackend(tmp_path / PLAN_FILE) as backend:
        backend.run(TILES[:1])  # binds device buffers and sets the shape
        assert not backend.context.execute_async_v3(0)
        assert not backend.context.set_tensor_address("ihc", 0)
        assert not backend.context.set_input_shape("ihc", (1, 512, 512))  # a rank the profile does not have
        assert backend.context.execute_async_v3(backend.stream.handle)
        backend.stream.synchronize()


def test_precision_comes_from_the_graph_alone(fake_tensorrt, onnx_path, tmp_path, monkeypatch) -> None:
    """TensorRT's explicit-quantization and strong-typing rules: no precision flag, a strongly typed network."""
    from engine.errors import ExportError
    from export import tensorrt_build
    real = tensorrt_build._builder_config

    def with_fp16(trt, builder, config, precision):
        builder_config = real(trt, builder, config, precision)
        builder_config.set_flag(trt.BuilderFlag.FP16)
        return builder_config

    monkeypatch.setattr(tensorrt_build, "_builder_config", with_fp16)
    with pytest.raises(ExportError, match="TensorRT build failed"):
        build_plan(onnx_path, tmp_path / "flag", TensorRTBuildConfig(1, 2, 4, workspace_gib=1))
    monkeypatch.setattr(tensorrt_build, "_builder_config", real)
    monkeypatch.setattr(tensorrt_build, "_strongly_typed_flags", lambda trt: 0)
    with pytest.raises(ExportError, match="TensorRT build failed"):
        build_plan(onnx_path, tmp_path / "weak", TensorRTBuildConfig(1, 2, 4, workspace_gib=1))


def test_a_context_that_cannot_be_created_is_an_artifact_error(fake_tensorrt, onnx_path, tmp_path) -> None:
    build_plan(onnx_path, tmp_path, TensorRTBuildConfig(1, 2, 4, workspace_gib=1))
    fake_tensorrt.STATE["context_fails"] = True
    with pytest.raises(ArtifactError, match="could not create an execution context"):
        TensorRTBackend(tmp_path / PLAN_FILE)
