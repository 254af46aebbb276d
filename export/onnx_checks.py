"""What an ONNX file is, checked without PyTorch: the full `onnx.checker` pass, no running statistics,
and the fused pipeline's I/O contract. Exports, the engine and `export tensorrt` all read it."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from deepliif.contract import FUSED_GRAPH
from engine.errors import ArtifactError, ExportError


FORBIDDEN_OPS = ("BatchNormalization",)


@dataclass
class OnnxSummary:
    """What an ONNX file holds: its I/O signature, opset, operator counts and size."""

    path: Path
    opset: int
    inputs: dict[str, tuple[str, list]]  # name -> (element type, shape with symbolic dims as names)
    outputs: dict[str, tuple[str, list]]
    op_counts: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    initializer_types: tuple[str, ...] = ()  # element types of the weights, e.g. ("float16", "float")

    def as_dict(self) -> dict:
        return {"path": str(self.path), "opset": self.opset, "size_bytes": self.size_bytes,
                "inputs": self.inputs, "outputs": self.outputs, "op_counts": self.op_counts,
                "initializer_types": list(self.initializer_types)}


def check_onnx(path: Path, graph_checks: Sequence[Callable[[onnx.ModelProto, Path], None]] = ()) -> OnnxSummary:
    """Full `onnx.checker` pass with shape inference, and no BatchNormalization left. `graph_checks` run
    on the same loaded graph (a fused graph is 1.5 GB: it is parsed once, not once per check)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError, onnx may raise others
        raise ArtifactError(f"{path} is not an ONNX model: {exc}") from exc
    if not proto.graph.node:
        raise ArtifactError(f"{path} is not an ONNX model: it has no graph nodes")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ArtifactError(f"{path} fails the ONNX checker: {exc}") from exc
    ops = Counter(node.op_type for node in proto.graph.node)
    forbidden = sorted(op for op in FORBIDDEN_OPS if ops.get(op))
    if forbidden:
        raise ExportError(f"{path} contains {', '.join(forbidden)}: normalisation with running statistics "
                          "is not DeepLIIF's per-tile inference")
    for check in graph_checks:
        check(proto, path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = tuple(sorted({_type_name(t.data_type) for t in proto.graph.initializer}))
    return OnnxSummary(path, opset, _signature(proto.graph.input), _signature(proto.graph.output),
                       dict(sorted(ops.items())), path.stat().st_size, types)


def _type_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _signature(values) -> dict[str, tuple[str, list]]:
    signature = {}
    for value in values:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        signature[value.name] = (_type_name(tensor.elem_type), dims)
    return signature


def check_fused_signature(summary: OnnxSummary) -> None:
    """Refuse an ONNX that is not the fused pipeline: other backends rely on its exact I/O contract."""
    problems = FUSED_GRAPH.signature_problems(summary.inputs, summary.outputs)
    if problems:
        raise ArtifactError(f"{summary.path} is not a DeepLIIF fused-pipeline ONNX: {'; '.join(problems)}")
