"""`deepliif-engine export onnx | tensorrt | triton`."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from calibration.gate import require_passed
from deepliif.errors import ValidationError
from deepliif.imageio import prepare_out_dir

from .config import OnnxExportConfig, Precision, Tolerance
from .tensorrt_build import METADATA_FILE, PLAN_FILE, TensorRTBuildConfig, build_plan
from .triton import TritonConfig, write_repository
from .validate import format_report, parse_batch_sizes


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="ONNX, TensorRT plans and Triton repositories from a model")
    kinds = export.add_subparsers(dest="export_kind", required=True)

    onnx = kinds.add_parser("onnx", help="fused pipeline ONNX, validated against PyTorch")
    onnx.add_argument("--model-dir", type=Path, required=True)
    onnx.add_argument("--out", type=Path, required=True)
    onnx.add_argument("--opset", type=int, default=OnnxExportConfig.opset)
    onnx.add_argument("--precision", choices=[Precision.FP32.value, Precision.FP16.value], default="fp32")
    onnx.add_argument("--per-generator", action="store_true", help="also one ONNX per generator (debugging)")
    onnx.add_argument("--images", type=Path, nargs="+", help="IHC images to validate on "
                      "(default: ../shared/data/ihc)")
    onnx.add_argument("--validation-tiles", type=int, default=4)
    onnx.add_argument("--validation-batch-sizes", type=parse_batch_sizes, default=(1, 4))
    onnx.add_argument("--max-abs", type=int, help="tolerance override, grey levels")
    onnx.add_argument("--min-psnr", type=float, help="tolerance override, dB")
    onnx.add_argument("--max-percent-pos-delta", type=float, help="tolerance override, percentage points")
    onnx.set_defaults(handler=cmd_export_onnx)

    trt = kinds.add_parser("tensorrt", help="TensorRT plan + engine.json from the fused ONNX")
    trt.add_argument("--onnx", type=Path, required=True)
    trt.add_argument("--out", type=Path, required=True)
    trt.add_argument("--min-batch", type=int, default=1)
    trt.add_argument("--opt-batch", type=int, default=8)
    trt.add_argument("--max-batch", type=int, default=16)
    trt.add_argument("--workspace-gib", type=float, default=8.0)
    trt.add_argument("--timing-cache", type=Path)
    trt.add_argument("--version-compatible", action="store_true")
    trt.add_argument("--force-ungated", action="store_true", help="build from an int8/fp16 ONNX whose "
                     "accuracy gate (accuracy.json beside it, from `calibrate`) is missing or failed")
    trt.set_defaults(handler=cmd_export_tensorrt)

    triton = kinds.add_parser("triton", help="a Triton model repository serving the ONNX or the plan")
    triton.add_argument("--onnx", type=Path)
    triton.add_argument("--plan", type=Path, help=f"a {PLAN_FILE} with its {METADATA_FILE} beside it")
    triton.add_argument("--out", type=Path, required=True)
    triton.add_argument("--name", default=TritonConfig.name)
    triton.add_argument("--max-batch-size", type=int, default=TritonConfig.max_batch_size)
    triton.add_argument("--instances", type=int, default=1)
    triton.set_defaults(handler=cmd_export_triton)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .workflow import ValidationPlan, export_onnx, tiles_for_validation, tolerance_from_args  # torch
    config = OnnxExportConfig(opset=args.opset, precision=Precision.parse(args.precision),
                              per_generator=args.per_generator)
    tolerance = tolerance_from_args(args.max_abs, args.min_psnr, args.max_percent_pos_delta,
                                    Tolerance.for_precision(config.precision))
    sizes = args.validation_batch_sizes
    tiles, source = tiles_for_validation(max(args.validation_tiles, max(sizes)), args.images)
    plan = ValidationPlan(tiles, source, sizes, tolerance)
    start = time.perf_counter()
    try:
        result = export_onnx(args.model_dir, args.out, config, plan, quiet=args.quiet)
    except ValidationError as exc:
        print(format_report(exc.report))
        raise
    print(format_report(result["validation"]))
    print(f"wrote {result['onnx']['path']} ({result['onnx']['size_bytes'] / 2**20:.1f} MiB, opset "
          f"{config.opset}, {config.precision.value}); export {result['timings']['export_seconds']:.1f} s, "
          f"validation {result['timings']['validation_seconds']:.1f} s, total {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export_tensorrt(args: argparse.Namespace) -> int:
    config = TensorRTBuildConfig(args.min_batch, args.opt_batch, args.max_batch, args.workspace_gib,
                                 args.version_compatible, args.timing_cache)
    out = prepare_out_dir(args.out)

    def gate(path: Path, precision: Precision) -> None:
        if precision is not Precision.FP32:
            require_passed(path, args.force_ungated)

    metadata = build_plan(args.onnx, out, config, gate)
    print(json.dumps(metadata.__dict__, indent=2))
    print(f"wrote {out / PLAN_FILE} and {out / METADATA_FILE} in {metadata.build_seconds:.1f} s")
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    config = TritonConfig(name=args.name, max_batch_size=args.max_batch_size, instances=args.instances)
    model = write_repository(args.out, config, onnx_path=args.onnx, plan_path=args.plan)
    print(f"wrote Triton model {model}/ (config.pbtxt, 1/); serve with: tritonserver --model-repository "
          f"{args.out}")
    return 0
