"""The fused graph's contract is stated once: renaming an output is one line in `FUSED_GRAPH`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepliif.contract import FUSED_GRAPH, OUTPUT_NAMES
from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import FusedPipeline, TileRunner
from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.backends.precision import Precision
from engine.samples import synthetic_ihc
from export.config import OnnxExportConfig
from export.onnx_checks import check_fused_signature, check_onnx
from export.onnx_export import export_pipeline
from export.triton import ONNXRUNTIME, TritonConfig, render_config


def test_the_contract_describes_what_the_graph_is() -> None:
    assert FUSED_GRAPH.output_names == OUTPUT_NAMES
    assert FUSED_GRAPH.tensor_names == ("ihc", "hema", "dapi", "lap2", "marker", "seg")
    good = {"ihc": ("uint8", ["batch", 512, 512, 3])}
    outputs = {name: ("uint8", ["batch", 512, 512, 3]) for name in FUSED_GRAPH.onnx_output_names}
    assert FUSED_GRAPH.signature_problems(good, outputs) == []
    bad = {**outputs, "seg": ("float32", ["batch", 512, 512, 3])}
    assert FUSED_GRAPH.signature_problems(good, bad) == ["output seg is float32 ['batch', 512, 512, 3], expected "
                                                        "uint8 [batch, 512, 512, 3]"]
    assert "outputs are" in FUSED_GRAPH.signature_problems(good, {"seg": outputs["seg"]})[0]


def test_renaming_an_output_is_one_line_in_the_contract(generated_models: dict[Layout, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # the one line: the Seg output's tensor is called "segmentation" from now on
    monkeypatch.setitem(FUSED_GRAPH.onnx_outputs, "Seg", "segmentation")

    model = load_model_dir(generated_models[Layout.CHECKPOINT])
    path = tmp_path / FUSED_GRAPH.file_name
    export_pipeline(model, path, OnnxExportConfig())  # the exporter names the tensors from the contract
    summary = check_onnx(path)
    check_fused_signature(summary)  # ... and the signature check expects the new name
    assert "segmentation" in summary.outputs and "seg" not in summary.outputs
    assert 'name: "segmentation"' in render_config(TritonConfig(), ONNXRUNTIME)

    tile = synthetic_ihc(seed=4)[None]
    with OnnxRuntimeBackend(path, device="cpu", precision=Precision.FP32) as backend:  # binds by the contract
        outputs = backend.run(tile)
    expected = TileRunner(FusedPipeline(model)).run(tile)
    assert list(outputs) == list(OUTPUT_NAMES)  # results keep DeepLIIF's names
    for name in OUTPUT_NAMES:
        assert np.abs(outputs[name].astype(int) - expected[name].astype(int)).max() <= 1, name
