"""fp32 ONNX -> fp16 ONNX, keeping in fp32 what must stay fp32: the input normalisation, every
normalisation layer's statistics, the Seg average and the conversion back to uint8.

Converting at the graph level (instead of tracing a half-precision PyTorch module) takes seconds; tracing
runs the model, and half-precision convolutions on a CPU took over five minutes for the full-size model.
The result has the same semantics as `FusedPipeline(compute_dtype=float16)`:

- the fp16 region is the generators' nodes (chosen by `in_region`); inside it, float weights and float
  constants become fp16 and float Cast targets become fp16;
- InstanceNormalization stays fp32 inside the region (statistics over 512x512 overflow fp16): its input
  is cast up and its output cast back down;
- everything outside the region (uint8 -> [-1, 1] input scaling, the weighted Seg average, the
  conversion to uint8) stays fp32, with casts where tensors cross the boundary. I/O types never change.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_ISLANDS = ("InstanceNormalization",)


def generators_region(node: onnx.NodeProto) -> bool:
    """In the fused graph, torch names every generator node after its module path."""
    return node.name.startswith(("/translators.", "/segmenters."))


def whole_graph(node: onnx.NodeProto) -> bool:
    return True


class _Converter:
    def __init__(self, model: onnx.ModelProto, in_region: Callable[[onnx.NodeProto], bool]) -> None:
        self.model = model
        self.graph = model.graph
        self.in_region = in_region
        self.float_tensors = _float_tensors(model)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.constants = {n.output[0]: n for n in self.graph.node
                          if n.op_type == "Constant" and n.output[0] in self.float_tensors}
        self.producer_is_fp16: dict[str, bool] = {}
        self.casts: dict[tuple[str, int], str] = {}
        self.new_initializers: dict[str, TensorProto] = {}
        self.nodes: list[onnx.NodeProto] = []

    def is_fp16_node(self, node: onnx.NodeProto) -> bool:
        return self.in_region(node) and node.op_type not in FP32_ISLANDS and node.op_type != "Constant"

    def run(self) -> onnx.ModelProto:
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output[0] in self.constants:
                self.nodes.append(node)  # kept for fp32 users; fp16 users get an fp16 copy
                continue
            fp16 = self.is_fp16_node(node)
            for index, name in enumerate(node.input):
                if name in self.float_tensors:
                    node.input[index] = self._as(name, TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT)
            if fp16 and node.op_type == "Cast":
                for attribute in node.attribute:
                    if attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                        attribute.i = TensorProto.FLOAT16
            for name in node.output:
                if name in self.float_tensors:
                    self.producer_is_fp16[name] = fp16
            self.nodes.append(node)
        self._fix_graph_outputs()
        self._replace_graph()
        return self.model

    def _as(self, name: str, dtype: int) -> str:
        """The name of `name` in `dtype`: itself, an fp16 copy of a weight, or a Cast inserted here."""
        is_fp16 = self.producer_is_fp16.get(name, False)
        if (dtype == TensorProto.FLOAT16) == is_fp16:
            return name
        if dtype == TensorProto.FLOAT16 and (name in self.initializers or name in self.constants):
            return self._fp16_weight(name)
        key = (name, dtype)
        if key not in self.casts:
            cast_name = f"{name}__as_{'fp16' if dtype == TensorProto.FLOAT16 else 'fp32'}"
            self.nodes.append(helper.make_node("Cast", [name], [cast_name], name=cast_name, to=dtype))
            self.casts[key] = cast_name
        return self.casts[key]

    def _fp16_weight(self, name: str) -> str:
        copy_name = f"{name}__fp16"
        if copy_name not in self.new_initializers:
            if name in self.initializers:
                value = numpy_helper.to_array(self.initializers[name])
            else:
                value = numpy_helper.to_array(self.constants[name].attribute[0].t)
            self.new_initializers[copy_name] = numpy_helper.from_array(value.astype(np.float16), copy_name)
        return copy_name

    def _fix_graph_outputs(self) -> None:
        for output in self.graph.output:
            if self.producer_is_fp16.get(output.name):
                inner = f"{output.name}__fp16"
                for node in self.nodes:
                    node.output[:] = [inner if o == output.name else o for o in node.output]
                    node.input[:] = [inner if i == output.name else i for i in node.input]
                self.nodes.append(helper.make_node("Cast", [inner], [output.name], name=f"{output.name}__cast",
                                                   to=TensorProto.FLOAT))

    def _replace_graph(self) -> None:
        used = {i for node in self.nodes for i in node.input} | {o.name for o in self.graph.output}
        nodes = [n for n in self.nodes if n.op_type != "Constant" or n.output[0] in used]
        weights = [t for t in self.graph.initializer if t.name in used]
        weights += [t for name, t in self.new_initializers.items() if name in used]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        del self.graph.initializer[:]
        self.graph.initializer.extend(weights)
        del self.graph.value_info[:]  # fp32 types are stale; shape inference recomputes them


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    values = list(graph.value_info) + list(graph.input) + list(graph.output)
    names = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    names |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value" \
                and node.attribute[0].t.data_type == TensorProto.FLOAT:
            names.add(node.output[0])
    return names


def convert_to_fp16(model: onnx.ModelProto,
                    in_region: Callable[[onnx.NodeProto], bool] = generators_region) -> onnx.ModelProto:
    """Convert `model` in place and return it."""
    return _Converter(model, in_region).run()
