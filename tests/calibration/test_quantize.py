from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration.quantize import (FP16_QDQ_OPSET, CalibrationMethod, QuantizationConfig, edge_convolutions,
                                  quantize_int8)
from deepliif.errors import ArgumentError
from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.samples import synthetic_ihc
from export.onnx_checks import check_onnx
from export.tensorrt_build import onnx_precision
from engine.backends.precision import Precision


@pytest.fixture(scope="module")
def int8_onnx(fp32_onnx: Path, calibration_tiles: np.ndarray, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("int8") / "deepliif.onnx"
    summary = quantize_int8(fp32_onnx, path, calibration_tiles, QuantizationConfig("minmax"))
    return path, summary


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_edge_convolutions_are_the_first_and_last_of_each_generator(fp32_onnx: Path) -> None:
    edges = edge_convolutions(onnx.load(str(fp32_onnx)))
    assert len(edges) == 18  # 9 generators x (first, last)
    for g in range(4):
        assert sum(name.startswith(f"/translators.{g}/") for name in edges) == 2
    for g in range(5):
        mine = [name for name in edges if name.startswith(f"/segmenters.{g}/")]
        assert len(mine) == 2 and any(name.endswith("ConvTranspose") for name in mine)


def test_the_graph_is_explicit_symmetric_per_channel_int8(int8_onnx: tuple[Path, dict]) -> None:
    path, summary = int8_onnx
    model = onnx.load(str(path))
    nodes = model.graph.node
    inits = _initializers(path)
    assert onnx_precision(check_onnx(path)) is Precision.INT8
    zero_points = [inits[n.input[2]] for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)  # symmetric
    weight_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].ndim == 4]
    assert weight_dq and all(inits[n.input[1]].size > 1 for n in weight_dq)  # per-channel weight scales
    assert not [t for t in inits.values() if t.dtype == np.int32]  # biases stay float
    float_weights = [n.input[1] for n in nodes if n.name in summary["float_convolutions"]]
    assert len(float_weights) == 18 and all(inits[w].dtype == np.float16 for w in float_weights)
    norms = [n for n in nodes if n.op_type == "InstanceNormalization"]
    dequantized = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    assert norms and not any(name in dequantized for n in norms for name in n.input[1:])
    assert summary["int8_convolutions"] == summary["convolutions"] - 18 > 0


def test_the_int8_graph_has_the_fp16_graphs_types_and_fp16_scales(int8_onnx: tuple[Path, dict]) -> None:
    """DequantizeLinear outputs its scale's type: with fp16 scales every convolution takes fp16 straight
    from a DequantizeLinear (no Cast between), and only what the fp16 export keeps fp32 stays fp32."""
    path, summary = int8_onnx
    model = onnx.load(str(path))
    inits = _initializers(path)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == FP16_QDQ_OPSET
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[1]].dtype == np.float16 for n in qdq)
    producer = {out: n for n in model.graph.node for out in n.output}
    quantized = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")
                 and n.name not in summary["float_convolutions"]]
    assert quantized and all(producer[n.input[0]].op_type == "DequantizeLinear" for n in quantized)
    assert all(producer[n.input[1]].op_type == "DequantizeLinear" for n in quantized)
    casts_to_fp32 = {n.input[0] for n in model.graph.node if n.op_type == "Cast"
                     and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    fp32_users = {producer[name].op_type for name in casts_to_fp32 if name in producer}
    assert fp32_users <= {"Add", "Conv", "ConvTranspose", "DequantizeLinear", "LeakyRelu", "Relu", "Tanh",
                          "Mul", "Sub", "Div", "Concat", "Pad", "Cast"}
    assert summary["float_type"] == "fp16" and "float16" in summary["float_ops"]


def test_the_fp32_float_type_keeps_the_quantizers_graph(fp32_onnx: Path, calibration_tiles: np.ndarray,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "fp32-floats.onnx"
    summary = quantize_int8(fp32_onnx, path, calibration_tiles[:1], QuantizationConfig("minmax", float_type="fp32"))
    model = onnx.load(str(path))
    inits = _initializers(path)
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert scales and all(scale.dtype == np.float32 for scale in scales) and summary["float_type"] == "fp32"
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < FP16_QDQ_OPSET
    with pytest.raises(ArgumentError, match="float type"):
        QuantizationConfig(float_type="bf16")


def test_the_int8_graph_runs_in_onnxruntime_close_to_fp32(fp32_onnx: Path, int8_onnx: tuple[Path, dict]) -> None:
    tiles = np.stack([synthetic_ihc(seed=9), synthetic_ihc(seed=10)])
    with OnnxRuntimeBackend(fp32_onnx, "cpu") as fp32, OnnxRuntimeBackend(int8_onnx[0], "cpu", Precision.INT8) as q:
        expected, actual = fp32.run(tiles), q.run(tiles)
    for name, image in actual.items():
        assert image.dtype == np.uint8 and image.shape == expected[name].shape
        mean_abs = np.abs(image.astype(int) - expected[name].astype(int)).mean()
        assert 0 < mean_abs < 40, (name, mean_abs)  # quantized (not identical) yet close on average


def test_same_tiles_give_the_same_scales(fp32_onnx: Path, calibration_tiles: np.ndarray,
                                         int8_onnx: tuple[Path, dict], tmp_path: Path) -> None:
    again = tmp_path / "again.onnx"
    quantize_int8(fp32_onnx, again, calibration_tiles, QuantizationConfig("minmax"))
    first, second = _initializers(int8_onnx[0]), _initializers(again)
    scales = [name for name in first if name.endswith(("_scale", "_scale__fp16"))]
    assert len(scales) > 100
    assert all(np.array_equal(first[name], second[name]) for name in scales)


def test_quantizing_the_edge_layers_too_is_a_choice(fp32_onnx: Path, calibration_tiles: np.ndarray,
                                                     tmp_path: Path) -> None:
    summary = quantize_int8(fp32_onnx, tmp_path / "all.onnx", calibration_tiles[:1],
                            QuantizationConfig("minmax", keep_edge_layers=False))
    assert summary["float_convolutions"] == [] and summary["int8_convolutions"] == summary["convolutions"]


def test_bad_settings_are_named() -> None:
    with pytest.raises(ArgumentError, match="calibration method must be one of minmax, entropy, percentile"):
        QuantizationConfig("kl")
    with pytest.raises(ArgumentError, match="keep_edge_layers"):
        QuantizationConfig(keep_edge_layers="yes")
    assert CalibrationMethod.parse("ENTROPY") is CalibrationMethod.ENTROPY


def test_an_empty_calibration_batch_is_refused(fp32_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="non-empty"):
        quantize_int8(fp32_onnx, tmp_path / "x.onnx", np.zeros((0, 512, 512, 3), np.uint8), QuantizationConfig())
