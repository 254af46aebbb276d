"""The generated repositories on a real Triton server (the `tritonserver` of the nvidia-pytriton wheel) on
loopback: the Python-backend repository serves the engine's own outputs, Triton's dynamic batcher merges
requests into one execution, and the ONNX Runtime and TensorRT configs pass Triton's own parsing (their
backends are not in the wheel, so their load stops exactly there)."""
from __future__ import annotations

import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from deepliif.contract import FUSED_GRAPH
from deepliif.imageio import file_sha256
from deepliif.model_dir import Layout
from engine.errors import BackendUnavailableError
from engine.session import Session
from export.tensorrt_build import METADATA_FILE, PLAN_FILE, EngineMetadata, TensorRTBuildConfig
from export.triton import TritonConfig, write_python_repository, write_repository
from export.triton_server import LocalTritonServer, distribution

pytestmark = [pytest.mark.triton, pytest.mark.slow]
MISSING_BACKEND = "unable to find backend library for backend '{}'"
QUEUE_DELAY_US = 300_000  # long enough that concurrent single-tile requests meet in one batch


def _server_or_skip() -> None:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip(f"the nvidia-pytriton tritonserver runs on Linux x86_64, not {platform.system()} "
                    f"{platform.machine()}")
    try:
        distribution()
    except BackendUnavailableError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{exc}; `make test` installs it, so CI must have it")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def served(generated_models: dict[Layout, Path], fused_onnx: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server over a repository of three models: python (the engine's session on the CPU), onnx, plan."""
    _server_or_skip()
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    model_dir = generated_models[Layout.CHECKPOINT]
    write_python_repository(repo, TritonConfig(max_batch_size=8, instance_kind="cpu",
                                               max_queue_delay_us=QUEUE_DELAY_US),
                            model_dir, backend="onnxruntime", cache_dir=root / "served-cache")
    write_repository(repo, TritonConfig(name="deepliif_onnx"), onnx_path=fused_onnx)
    plan = root / "engine" / PLAN_FILE
    plan.parent.mkdir()
    plan.write_bytes(b"a plan Triton's TensorRT backend would deserialise")
    EngineMetadata(onnx_sha256=file_sha256(fused_onnx), plan_sha256=file_sha256(plan),
                   tensorrt_version="11.4.0.106", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                   precision="fp32", profile=TensorRTBuildConfig(1, 4, 8).profile(), workspace_gib=8.0,
                   version_compatible=False, build_seconds=1.0).write(plan.with_name(METADATA_FILE))
    write_repository(repo, TritonConfig(name="deepliif_plan"), plan_path=plan)
    reference = Session(model_dir, backend="onnxruntime", device="cpu", cache_dir=root / "reference-cache")
    with LocalTritonServer(repo, root / "server", os.environ) as server:
        yield server, reference
    reference.close()
    assert server.process.poll() is not None, "the server outlived its fixture"


def _infer(url: str, tiles: np.ndarray, model: str = "deepliif") -> dict[str, np.ndarray]:
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(url)
    try:
        given = httpclient.InferInput(FUSED_GRAPH.input_name, list(tiles.shape), "UINT8")
        given.set_data_from_numpy(tiles, binary_data=True)
        wanted = [httpclient.InferRequestedOutput(n, binary_data=True) for n in FUSED_GRAPH.onnx_output_names]
        answer = client.infer(model, [given], outputs=wanted)
        return {name: answer.as_numpy(onnx_name)
                for name, onnx_name in zip(FUSED_GRAPH.output_names, FUSED_GRAPH.onnx_output_names)}
    finally:
        client.close()


def _assert_engine_outputs(served_outputs: dict[str, np.ndarray], tiles: np.ndarray, reference: Session) -> None:
    expected = reference.run(tiles)
    for name in FUSED_GRAPH.output_names:
        assert served_outputs[name].shape == tiles.shape, name
        worst = np.abs(served_outputs[name].astype(np.int16) - expected[name]).max()
        assert worst <= 1, f"{name}: Triton's output is {worst} grey levels from the engine's"


def _statistics(url: str) -> tuple[int, int]:
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("deepliif")["model_stats"][0]
    finally:
        client.close()
    return stats["inference_count"], stats["execution_count"]


def test_python_backend_serves_the_engines_outputs(served) -> None:
    server, reference = served
    rng = np.random.default_rng(11)
    tile = rng.integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    _assert_engine_outputs(_infer(server.url, tile), tile, reference)
    several = rng.integers(0, 256, (3, 512, 512, 3), dtype=np.uint8)  # one request carrying a batch
    _assert_engine_outputs(_infer(server.url, several), several, reference)


def test_concurrent_requests_are_merged_into_one_execution(served) -> None:
    server, reference = served
    tiles = np.random.default_rng(12).integers(0, 256, (4, 1, 512, 512, 3), dtype=np.uint8)
    before = _statistics(server.url)
    with ThreadPoolExecutor(len(tiles)) as pool:
        answers = list(pool.map(lambda tile: _infer(server.url, tile), tiles))
    inferences, executions = (after - earlier for after, earlier in zip(_statistics(server.url), before))
    assert inferences == len(tiles)
    assert executions < inferences, "Triton's dynamic batcher merged no requests"
    for tile, answer in zip(tiles, answers):  # each request got its own tile's outputs back
        _assert_engine_outputs(answer, tile, reference)


def test_a_request_over_max_batch_size_is_refused_and_the_server_still_serves(served) -> None:
    import tritonclient.utils
    server, reference = served
    with pytest.raises(tritonclient.utils.InferenceServerException, match="batch"):
        _infer(server.url, np.zeros((9, 512, 512, 3), np.uint8))
    tile = np.full((1, 512, 512, 3), 128, np.uint8)
    _assert_engine_outputs(_infer(server.url, tile), tile, reference)


def test_onnx_and_tensorrt_configs_pass_tritons_parsing(served) -> None:
    server, _ = served
    index = {entry["name"]: entry for entry in server.repository_index()}
    assert index["deepliif"]["state"] == "READY"
    for name, backend in (("deepliif_onnx", "onnxruntime"), ("deepliif_plan", "tensorrt")):
        assert index[name]["state"] == "UNAVAILABLE"
        assert MISSING_BACKEND.format(backend) in index[name]["reason"], index[name]


def test_a_config_triton_cannot_parse_is_told_apart(served, tmp_path: Path) -> None:
    """The check above can fail: a model whose config Triton rejects never gets as far as its backend."""
    server, _ = served
    broken = tmp_path / "repo" / "deepliif_broken"
    (broken / "1").mkdir(parents=True)
    text = (server.repository / "deepliif_onnx" / "config.pbtxt").read_text()
    (broken / "config.pbtxt").write_text(text.replace('"deepliif_onnx"', '"deepliif_broken"')
                                         .replace("TYPE_UINT8", "TYPE_UINT9", 1))
    with LocalTritonServer(tmp_path / "repo", tmp_path / "server", os.environ) as second:
        entry = {e["name"]: e for e in second.repository_index()}["deepliif_broken"]
    assert entry.get("state") != "READY"
    assert MISSING_BACKEND.format("onnxruntime") not in entry.get("reason", "")
    assert "TYPE_UINT9" in second.log_tail(200_000)
