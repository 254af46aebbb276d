"""The TensorRT parser constraints, on hand-made graphs that break each rule and on every graph we export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deepliif.model_dir import Layout, load_model_dir
from engine.errors import TensorRTCompatibilityError
from export.config import OnnxExportConfig
from export.onnx_export import export_pipeline
from export.parser_rules import check_tensorrt_rules


def _graph(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _tensor(name: str, elem_type: int, dims=("batch", 4, 4, 3)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(dims))


def _cast(name: str, source: str, target: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], name=name, to=to)


def _boundary_graph(transpose_first: bool, cast_last: bool) -> onnx.ModelProto:
    """uint8 in -> float -> uint8 out, with the transposes where the old fused graph had them or not."""
    nodes = []
    if transpose_first:
        nodes += [helper.make_node("Transpose", ["ihc"], ["t"], name="/Transpose_in", perm=[0, 3, 1, 2]),
                  _cast("/Cast_in", "t", "x", TensorProto.FLOAT)]
    else:
        nodes += [_cast("/Cast_in", "ihc", "c", TensorProto.FLOAT),
                  helper.make_node("Transpose", ["c"], ["x"], name="/Transpose_in", perm=[0, 3, 1, 2])]
    nodes.append(helper.make_node("Relu", ["x"], ["y"], name="/Relu"))
    if cast_last:
        nodes += [helper.make_node("Transpose", ["y"], ["z"], name="/Transpose_out", perm=[0, 2, 3, 1]),
                  _cast("/Cast_out", "z", "seg", TensorProto.UINT8)]
    else:
        nodes += [_cast("/Cast_out", "y", "u", TensorProto.UINT8),
                  helper.make_node("Transpose", ["u"], ["seg"], name="/Transpose_out", perm=[0, 2, 3, 1])]
    return _graph(nodes, [_tensor("ihc", TensorProto.UINT8)], [_tensor("seg", TensorProto.UINT8)])


def test_uint8_must_stay_at_the_graph_boundary() -> None:
    check_tensorrt_rules(_boundary_graph(transpose_first=False, cast_last=True))
    with pytest.raises(TensorRTCompatibilityError) as caught:
        check_tensorrt_rules(_boundary_graph(transpose_first=True, cast_last=False))
    problems = caught.value.problems
    assert any("uint8 input ihc must feed Cast nodes only" in p and "/Transpose_in" in p for p in problems)
    assert any("uint8 output seg must come straight from a Cast" in p and "/Transpose_out" in p
               for p in problems)
    assert any("uint8 intermediate" in p and "/Cast_out" in p for p in problems)


def test_unsupported_ops_opset_and_static_batch_are_named() -> None:
    nodes = [helper.make_node("Cast", ["x"], ["c"], name="/Cast", to=TensorProto.FLOAT),
             helper.make_node("Gelu", ["c"], ["g"], name="/Gelu", domain="com.microsoft"),
             helper.make_node("NonMaxSuppression", ["g"], ["y"], name="/Nms")]
    model = _graph(nodes, [_tensor("x", TensorProto.FLOAT, (1, 4))], [_tensor("y", TensorProto.FLOAT, (1, 4))],
                   opset=21)
    with pytest.raises(TensorRTCompatibilityError) as caught:
        check_tensorrt_rules(model)
    text = str(caught.value)
    assert "opset 21" in text and "com.microsoft::Gelu at /Gelu" in text
    assert "NonMaxSuppression at /Nms" in text and "input x has no dynamic batch dimension" in text


def _qdq_graph(zero_point_type: int, zero: int, weight_axis: int, q_feeds_relu: bool) -> onnx.ModelProto:
    weights = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.int8), "w_q")
    scales = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
              numpy_helper.from_array(np.full(2, 0.1, np.float32), "ws"),
              helper.make_tensor("zp", zero_point_type, [], [zero]),
              helper.make_tensor("wzp", TensorProto.INT8, [2], [0, 0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="/Q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="/DQ"),
             helper.make_node("DequantizeLinear", ["w_q", "ws", "wzp"], ["w"], name="/DQ_w", axis=weight_axis),
             helper.make_node("Conv", ["xd", "w"], ["y"], name="/Conv")]
    if q_feeds_relu:
        nodes.append(helper.make_node("Relu", ["xq"], ["r"], name="/Relu_on_int8"))
    return _graph(nodes, [_tensor("x", TensorProto.FLOAT, ("batch", 3, 4, 4))],
                  [_tensor("y", TensorProto.FLOAT, ("batch", 2, 4, 4))], [weights, *scales])


def test_explicit_quantization_placement() -> None:
    check_tensorrt_rules(_qdq_graph(TensorProto.INT8, 0, weight_axis=0, q_feeds_relu=False))
    with pytest.raises(TensorRTCompatibilityError) as caught:
        check_tensorrt_rules(_qdq_graph(TensorProto.UINT8, 128, weight_axis=1, q_feeds_relu=True))
    text = str(caught.value)
    assert "QuantizeLinear /Q: zero point must be a constant int8 tensor" in text
    assert "per-channel axis 1 for the weights of Conv /Conv must be 0" in text
    assert "QuantizeLinear /Q must feed DequantizeLinear only; it feeds /Relu_on_int8" in text
    with pytest.raises(TensorRTCompatibilityError, match="zero point must be 0"):
        check_tensorrt_rules(_qdq_graph(TensorProto.INT8, 3, weight_axis=0, q_feeds_relu=False))


def test_the_exported_fused_graph_passes(fused_onnx: Path, fused_onnx_fp16: Path) -> None:
    """Regression: the fused graph used to transpose uint8 before its first Cast and cast to uint8 before
    its last Transpose, which TensorRT's parser refuses; the export now runs this check itself."""
    for path in (fused_onnx, fused_onnx_fp16):
        check_tensorrt_rules(path)
        proto = onnx.load(str(path))
        producers = {out: node for node in proto.graph.node for out in node.output}
        assert all(producers[o.name].op_type == "Cast" for o in proto.graph.output)
        first = [n for n in proto.graph.node if "ihc" in n.input]
        assert first and all(n.op_type == "Cast" for n in first)


def test_export_refuses_to_publish_a_graph_tensorrt_would_refuse(generated_models, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs before the rename: a refused graph never sits under the final name."""
    from deepliif import pipeline

    def old_output_order(y):  # the pre-fix order: cast to uint8, then transpose
        scaled = (y.float() + 1) / 2 * 255
        return scaled.clamp(0, 255).to(pipeline.torch.uint8).permute(0, 2, 3, 1).contiguous()

    monkeypatch.setattr(pipeline, "to_uint8_image", old_output_order)
    target = tmp_path / "deepliif.onnx"
    with pytest.raises(TensorRTCompatibilityError, match="must come straight from a Cast"):
        export_pipeline(load_model_dir(generated_models[Layout.CHECKPOINT]), target, OnnxExportConfig())
    assert not target.exists() and not list(tmp_path.iterdir())
