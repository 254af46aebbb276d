"""`deepliif-engine export onnx | tensorrt | triton`."""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from deepliif.errors import ArgumentError
from deepliif.imageio import prepare_out_dir
from engine.errors import ValidationError

from engine.backends.precision import Precision
from .config import OnnxExportConfig, Tolerance
from .tensorrt_build import METADATA_FILE, PLAN_FILE, TensorRTBuildConfig, build_plan
from .triton import TRITON_BACKENDS, InstanceKind, TritonConfig, write_python_repository, write_repository
from .validate import format_report, parse_batch_sizes


# `accuracy_gate(onnx_path, force)`: raises unless a reduced-precision graph passed its accuracy gate. The
# command line hands in calibration's gate, so export never imports calibration (which builds on export).
AccuracyGate = Callable[[Path, bool], object]


def add_export_parser(sub: argparse._SubParsersAction, accuracy_gate: AccuracyGate) -> None:
    export = sub.add_parser("export", help="ONNX, TensorRT plans and Triton repositories from a model")
    kinds = export.add_subparsers(dest="export_kind", required=True)

    onnx = kinds.add_parser("onnx", help="fused pipeline ONNX, validated against PyTorch")
    onnx.add_argument("--model-dir", type=Path, required=True, help="DeepLIIF model directory (either layout)")
    onnx.add_argument("--out", type=Path, required=True, help="output folder: deepliif.onnx, validation.json, "
                      "export.json")
    onnx.add_argument("--opset", type=int, default=OnnxExportConfig.opset, help="ONNX opset (13-20)")
    onnx.add_argument("--precision", choices=[Precision.FP32.value, Precision.FP16.value], default="fp32",
                      help="arithmetic of the generators (I/O stays uint8)")
    onnx.add_argument("--per-generator", action="store_true", help="also one ONNX per generator (debugging)")
    onnx.add_argument("--images", type=Path, nargs="+", help="IHC images to validate on "
                      "(default: ../shared/data/ihc)")
    onnx.add_argument("--validation-tiles", type=int, default=4, help="tiles to validate on")
    onnx.add_argument("--validation-batch-sizes", type=parse_batch_sizes, default=(1, 4),
                      help="comma list of batch sizes to validate at")
    onnx.add_argument("--max-abs", type=int, help="tolerance override, grey levels")
    onnx.add_argument("--min-psnr", type=float, help="tolerance override, dB")
    onnx.add_argument("--max-percent-pos-delta", type=float, help="tolerance override, percentage points")
    onnx.set_defaults(handler=cmd_export_onnx)

    trt = kinds.add_parser("tensorrt", help="TensorRT plan + engine.json from the fused ONNX")
    trt.add_argument("--onnx", type=Path, required=True, help="the fused ONNX (from `export onnx` or `calibrate`)")
    trt.add_argument("--out", type=Path, required=True, help=f"output folder: {PLAN_FILE} and {METADATA_FILE}")
    trt.add_argument("--min-batch", type=int, default=1, help="profile minimum batch")
    trt.add_argument("--opt-batch", type=int, default=8, help="batch the kernels are tuned for")
    trt.add_argument("--max-batch", type=int, default=16, help="profile maximum batch")
    trt.add_argument("--workspace-gib", type=float, default=8.0, help="builder workspace limit, GiB")
    trt.add_argument("--timing-cache", type=Path, help="timing cache file to read and update (one per GPU "
                     "and TensorRT version)")
    trt.add_argument("--version-compatible", action="store_true", help="a plan later TensorRT versions "
                     "can run (10 -> 11); slower")
    trt.add_argument("--force-ungated", action="store_true", help="build from an int8/fp16 ONNX whose "
                     "accuracy gate (accuracy.json beside it, from `calibrate`) is missing or failed")
    trt.set_defaults(handler=cmd_export_tensorrt, accuracy_gate=accuracy_gate)

    triton = kinds.add_parser("triton", help="a Triton model repository serving the ONNX, the plan, or this "
                              "project's session on Triton's Python backend")
    triton.add_argument("--backend", choices=["auto", *TRITON_BACKENDS], default="auto",
                        help="Triton backend: onnxruntime (--onnx), tensorrt (--plan), python (--model-dir: this "
                        "project's Session in model.py); auto: from what is given")
    triton.add_argument("--onnx", type=Path, help="serve this fused ONNX (with --backend python: the graph the "
                        "session serves)")
    triton.add_argument("--plan", type=Path, help=f"a {PLAN_FILE} with its {METADATA_FILE} beside it")
    triton.add_argument("--model-dir", type=Path, help="python backend: the DeepLIIF model directory (copied)")
    triton.add_argument("--session-backend", choices=["auto", "onnxruntime", "tensorrt", "torch"], default="auto",
                        help="python backend: the session's own backend")
    triton.add_argument("--precision", choices=[p.value for p in Precision], default="fp32",
                        help="python backend: the session's precision (int8/fp16 need a gated --onnx)")
    triton.add_argument("--cache-dir", type=Path, help="python backend: the session's artifact cache "
                        "(default: the project's, on the serving machine)")
    triton.add_argument("--instance-kind", choices=[k.value for k in InstanceKind], default="gpu",
                        help="Triton instance group kind (KIND_GPU or KIND_CPU)")
    triton.add_argument("--out", type=Path, required=True, help="model repository folder")
    triton.add_argument("--name", default=TritonConfig.name, help="model name in the repository")
    triton.add_argument("--max-batch-size", type=int, default=TritonConfig.max_batch_size,
                        help="Triton max_batch_size (capped by a plan's profile)")
    triton.add_argument("--instances", type=int, default=1, help="model instances per GPU (or in all, on CPU)")
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
            args.accuracy_gate(path, args.force_ungated)

    metadata = build_plan(args.onnx, out, config, gate)
    print(json.dumps(metadata.__dict__, indent=2))
    print(f"wrote {out / PLAN_FILE} and {out / METADATA_FILE} in {metadata.build_seconds:.1f} s")
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    config = TritonConfig(name=args.name, max_batch_size=args.max_batch_size, instances=args.instances,
                          instance_kind=args.instance_kind)
    backend = args.backend
    if backend == "auto":
        backend = "python" if args.model_dir is not None else "tensorrt" if args.plan is not None else "onnxruntime"
    if backend == "python":
        if args.model_dir is None or args.plan is not None:
            raise ArgumentError("--backend python serves a --model-dir (and optionally its --onnx), not a --plan")
        model = write_python_repository(args.out, config, args.model_dir, onnx_path=args.onnx,
                                        backend=args.session_backend, precision=args.precision,
                                        cache_dir=args.cache_dir)
    else:
        if args.model_dir is not None:
            raise ArgumentError(f"--model-dir is for --backend python; --backend {backend} serves "
                                f"{'--plan' if backend == 'tensorrt' else '--onnx'}")
        model = write_repository(args.out, config, onnx_path=args.onnx if backend == "onnxruntime" else None,
                                 plan_path=args.plan if backend == "tensorrt" else None)
    print(f"wrote Triton model {model}/ (config.pbtxt, 1/); serve with: tritonserver --model-repository "
          f"{args.out}")
    return 0
