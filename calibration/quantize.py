"""INT8 Q/DQ ONNX of the fused pipeline, in the form TensorRT's explicit quantization wants.

TensorRT ≥ 10 (and 11 only) takes INT8 from QuantizeLinear/DequantizeLinear pairs in the graph: symmetric
scales (zero point 0), per-channel weight scales, Q/DQ in front of the layers that should run in INT8.
ONNX Runtime's static quantizer writes exactly that and runs the same graph on CPU, so what the accuracy
gate measures here is what a plan built from the file computes (up to kernel rounding).

The floating-point part is fp16 by default (`FloatType.FP16`): the calibrated graph is converted as the
fp16 export is (InstanceNormalization, the input scaling, the Seg average and the uint8 conversion stay
fp32) and its Q/DQ scales become fp16, which QuantizeLinear/DequantizeLinear take from opset 19 (onnx-
tensorrt: QuantizeLinear FP32/FP16/BF16). DequantizeLinear outputs its scale's type, so with fp32 scales
every convolution output and every op between them would run in fp32 and INT8 would be slower than fp16.

What stays in floating point, and why (recorded in `quantization.json`):
- InstanceNormalization (DeepLIIF's per-tile BatchNorm statistics): a reduction whose output feeds every
  later layer; INT8 there would quantize the statistics themselves.
- Everything but Conv/ConvTranspose: Tanh, LeakyReLU, Add, Concat, the in-graph pre/post-processing and
  the Seg average are cheap; the convolutions are ~90% of the time (docs/BENCHMARKS.md profile).
- Optionally (`keep_edge_layers`) each generator's first and last convolution: the image goes in and comes
  out there, so their error is not averaged away by later layers.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from deepliif.errors import ArgumentError, ChoiceEnum
from engine.errors import ExportError

from deepliif.contract import FUSED_GRAPH
from export.fp16 import convert_to_fp16
from export.parser_rules import check_tensorrt_rules

from . import logger

QUANTIZED_OPS = ("Conv", "ConvTranspose")
FP16_QDQ_OPSET = 19  # the first opset whose QuantizeLinear/DequantizeLinear take fp16 scales


class FloatType(ChoiceEnum):
    """The type of what is not INT8: convolution outputs, the ops between them, Q/DQ scales."""

    FP16 = "fp16"  # the fp16 export's types: no fp32 between the INT8 convolutions of a plan
    FP32 = "fp32"  # ONNX Runtime's quantizer as it writes it (every float op in fp32)

    @classmethod
    def choice_name(cls) -> str:
        return "float type"

    def note(self) -> str:
        if self is FloatType.FP32:
            return "InstanceNormalization and all non-convolution ops stay float32"
        return ("non-convolution ops and Q/DQ scales float16; InstanceNormalization, the input scaling, the Seg "
                "average and the uint8 conversion float32")


class CalibrationMethod(ChoiceEnum):
    """How activation ranges are chosen from the calibration tiles."""

    MINMAX = "minmax"          # the observed range: no clipping, coarser steps
    ENTROPY = "entropy"        # KL-optimal clipping of the histogram (TensorRT's classic choice)
    PERCENTILE = "percentile"  # clip at the 99.999th percentile of |x|

    @classmethod
    def choice_name(cls) -> str:
        return "calibration method"

    def onnxruntime_method(self):
        from onnxruntime.quantization import CalibrationMethod as OrtMethod
        return {"minmax": OrtMethod.MinMax, "entropy": OrtMethod.Entropy,
                "percentile": OrtMethod.Percentile}[self.value]


@dataclass(frozen=True)
class QuantizationConfig:
    method: CalibrationMethod = CalibrationMethod.ENTROPY
    keep_edge_layers: bool = True  # first and last convolution of every generator stay in `float_type`
    float_type: FloatType = FloatType.FP16

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", CalibrationMethod.parse(self.method))
        object.__setattr__(self, "float_type", FloatType.parse(self.float_type))
        if not isinstance(self.keep_edge_layers, bool):
            raise ArgumentError(f"keep_edge_layers must be true or false; got {self.keep_edge_layers!r}")

    def describe(self) -> dict:
        return {"method": self.method.value, "format": "QDQ", "activations": "int8 symmetric per-tensor",
                "weights": "int8 symmetric per-channel", "bias": f"{self.float_type.value} (not quantized)",
                "quantized_ops": list(QUANTIZED_OPS), "float_type": self.float_type.value,
                "float_ops": self.float_type.note(), "keep_edge_layers": self.keep_edge_layers}


class _TileReader:
    """Feeds the calibration tiles to the quantizer (the fused graph takes uint8 NHWC), one range of
    tiles per pass: with a stride of 1 the calibrator holds one tile's activations at a time (several
    GB for the full-size model) instead of every tile's."""

    def __init__(self, tiles: np.ndarray) -> None:
        self.tiles = tiles
        self._items: Iterator[np.ndarray] = iter(())

    def __len__(self) -> int:
        return len(self.tiles)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._items = iter(self.tiles[start_index:end_index])

    def get_next(self) -> dict | None:
        tile = next(self._items, None)
        return None if tile is None else {FUSED_GRAPH.input_name: tile[None]}


def edge_convolutions(model: onnx.ModelProto) -> list[str]:
    """Names of the convolutions nearest each generator's image input and output.

    First layers: walking up from the convolution through non-convolution ops reaches the graph input
    or a Tanh (a generated image feeding a segmentation generator). Last layers: walking down reaches a
    Tanh before any other convolution.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_inputs = {i.name for i in model.graph.input}

    def reaches(start: list[str], step, is_target) -> bool:
        seen, stack = set(), list(start)
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node, names in step(tensor):
                if is_target(node, tensor):
                    return True
                if node is not None and node.op_type not in QUANTIZED_OPS:
                    stack.extend(names)
        return False

    def up(tensor: str):
        node = producers.get(tensor)
        return [(node, list(node.input) if node else [])]

    def down(tensor: str):
        return [(node, list(node.output)) for node in consumers.get(tensor, [])]

    def is_source(node, tensor) -> bool:
        return (node is None and tensor in graph_inputs) or (node is not None and node.op_type == "Tanh")

    edges = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if reaches(node.input[:1], up, is_source) or \
                reaches(list(node.output), down, lambda n, _: n is not None and n.op_type == "Tanh"):
            edges.append(node.name)
    return edges


def quantize_int8(fp32_onnx: Path, out_path: Path, tiles: np.ndarray, config: QuantizationConfig) -> dict:
    """Write the Q/DQ INT8 graph to `out_path`; returns what was quantized and what was kept in float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    if tiles.ndim != 4 or len(tiles) == 0:
        raise ArgumentError(f"calibration needs a non-empty [N, 512, 512, 3] batch; got shape {tiles.shape}")
    model = onnx.load(str(fp32_onnx), load_external_data=False)
    excluded = edge_convolutions(model) if config.keep_edge_layers else []
    convolutions = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    del model
    logger.info("quantizing %d of %d convolutions to INT8 (%s calibration on %d tiles)",
                len(convolutions) - len(excluded), len(convolutions), config.method.value, len(tiles))
    options = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
               "CalibStridedMinMax": 1}  # one tile per calibration pass, whatever the method
    try:
        quantize_static(str(fp32_onnx), str(out_path), _TileReader(tiles), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                        calibrate_method=config.method.onnxruntime_method(), extra_options=options)
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"INT8 quantization of {fp32_onnx} failed: {exc}") from exc
    if config.float_type is FloatType.FP16:
        onnx.save(with_fp16_floats(onnx.load(str(out_path))), str(out_path))
    check_tensorrt_rules(out_path)  # Q/DQ placement and the uint8 boundary, before any gate time is spent
    return {**config.describe(), "convolutions": len(convolutions),
            "int8_convolutions": len(convolutions) - len(excluded), "float_convolutions": excluded}


def _generator_or_its_quantization(node: onnx.NodeProto) -> bool:
    """The generators' nodes, and the Q/DQ nodes the quantizer adds for them (named after the tensor they
    quantize: "/translators.…" for activations, "translators.…" for weights)."""
    return node.name.lstrip("/").startswith(("translators.", "segmenters."))


def with_fp16_floats(model: onnx.ModelProto) -> onnx.ModelProto:
    """The calibrated Q/DQ graph with the fp16 export's types and fp16 scales (opset 19), in place."""
    convert_to_fp16(model, _generator_or_its_quantization)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, FP16_QDQ_OPSET)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the fp16 form of the INT8 graph is not valid ONNX: {exc}") from exc
    return model
