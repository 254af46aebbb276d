from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deepliif.imageio import read_image
from deepliif.inference import InferenceOptions, infer_image
from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from engine.errors import ArtifactError, ExportError
from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.samples import synthetic_ihc
from export.config import OnnxExportConfig
from export.onnx_checks import check_fused_signature, check_onnx
from export.onnx_export import export_generators, export_pipeline


def _tiles(count: int) -> np.ndarray:
    return np.stack([synthetic_ihc(seed=s) for s in range(count)])


def test_fused_graph_signature_and_operators(fused_onnx: Path) -> None:
    summary = check_onnx(fused_onnx)
    check_fused_signature(summary)
    assert summary.inputs == {"ihc": ("uint8", ["batch", 512, 512, 3])}
    assert list(summary.outputs) == ["hema", "dapi", "lap2", "marker", "seg"]
    assert all(v == ("uint8", ["batch", 512, 512, 3]) for v in summary.outputs.values())
    assert "BatchNormalization" not in summary.op_counts
    assert summary.op_counts["InstanceNormalization"] > 0
    assert summary.initializer_types == ("float",) or "float16" not in summary.initializer_types


def test_fused_onnx_matches_torch_at_batch_1_and_4(fused_onnx: Path,
                                                   generated_models: dict[Layout, Path]) -> None:
    tiles = _tiles(4)
    expected = TileRunner(FusedPipeline(load_model_dir(generated_models[Layout.CHECKPOINT]))).run(tiles)
    with OnnxRuntimeBackend(fused_onnx, device="cpu") as backend:
        one_by_one = backend.run(tiles)
        backend.micro_batch = None  # the whole batch in one session call
        whole = backend.run(tiles)
    for name in OUTPUT_NAMES:
        for actual in (one_by_one[name], whole[name]):
            assert actual.dtype == np.uint8 and actual.shape == tiles.shape
            assert np.abs(actual.astype(int) - expected[name]).max() <= 1, name


@pytest.mark.slow
@pytest.mark.shared
def test_fused_onnx_reproduces_the_deepliif_fixture_outputs(deepliif_fixtures: Path, tmp_path: Path,
                                                            reference_image) -> None:
    cases = sorted(p for p in (deepliif_fixtures / "outputs").glob("*/*") if p.is_dir())
    assert len(cases) >= 5
    backends = {}
    for model_dir in sorted((deepliif_fixtures / "models").iterdir()):
        path = tmp_path / f"{model_dir.name}.onnx"
        export_pipeline(load_model_dir(model_dir), path, OnnxExportConfig())
        backends[model_dir.name] = OnnxRuntimeBackend(path, device="cpu")
    for case in cases:
        reference = json.loads((case / "reference.json").read_text())
        result = infer_image(backends[case.parent.name], read_image(case / "input.png"),
                             InferenceOptions(tile_size=reference["tile_size"], batch_size=4))
        for name in OUTPUT_NAMES:
            diff = np.abs(result.images[name].astype(int) - read_image(reference_image(case, name)))
            assert diff.max() <= 1 and diff.mean() <= 0.01, (case, name, diff.max(), diff.mean())
        assert result.scoring == reference["scoring"], case


def test_fp16_graph_keeps_uint8_io_and_fp32_normalisation(fused_onnx_fp16: Path, fused_onnx: Path) -> None:
    summary = check_onnx(fused_onnx_fp16)
    check_fused_signature(summary)
    assert "float16" in summary.initializer_types
    assert summary.size_bytes < check_onnx(fused_onnx).size_bytes
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fused_onnx_fp16)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("/translators.")]
    assert norms and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in norms)
    assert convs and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in convs)
    seg_sum = [n for n in model.graph.node if n.op_type == "ReduceSum"]
    assert len(seg_sum) == 1 and types[seg_sum[0].output[0]] == onnx.TensorProto.FLOAT


def test_fp16_graph_runs_close_to_fp32(fused_onnx_fp16: Path, generated_models: dict[Layout, Path]) -> None:
    tiles = _tiles(2)
    expected = TileRunner(FusedPipeline(load_model_dir(generated_models[Layout.CHECKPOINT]))).run(tiles)
    with OnnxRuntimeBackend(fused_onnx_fp16, device="cpu") as backend:
        actual = backend.run(tiles)
    for name in OUTPUT_NAMES:
        diff = np.abs(actual[name].astype(int) - expected[name])
        assert diff.mean() < 0.5 and diff.max() <= 16, (name, diff.mean(), diff.max())


def test_per_generator_files(generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    model = load_model_dir(generated_models[Layout.TORCHSCRIPT])
    summaries = export_generators(model, tmp_path, OnnxExportConfig())
    assert [s.path.name for s in summaries] == [f"{n}.onnx" for n in model.names.all]
    assert all(s.inputs["input"] == ("float", ["batch", 3, 512, 512]) for s in summaries)


def test_not_onnx_and_missing_files_are_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x89PNG not a model at all")
    with pytest.raises(ArtifactError, match="is not an ONNX model"):
        check_onnx(bogus)
    with pytest.raises(ArtifactError, match="no such ONNX file"):
        check_onnx(tmp_path / "absent.onnx")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_graph_with_batch_normalization_is_refused(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Tanh()).eval()
    path = tmp_path / "bn.onnx"
    torch.onnx.export(module, (torch.zeros(1, 3, 8, 8),), str(path), opset_version=17, dynamo=False,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    proto = onnx.load(str(path))
    if not any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        pytest.skip("this torch folded BatchNorm into the convolution")
    with pytest.raises(ExportError, match="BatchNormalization"):
        check_onnx(path)


def test_a_non_fused_onnx_is_not_taken_for_the_pipeline(generated_models: dict[Layout, Path],
                                                        tmp_path: Path) -> None:
    model = load_model_dir(generated_models[Layout.CHECKPOINT])
    (summary, *_) = export_generators(model, tmp_path, OnnxExportConfig())
    with pytest.raises(ArtifactError, match="not a DeepLIIF fused-pipeline ONNX"):
        check_fused_signature(summary)


def test_failed_export_leaves_no_file(generated_models: dict[Layout, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def killed_midway(module, args, path, **kwargs):
        Path(path).write_bytes(b"half an onnx")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch.onnx, "export", killed_midway)
    with pytest.raises(ExportError, match="killed"):
        export_pipeline(load_model_dir(generated_models[Layout.CHECKPOINT]), tmp_path / "deepliif.onnx",
                        OnnxExportConfig())
    assert list(tmp_path.iterdir()) == []
