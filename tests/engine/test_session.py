from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256
from deepliif.inference import InferenceOptions, OutputSet, infer_image
from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from engine.errors import BackendUnavailableError
from engine.backends import BackendKind
from engine.session import Session, choose_batch_size
from engine.samples import synthetic_ihc
from engine.backends.precision import Precision

ROOT = Path(__file__).resolve().parents[2]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def model_dir(generated_models: dict[Layout, Path]) -> Path:
    return generated_models[Layout.CHECKPOINT]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> TileRunner:
    return TileRunner(FusedPipeline(load_model_dir(model_dir)))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_every_cpu_backend_matches_the_torch_pipeline(backend: str, model_dir: Path, reference: TileRunner,
                                                      tmp_path: Path) -> None:
    tiles = np.stack([synthetic_ihc(seed=s) for s in range(3)])
    with Session(model_dir, backend=backend, device="cpu", cache_dir=tmp_path) as session:
        assert session.info.name == backend and session.info.device == "cpu"
        assert session.batch_size == 4
        actual = session.run(tiles)
    expected = reference.run(tiles)
    for name in OUTPUT_NAMES:
        assert np.abs(actual[name].astype(int) - expected[name]).max() <= 1, (backend, name)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_backends_on_the_fixture_models(backend: str, tiny_models: dict[str, Path], sample_dir: Path,
                                        tmp_path: Path) -> None:
    from engine.samples import benchmark_tiles
    tiles, _ = benchmark_tiles(2, sorted(sample_dir.iterdir())[:2])
    for model_dir in tiny_models.values():
        expected = TileRunner(FusedPipeline(load_model_dir(model_dir))).run(tiles)
        with Session(model_dir, backend=backend, device="cpu", cache_dir=tmp_path) as session:
            actual = session.run(tiles)
        for name in OUTPUT_NAMES:
            assert np.abs(actual[name].astype(int) - expected[name]).max() <= 1, (model_dir.name, name)


def test_auto_prefers_onnxruntime_on_cpu_and_caches_the_export(model_dir: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    with Session(model_dir, device="cpu", cache_dir=tmp_path) as session:
        assert session.info.name == "onnxruntime"
    assert "auto: chose onnxruntime" in caplog.text and "built artifact" in caplog.text
    caplog.clear()
    with Session(model_dir, device="cpu", cache_dir=tmp_path):
        pass
    assert "artifact cache hit" in caplog.text and "built artifact" not in caplog.text


def test_whole_images_through_the_session_equal_the_foundation_pipeline(model_dir: Path, reference: TileRunner,
                                                                        tmp_path: Path) -> None:
    images = [synthetic_ihc(700, 1100, seed=5), synthetic_ihc(300, 200, seed=6)]
    with Session(model_dir, backend="torch", device="cpu", cache_dir=tmp_path) as session:
        results = session.infer_many(images, InferenceOptions(batch_size=3))
    for image, result in zip(images, results):
        expected = infer_image(reference, image, InferenceOptions(batch_size=3))
        assert result.scoring == expected.scoring and result.tiles == expected.tiles
        assert result.empty_tiles == expected.empty_tiles
        for name, array in expected.images.items():
            assert np.array_equal(result.images[name], array), name


def test_explicit_backend_failures_are_one_line_and_say_what_to_do(model_dir: Path, tmp_path: Path) -> None:
    if not HAS_TENSORRT:
        with pytest.raises(BackendUnavailableError, match="pip install"):
            Session(model_dir, backend="tensorrt", cache_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA device"):
            Session(model_dir, backend="torch", device="cuda", cache_dir=tmp_path)
    with pytest.raises(BackendUnavailableError, match="fp16 needs a CUDA device"):
        Session(model_dir, backend="torch", precision="fp16", device="cpu", cache_dir=tmp_path)
    with pytest.raises(BackendUnavailableError, match="calibrate"):
        Session(model_dir, backend="onnxruntime", precision="int8", device="cpu", cache_dir=tmp_path)
    with pytest.raises(ArgumentError, match="backend must be one of"):
        Session(model_dir, backend="tflite", cache_dir=tmp_path)


def test_auto_falls_back_and_says_why(model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    # int8 is not available anywhere yet: auto tries each backend and reports every reason
    with pytest.raises(BackendUnavailableError) as caught:
        Session(model_dir, precision="int8", device="cpu", cache_dir=tmp_path)
    assert "onnxruntime:" in str(caught.value) and "torch:" in str(caught.value)


def test_batch_size_choice() -> None:
    assert choose_batch_size(None, Precision.FP32, None) == 4
    assert choose_batch_size(80 << 30, Precision.FP32, None) == 21
    assert choose_batch_size(80 << 30, Precision.FP16, 16) == 16
    assert choose_batch_size(1 << 30, Precision.FP32, 16) == 1


@pytest.mark.slow
def test_four_kernels_starting_together_export_once(model_dir: Path, tmp_path: Path) -> None:
    code = ("import logging, sys\nlogging.basicConfig(level=logging.INFO)\n"
            "from engine.session import Session\n"
            f"s = Session({str(model_dir)!r}, backend='onnxruntime', device='cpu', cache_dir={str(tmp_path)!r})\n"
            "print(s.backend.session._model_path if hasattr(s.backend.session, '_model_path') else 'ok')\n")
    processes = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [o[1][-2000:] for o in outputs]
    logs = "".join(o[1] for o in outputs)
    # two artifacts, each built by one process: the export, and ONNX Runtime's graph optimised for this CPU
    built = re.findall(r"built artifact (\S+) in", logs)
    assert len(built) == 2 and len(set(built)) == 2
    assert len({o[0] for o in outputs}) == 1
    entries = sorted((p for p in tmp_path.iterdir() if p.is_dir()), key=lambda p: (p / "deepliif.onnx").is_file())
    assert len(entries) == 2 and (entries[1] / "deepliif.onnx").is_file()
    assert (entries[0] / "deepliif.ort-optimized.onnx").is_file()


def test_backend_kind_parsing() -> None:
    assert BackendKind.parse("ONNXRuntime") is BackendKind.ONNXRUNTIME


@pytest.mark.slow
def test_a_cached_onnx_that_does_not_load_is_rebuilt(model_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with Session(model_dir, backend="onnxruntime", device="cpu", cache_dir=tmp_path):
        pass
    # on the CPU the session loads ONNX Runtime's saved optimised graph: corrupt that one
    (onnx_file,) = tmp_path.glob("*/deepliif.ort-optimized.onnx")
    entry = onnx_file.parent
    onnx_file.write_bytes(b"truncated")  # and a manifest that agrees, so only loading can tell
    manifest = json.loads((entry / "artifact.json").read_text())
    manifest["files"][onnx_file.name] = file_sha256(onnx_file)
    (entry / "artifact.json").write_text(json.dumps(manifest))
    caplog.set_level("INFO")
    with Session(model_dir, backend="onnxruntime", device="cpu", cache_dir=tmp_path) as session:
        assert session.info.name == "onnxruntime"
    assert "does not load" in caplog.text and "built artifact" in caplog.text
    assert onnx_file.stat().st_size > 1000


def test_the_optimised_graph_keeps_its_weights_in_a_file_the_manifest_covers(model_dir: Path, tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    with Session(model_dir, backend="onnxruntime", device="cpu", cache_dir=tmp_path) as session:
        before = session.run(np.full((1, 512, 512, 3), 128, np.uint8))
    (graph,) = tmp_path.glob("*/deepliif.ort-optimized.onnx")
    weights = graph.with_name(graph.name + ".data")
    proto = onnx.load(str(graph), load_external_data=False)
    inline = [t.name for t in proto.graph.initializer if len(t.raw_data) > 1024]
    assert not inline and weights.stat().st_size > graph.stat().st_size  # the weights left the protobuf
    assert set(json.loads((graph.parent / "artifact.json").read_text())["files"]) >= {graph.name, weights.name}
    with weights.open("r+b") as handle:  # same size, other bytes: only the manifest's sha256 can tell
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\xff" * 64)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    caplog.set_level("INFO")
    with Session(model_dir, backend="onnxruntime", device="cpu", cache_dir=tmp_path) as session:
        after = session.run(np.full((1, 512, 512, 3), 128, np.uint8))
    assert "stale or corrupt" in caplog.text
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_each_graph_gets_its_own_tensorrt_ep_engine_folder(tmp_path: Path) -> None:
    """ONNX Runtime's TensorRT EP names cached engines by the graph's file and node names, not its weights:
    two graphs of one architecture (other weights, a re-calibration) must never share an engine folder."""
    from engine.artifacts import Artifact, ArtifactKind, Provenance
    from engine.backends.precision import Precision
    from engine.session import tensorrt_ep_cache_dir
    first, second = tmp_path / "a" / "deepliif.onnx", tmp_path / "b" / "deepliif.onnx"
    for path, payload in ((first, b"weights one"), (second, b"weights two")):
        path.parent.mkdir()
        path.write_bytes(payload)
    given = [Artifact(p, Provenance(ArtifactKind.ONNX, Precision.INT8, None)) for p in (first, second)]
    cached = [Artifact(first, Provenance(ArtifactKind.ONNX, Precision.FP16, "m", key)) for key in ("k1", "k2")]
    folders = [tensorrt_ep_cache_dir(tmp_path / "cache", artifact) for artifact in given + cached]
    assert len(set(folders)) == 4 and all(f.parent == tmp_path / "cache" / "onnxruntime-tensorrt" for f in folders)
    assert folders[0].name == file_sha256(first)[:24] and folders[2].name == "k1"
    assert tensorrt_ep_cache_dir(tmp_path / "cache", given[0]) == folders[0]  # the same graph keeps its engines


def test_seg_intermediate_opens_torch_and_is_refused_elsewhere(generated_models: dict[Layout, Path],
                                                              tmp_path: Path) -> None:
    """Only the torch backend gives the per-generator segmentations: `auto` opens torch for them, another
    backend is refused by name, and asking a session opened without them is refused before any tile runs."""
    from deepliif.contract import SEG_INTERMEDIATE_NAMES
    from engine.samples import synthetic_ihc
    model = generated_models[Layout.TORCHSCRIPT]
    with pytest.raises(ArgumentError, match="needs the torch backend"):
        Session(model, backend="onnxruntime", device="cpu", cache_dir=tmp_path, seg_intermediate=True)
    image = synthetic_ihc(600, 700, seed=3)
    wanted = InferenceOptions(outputs=OutputSet.SEG, seg_intermediate=True, cell_geometry=None)
    with Session(model, backend="auto", device="cpu", cache_dir=tmp_path, seg_intermediate=True) as session:
        assert session.info.name == "torch" and session.output_names[-5:] == SEG_INTERMEDIATE_NAMES
        both = session.infer_many([image, image], [wanted, InferenceOptions(outputs=OutputSet.SEG)])
        reference = TileRunner(FusedPipeline(load_model_dir(model), seg_intermediate=True)).run(
            np.ascontiguousarray(image[:512, :512])[None])
    assert list(both[0].images) == ["Seg", *SEG_INTERMEDIATE_NAMES] and list(both[1].images) == ["Seg"]
    assert all(both[0].images[name].shape == image.shape for name in SEG_INTERMEDIATE_NAMES)
    assert not np.array_equal(both[0].images["IHC_s"], both[0].images["Marker_s"])
    assert np.abs(both[0].images["IHC_s"][:64, :64].astype(int) - reference["IHC_s"][0, :64, :64]).max() <= 1
    with Session(model, backend="torch", device="cpu", cache_dir=tmp_path) as plain:
        with pytest.raises(ArgumentError, match="gives no IHC_s"):
            plain.infer(image, wanted)
