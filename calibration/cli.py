"""`deepliif-engine calibrate`: an INT8 (or FP16) graph, gated on cell counts against FP32."""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.errors import AccuracyGateError

from engine.backends.precision import Precision

from .gate import REPORT_FILE, GateThresholds, format_markdown
from .quantize import CalibrationMethod, FloatType, QuantizationConfig
from .tiles import DEFAULT_SEED


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("calibrate", help="INT8 Q/DQ (or FP16) ONNX of the fused pipeline, published only "
                            "if the accuracy gate on held-out images passes")
    parser.add_argument("--model-dir", type=Path, required=True, help="DeepLIIF model directory")
    parser.add_argument("--images", type=Path, nargs="+", required=True, help="IHC images to calibrate on")
    parser.add_argument("--holdout", type=Path, nargs="+", default=(),
                        help="images the gate judges on (default: a seeded half of --images, held out)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: calibration.json, accuracy.json, "
                        "accuracy.md, deepliif.onnx (if the gate passes)")
    parser.add_argument("--precision", choices=[Precision.INT8.value, Precision.FP16.value], default="int8",
                        help="reduced precision to make and gate")
    parser.add_argument("--tiles", type=int, default=32, help="calibration tiles to draw (non-empty ones)")
    parser.add_argument("--method", choices=[m.value for m in CalibrationMethod], default="entropy",
                        help="how activation ranges are chosen")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the tile draw and the hold-out split")
    parser.add_argument("--quantize-edge-layers", action="store_true",
                        help="also quantize each generator's first and last convolution (default: float)")
    parser.add_argument("--float-type", choices=[t.value for t in FloatType], default=FloatType.FP16.value,
                        help="type of what stays float in the INT8 graph (convolution outputs, the ops between "
                        "them, Q/DQ scales): fp16 (opset 19; the fp16 export's types, so a TensorRT plan has no fp32 "
                        "between its INT8 convolutions) or fp32 (the quantizer's own graph)")
    parser.add_argument("--fp32-onnx", type=Path, help="the model's fused fp32 ONNX, if already exported")
    defaults = GateThresholds()
    parser.add_argument("--max-percent-pos-delta", type=_limit, default=defaults.max_percent_pos_delta,
                        help="points, per image ('none' to report only)")
    parser.add_argument("--max-pooled-percent-pos-delta", type=_limit,
                        default=defaults.max_pooled_percent_pos_delta, help="points, all images pooled")
    parser.add_argument("--max-cell-count-delta", type=_limit, default=defaults.max_num_total_delta_ratio,
                        help="fraction of the FP32 cell count, per image (e.g. 0.05)")
    parser.add_argument("--min-psnr", type=_limit, default=defaults.min_psnr, help="dB, every output")
    parser.add_argument("--max-abs", type=_limit, default=defaults.max_abs, help="grey levels, every output")
    parser.set_defaults(handler=cmd_calibrate)


def _limit(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def cmd_calibrate(args: argparse.Namespace) -> int:
    from deepliif.imageio import probe_image
    for path in (*args.images, *args.holdout):  # every input opened before the model loads
        probe_image(path)
    from .workflow import CalibrationPlan, calibrate  # torch: loaded only for this command
    thresholds = GateThresholds(args.max_percent_pos_delta, args.max_pooled_percent_pos_delta,
                                args.max_cell_count_delta, args.min_psnr,
                                None if args.max_abs is None else int(args.max_abs))
    plan = CalibrationPlan(args.model_dir, tuple(args.images), args.out, Precision.parse(args.precision),
                           args.tiles, args.seed, tuple(args.holdout),
                           QuantizationConfig(args.method, keep_edge_layers=not args.quantize_edge_layers,
                                              float_type=args.float_type),
                           thresholds, args.fp32_onnx)
    try:
        report = calibrate(plan)
    except AccuracyGateError as exc:
        print(format_markdown(exc.report))
        raise
    print(format_markdown(report))
    print(f"gate passed: {args.out / 'deepliif.onnx'} (report {args.out / REPORT_FILE}); serve it with "
          f"--precision {args.precision} --onnx {args.out / 'deepliif.onnx'}")
    return 0
