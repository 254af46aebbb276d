"""The fused pipeline (and, for debugging, each generator) written to ONNX and checked.

The export goes to a temporary name beside the target and is renamed only after `onnx.checker` (full
check, with shape inference) has accepted it, so a killed or failed export never leaves a file that looks
complete. The per-sample normalisation exports as InstanceNormalization; a BatchNormalization node in the
result would mean running statistics crept back in, and is refused.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from deepliif.model_dir import DeepLIIFModel
from deepliif.pipeline import NETWORK_TILE, FusedPipeline
from engine.errors import ExportError

from . import logger
from engine.backends.precision import Precision
from deepliif.contract import FUSED_GRAPH
from .config import OnnxExportConfig
from .onnx_checks import OnnxSummary, check_onnx
from .fp16 import convert_to_fp16, generators_region, whole_graph
from .parser_rules import check_tensorrt_rules

GENERATOR_INPUT, GENERATOR_OUTPUT = "input", "output"


def export_pipeline(model: DeepLIIFModel, path: Path, config: OnnxExportConfig) -> OnnxSummary:
    """The fused graph: `ihc` uint8 [batch, 512, 512, 3] -> hema dapi lap2 marker seg, same shape."""
    pipeline = FusedPipeline(model).eval()
    sample = torch.zeros((1, NETWORK_TILE, NETWORK_TILE, 3), dtype=torch.uint8)
    axes = {name: {0: FUSED_GRAPH.batch_axis} for name in (FUSED_GRAPH.input_name, *FUSED_GRAPH.onnx_output_names)}
    transforms = [_declare_output_shapes]
    if config.precision is Precision.FP16:
        transforms.append(lambda proto: convert_to_fp16(proto, generators_region))
    return _export(pipeline, sample, Path(path), [FUSED_GRAPH.input_name], list(FUSED_GRAPH.onnx_output_names), axes, config.opset,
                   transforms)


def _declare_output_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter's own shape inference mislabels the outputs' dims after reflect padding (e.g.
    ['batch', 'batch', ...]); the contract is known, so state it: [batch, 512, 512, 3]."""
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = FUSED_GRAPH.batch_axis
        for size in (NETWORK_TILE, NETWORK_TILE, 3):
            dims.add().dim_value = size
    return proto


def export_generators(model: DeepLIIFModel, out_dir: Path, config: OnnxExportConfig) -> list[OnnxSummary]:
    """One ONNX per generator (`G1.onnx`, `G51.onnx`, ...): float NCHW in [-1, 1] in and out."""
    sample = torch.zeros((1, 3, NETWORK_TILE, NETWORK_TILE))
    axes = {GENERATOR_INPUT: {0: FUSED_GRAPH.batch_axis}, GENERATOR_OUTPUT: {0: FUSED_GRAPH.batch_axis}}
    transforms = []
    if config.precision is Precision.FP16:
        transforms.append(lambda proto: convert_to_fp16(proto, whole_graph))
    return [_export(model.module(name).eval(), sample, Path(out_dir) / f"{name}.onnx", [GENERATOR_INPUT],
                    [GENERATOR_OUTPUT], axes, config.opset, transforms)
            for name in model.names.all]


def _export(module: nn.Module, sample: torch.Tensor, path: Path, inputs: list[str], outputs: list[str],
            axes: dict, opset: int, transforms: Sequence[Callable[[onnx.ModelProto], onnx.ModelProto]]
            ) -> OnnxSummary:
    """Trace to a temporary name, apply the graph transforms, check, then rename into place."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    logger.info("exporting %s (opset %d)", path.name, opset)
    try:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(module, (sample,), str(partial), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
                              **_legacy_exporter_flag())
        if transforms:
            proto = onnx.load(str(partial))
            for transform in transforms:
                proto = transform(proto)
            onnx.save(proto, str(partial))
        summary = check_onnx(partial, [check_tensorrt_rules])  # every export must be one TensorRT can parse
        os.replace(partial, path)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ExportError(f"exporting {path.name} to ONNX failed: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    summary.path = path
    return summary


def _legacy_exporter_flag() -> dict:
    """torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript and renames the per-sample
    normalisation; the TorchScript-based exporter maps it to InstanceNormalization on every torch we run."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter warns about instance_norm's training flag (expected: per-sample statistics are the
    point) and about constant folding; neither is actionable for a user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
