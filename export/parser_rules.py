"""The documented constraints of TensorRT's ONNX parser, checked on a graph before TensorRT ever sees it.

No machine here has TensorRT, so a graph that its parser refuses would only fail on the deployment's
GPU, at kernel start. Every graph that `export onnx`, `calibrate` or the artifact cache produces, and
every graph `export tensorrt` is given, passes through `check_tensorrt_rules`, which collects every
violation and raises one error naming the offending nodes. The rules and where they are documented:

- Opset: TensorRT 10 parses opsets 9 to 20 (onnx-tensorrt docs/operators.md); TensorRT 11 parses those too.
  Only the default ONNX domain: ops of other domains (com.microsoft, ...) need plugins.
- Operators: only those that operators.md lists as supported ("Y").
- uint8: "UINT8 is only supported as network input or output tensor types" (operators.md); the
  ModelImporter refuses "UINT8 types for intermediate tensors" (NVIDIA/TensorRT issue 3985). A uint8 graph
  input may feed only Cast nodes, a uint8 graph output must come straight from a Cast, and no other
  tensor may be uint8.
- Explicit quantization (TensorRT developer guide, "Working with Quantized Types"): Q/DQ scales are
  build-time constants and positive, zero points are constant, zero and int8 (an omitted zero point
  means uint8), every QuantizeLinear feeds DequantizeLinear only, and per-channel weight scales lie on
  the output-channel axis of the weights (0 for Conv, 1 for ConvTranspose).
- Shapes: the batch dimension of every input is dynamic (a dim_param) and the other input dimensions
  fixed, so one optimisation profile over the batch covers every call.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from engine.errors import TensorRTCompatibilityError

OPSET_RANGE = (9, 20)
DEFAULT_DOMAINS = ("", "ai.onnx")

# The operators onnx-tensorrt's docs/operators.md marks supported, restricted to those a convolutional
# image-to-image graph (and the exporters and quantizers used here) can produce.
SUPPORTED_OPS = frozenset({
    "Abs", "Add", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "DepthToSpace", "DequantizeLinear", "Div",
    "Dropout", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "HardSigmoid", "Identity", "InstanceNormalization",
    "LayerNormalization", "LeakyRelu", "Less", "Log", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mul",
    "Neg", "Not", "Pad", "Pow", "PRelu", "QuantizeLinear", "Range", "Reciprocal", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "Relu", "Reshape", "Resize", "Round", "Selu", "Shape", "Sigmoid",
    "Sign", "Slice", "Softmax", "Softplus", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh",
    "Tile", "TopK", "Transpose", "Unsqueeze", "Upsample", "Where",
})

# output element type of ops whose result type is not their first input's
_FIXED_OUTPUT_TYPES = {"Shape": TensorProto.INT64, "Size": TensorProto.INT64, "ArgMax": TensorProto.INT64,
                       "ArgMin": TensorProto.INT64, "NonZero": TensorProto.INT64, "Equal": TensorProto.BOOL,
                       "Greater": TensorProto.BOOL, "Less": TensorProto.BOOL, "Not": TensorProto.BOOL}
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}  # output channels of the weight tensor


@dataclass
class _Graph:
    """What the rules need of a graph: producers, consumers, constants and each tensor's element type."""

    proto: onnx.ModelProto
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, proto: onnx.ModelProto) -> _Graph:
        graph = cls(proto)
        for tensor in proto.graph.initializer:
            graph.constants[tensor.name] = tensor
            graph.types[tensor.name] = tensor.data_type
        for value in proto.graph.input:
            graph.types[value.name] = value.type.tensor_type.elem_type
        for node in proto.graph.node:  # nodes are topologically sorted (an onnx.checker rule)
            for name in node.input:
                graph.consumers[name].append(node)
            for name in node.output:
                graph.producers[name] = node
            graph._infer_types(node)
        return graph

    def _infer_types(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                self.constants[node.output[0]] = value
                self.types[node.output[0]] = value.data_type
            return
        if node.op_type == "Cast":
            out_type = next(a.i for a in node.attribute if a.name == "to")
        elif node.op_type == "QuantizeLinear":
            zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
            out_type = self.types.get(zero_point, TensorProto.UINT8) if zero_point else TensorProto.UINT8
        elif node.op_type == "DequantizeLinear":
            out_type = self.types.get(node.input[1], TensorProto.FLOAT)
        else:
            out_type = _FIXED_OUTPUT_TYPES.get(node.op_type, self.types.get(node.input[0]) if node.input else None)
        for name in node.output:
            if out_type is not None:
                self.types[name] = out_type

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


def check_tensorrt_rules(model: onnx.ModelProto | Path | str, where: Path | str | None = None) -> None:
    """Raise TensorRTCompatibilityError listing every rule the graph breaks, with node names. `where`
    names a graph passed already loaded (as `check_onnx(path, [check_tensorrt_rules])` does)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    where = where if where is not None else (None if isinstance(model, onnx.ModelProto) else model)
    graph = _Graph.of(proto)
    problems = (_opset_problems(proto) + _operator_problems(proto) + _uint8_problems(graph)
                + _quantization_problems(graph) + _batch_problems(proto))
    if problems:
        prefix = f"{where}: " if where is not None else ""
        raise TensorRTCompatibilityError(f"{prefix}TensorRT's ONNX parser would refuse this graph: "
                                         + "; ".join(problems), problems)


def _names(nodes) -> str:
    names = [n.name or f"<unnamed {n.op_type}>" for n in nodes]
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _opset_problems(proto: onnx.ModelProto) -> list[str]:
    low, high = OPSET_RANGE
    opset = next((o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is None or not low <= opset <= high:
        return [f"opset {opset} is outside TensorRT's supported range {low}-{high}"]
    return []


def _operator_problems(proto: onnx.ModelProto) -> list[str]:
    by_op: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in proto.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            by_op[f"{node.domain}::{node.op_type}"].append(node)
        elif node.op_type not in SUPPORTED_OPS:
            by_op[node.op_type].append(node)
    return [f"unsupported operator {op} at {_names(nodes)}" for op, nodes in sorted(by_op.items())]


def _uint8_problems(graph: _Graph) -> list[str]:
    proto = graph.proto
    inputs = {v.name for v in proto.graph.input if v.type.tensor_type.elem_type == TensorProto.UINT8}
    outputs = {v.name for v in proto.graph.output if v.type.tensor_type.elem_type == TensorProto.UINT8}
    problems = []
    for name in sorted(inputs):
        wrong = [n for n in graph.consumers.get(name, []) if n.op_type != "Cast"]
        if wrong:
            problems.append(f"uint8 input {name} must feed Cast nodes only; it feeds {_names(wrong)}")
    for name in sorted(outputs):
        producer = graph.producers.get(name)
        if producer is None or producer.op_type != "Cast":
            problems.append(f"uint8 output {name} must come straight from a Cast; it comes from "
                            f"{_names([producer]) if producer else 'no node'}")
    intermediate = [graph.producers[name] for name, kind in graph.types.items()
                    if kind == TensorProto.UINT8 and name in graph.producers and name not in outputs]
    if intermediate:
        problems.append(f"uint8 intermediate tensors (TensorRT takes uint8 only at the graph boundary) "
                        f"produced by {_names(intermediate)}")
    return problems


def _quantization_problems(graph: _Graph) -> list[str]:
    problems = []
    for node in graph.proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        problems += _scale_and_zero_point(graph, node)
        if node.op_type == "QuantizeLinear":
            wrong = [n for n in graph.consumers.get(node.output[0], []) if n.op_type != "DequantizeLinear"]
            if wrong:
                problems.append(f"QuantizeLinear {node.name} must feed DequantizeLinear only; it feeds "
                                f"{_names(wrong)}")
        else:
            problems += _weight_axis(graph, node)
    return problems


def _scale_and_zero_point(graph: _Graph, node: onnx.NodeProto) -> list[str]:
    problems = []
    scale = graph.constant(node.input[1])
    if scale is None:
        problems.append(f"{node.op_type} {node.name}: scale {node.input[1]} is not a constant")
    elif not np.all(scale > 0):
        problems.append(f"{node.op_type} {node.name}: scale {node.input[1]} has non-positive values")
    zero_name = node.input[2] if len(node.input) > 2 else ""
    zero = graph.constant(zero_name) if zero_name else None
    if zero is None or graph.types.get(zero_name) != TensorProto.INT8:
        problems.append(f"{node.op_type} {node.name}: zero point must be a constant int8 tensor "
                        "(omitted means uint8, which TensorRT does not quantize to)")
    elif np.any(zero != 0):
        problems.append(f"{node.op_type} {node.name}: zero point must be 0 (TensorRT quantizes symmetrically)")
    return problems


def _weight_axis(graph: _Graph, node: onnx.NodeProto) -> list[str]:
    """A per-channel DequantizeLinear of a weight must scale its consumer's output channels."""
    scale = graph.constant(node.input[1])
    if scale is None or scale.size <= 1:
        return []
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    problems = []
    for consumer in graph.consumers.get(node.output[0], []):
        expected = _WEIGHT_AXIS.get(consumer.op_type)
        if expected is not None and consumer.input[1] == node.output[0] and axis != expected:
            problems.append(f"DequantizeLinear {node.name}: per-channel axis {axis} for the weights of "
                            f"{consumer.op_type} {consumer.name} must be {expected}")
    return problems


def _batch_problems(proto: onnx.ModelProto) -> list[str]:
    """The profile sets the batch dimension of each input; any other dynamic input dimension would need
    its own range. Output shapes TensorRT infers itself."""
    problems = []
    weights = {t.name for t in proto.graph.initializer}  # listed as inputs by old exporters
    for value in proto.graph.input:
        if value.name in weights:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            problems.append(f"input {value.name} has no dynamic batch dimension (dim 0 must be symbolic)")
        elif any(not d.dim_value for d in dims[1:]):
            problems.append(f"input {value.name}: only the batch dimension may be dynamic")
    return problems
