"""`deepliif-engine`: infer, postprocess, demo-model, demo, export, calibrate, bench, serve, package, doctor."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from deepliif.errors import ArgumentError, DeepLIIFError
from deepliif.imageio import (DEFAULT_MAX_PIXELS, expand_inputs, prepare_out_dir, probe_image, read_image,
                             write_json, write_png)
from deepliif.inference import InferenceOptions, OutputSet, check_working_size, tile_count
from deepliif.model_files import Layout
from deepliif.postprocessing import DEFAULT_SEG_THRESH, PostprocessOptions, postprocess
from deepliif.tiling import TILE_SIZE_MAX, TILE_SIZE_MIN

from calibration.cli import add_calibrate_parser
from export.cli import add_export_parser
from engine.backends.precision import Precision

from .backends import BackendKind
from .edi.cli import add_edi_parsers
from .session import Session
from .samples import benchmark_tiles, sample_images, synthetic_ihc

logger = logging.getLogger("engine")

if TYPE_CHECKING:  # torch-heavy; imported by the commands that use them
    from .bench import BenchCase

DEMO_MODEL_DIR = Path(".demo-model")


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], so a bad value is refused, naming the flag as typed,
    before any model is loaded."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'between {low} and {high}' if high else f'at least {low}'}; "
                                             f"got {value}")
        return value
    return parse


_tile_size = _int_in(TILE_SIZE_MIN, TILE_SIZE_MAX)
_positive = _int_in(1)


def _output_set(text: str) -> OutputSet:
    try:
        return OutputSet.parse(text)
    except DeepLIIFError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _threshold(value: str) -> int | str:
    if value == "default":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'default', got {value!r}") from None


def _add_postprocess_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seg-thresh", type=int, default=DEFAULT_SEG_THRESH, help="Seg grey level that makes a "
                        "pixel part of a cell")
    parser.add_argument("--size-thresh", type=_threshold, default="default", help="smallest cell in pixels: N, or "
                        "'default' (DeepLIIF's automatic threshold)")
    parser.add_argument("--size-thresh-upper", type=int, default=None, help="largest cell in pixels (none: no limit)")
    parser.add_argument("--marker-thresh", type=_threshold, default=None, help="Marker grey level for a positive "
                        "cell: N, 'default' (automatic), or none (DeepLIIF's colour rule)")


def _postprocess_options(args: argparse.Namespace) -> PostprocessOptions:
    return PostprocessOptions(seg_thresh=args.seg_thresh, size_thresh=args.size_thresh,
                              size_thresh_upper=args.size_thresh_upper, marker_thresh=args.marker_thresh)


def _add_backend_args(parser: argparse.ArgumentParser, default_backend: str = "auto") -> None:
    parser.add_argument("--backend", choices=[k.value for k in BackendKind], default=default_backend,
                        help="engine backend; auto tries the fastest that works here")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="fp32",
                        help="arithmetic of the generators (int8 needs --onnx from `calibrate`)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    parser.add_argument("--cache-dir", type=Path, help="artifact cache (default: $REDHARE_MODEL_PATH/"
                        ".engine-cache in WMLA, else the user cache dir)")
    parser.add_argument("--batch-size", type=_positive, help="tiles per backend call (default: from free "
                        "device memory on GPU, 4 on CPU)")
    parser.add_argument("--onnx", type=Path, help="serve this fused ONNX (from `calibrate` or `export onnx`) "
                        "instead of exporting one; int8 needs one")
    parser.add_argument("--force-ungated", action="store_true",
                        help="serve an int8/fp16 graph whose accuracy gate is missing or failed (not advised)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tile-size", type=_tile_size, default=512, help="tile size in image pixels (64-4096); "
                        "tiles are resized to 512 for the networks")
    parser.add_argument("--outputs", type=_output_set, default="all", help="which images to write: all, "
                        "modalities, seg_masks, or one image (Hema, DAPI, Lap2, Marker, Seg, SegOverlaid, SegRefined)")
    parser.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS, help="refuse larger images "
                        "before decoding them")
    _add_postprocess_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepliif-engine", description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    infer = sub.add_parser("infer", help="run DeepLIIF on images")
    infer.add_argument("--model-dir", type=Path, required=True, help="DeepLIIF model directory (either layout)")
    infer.add_argument("--out", type=Path, required=True, help="output folder: <stem>_<Name>.png and <stem>.json")
    infer.add_argument("images", type=Path, nargs="+", help="IHC image files or folders of them")
    _add_run_args(infer)
    _add_backend_args(infer)
    infer.set_defaults(handler=cmd_infer)

    post = sub.add_parser("postprocess", help="re-score existing Seg/Marker outputs without the model")
    post.add_argument("--image", type=Path, required=True, help="the IHC image")
    post.add_argument("--seg", type=Path, required=True, help="its Seg output")
    post.add_argument("--marker", type=Path, help="its Marker output (needed for --marker-thresh)")
    post.add_argument("--tile-size", type=_tile_size, default=512, help="tile size the outputs were made with")
    post.add_argument("--out", type=Path, required=True, help="output folder")
    _add_postprocess_args(post)
    post.set_defaults(handler=cmd_postprocess)

    demo_model = sub.add_parser("demo-model", help="write a DeepLIIF directory with random weights")
    demo_model.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    demo_model.add_argument("--layout", choices=[layout.value for layout in Layout], default="torchscript",
                            help="released TorchScript files or a training checkpoint")
    demo_model.add_argument("--ngf", type=int, default=64, help="generator width (64 is the real size)")
    demo_model.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    demo_model.set_defaults(handler=cmd_demo_model)

    demo = sub.add_parser("demo", help="infer on the sample tiles (or a generated image) end to end")
    demo.add_argument("--model-dir", type=Path, help=f"default: a random-weight model in {DEMO_MODEL_DIR}/")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    demo.add_argument("--ngf", type=int, default=64, help="width of the generated demo model")
    demo.add_argument("--edi", action="store_true", help="then a request/response round trip through kernel.py "
                      "behind the local EDI endpoint")
    _add_backend_args(demo, default_backend="torch")
    demo.set_defaults(handler=cmd_demo)

    add_export_parser(sub)
    add_calibrate_parser(sub)
    add_edi_parsers(sub)

    bench = sub.add_parser("bench", help="DeepLIIF way vs backends x precisions x batch sizes, same run")
    bench.add_argument("--model-dir", type=Path, help="default: a full-size random-weight model")
    bench.add_argument("--backends", default="torch,onnxruntime", help="comma list, or 'all'")
    bench.add_argument("--precision", default="fp32", help="comma list of fp32,fp16,int8")
    bench.add_argument("--batch-sizes", default="1,4", help="comma list")
    bench.add_argument("--tiles", type=int, default=4, help="tiles per configuration")
    bench.add_argument("--image", type=Path, help="take tiles from this image instead of the sample tiles")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    bench.add_argument("--cache-dir", type=Path, help="artifact cache (default: a temporary one)")
    bench.add_argument("--int8-onnx", type=Path, help="the gated Q/DQ ONNX from `calibrate` for int8 cases")
    bench.add_argument("--channels-last", action="store_true", help="torch cases: channels_last layout")
    bench.add_argument("--cuda-graphs", action="store_true", help="torch cases on CUDA: graph replay")
    bench.add_argument("--json", type=Path, help="also write the report as JSON here")
    bench.add_argument("--plot", type=Path, help="also draw the speed-ups to this PNG (needs matplotlib)")
    bench.add_argument("--end-to-end", type=int, metavar="SIZE", help="instead: one SIZE x SIZE mosaic of the "
                       "tiles (or --image itself) through every stage, on the first backend and batch size")
    bench.add_argument("--whole-process", action="store_true", help="instead: `infer` on --image as a whole "
                       "process (warm cache, first backend) vs the DeepLIIF way's process, interleaved")
    bench.add_argument("--repeats", type=int, default=2, help="--whole-process pairs of runs (default 2)")
    bench.set_defaults(handler=cmd_bench)

    doctor = sub.add_parser("doctor", help="the first command on a new machine: versions, GPUs, providers, "
                            "and one tile through every backend x precision that can run here")
    doctor.add_argument("--model-dir", type=Path, help="check with this model (default: a small generated one)")
    doctor.add_argument("--json", type=Path, help="also write the report as JSON here")
    doctor.set_defaults(handler=cmd_doctor)
    _finish_subcommands(parser)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one to show (not for required, unset or on/off options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help or ""
        return super()._get_help_string(action)


def _version() -> str:
    try:
        return importlib.metadata.version("deepliif-engine")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _finish_subcommands(parser: argparse.ArgumentParser) -> None:
    """Every command shows its defaults in --help and takes -q after its name as well as before."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in action.choices.values():
            sub.formatter_class = _HelpFormatter
            if not any("-q" in a.option_strings for a in sub._actions):
                sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                 help="only warnings and errors")
            _finish_subcommands(sub)


def check_inputs(images: list[Path], tile_size: int, max_pixels: int) -> tuple[list[Path], int]:
    """Every input opened (header only) before any model loads: the files, and the tiles they hold."""
    files = expand_inputs(images)
    total = 0
    for path in files:
        width, height = probe_image(path, max_pixels)
        check_working_size(width, height, tile_size, max_pixels, str(path))
        total += tile_count(width, height, tile_size)
    return files, total


def infer_files(session: Session, images: list[Path], out: Path, options: InferenceOptions,
                max_pixels: int = DEFAULT_MAX_PIXELS, quiet: bool = False, total_tiles: int | None = None
                ) -> list[Path]:
    """Infer each image and write `OUT/<stem>_<Name>.png` and `OUT/<stem>.json`; returns the JSON paths.
    One progress bar runs over the tiles of all images."""
    prepare_out_dir(out)
    written = []
    with tqdm(total=total_tiles, unit="tile", desc="tiles", disable=quiet, file=sys.stderr) as bar:
        for path in images:
            bar.set_postfix_str(path.name)
            written.append(_infer_file(session, path, out, options, max_pixels, bar.update))
    return written


def _infer_file(session: Session, path: Path, out: Path, options: InferenceOptions, max_pixels: int,
                progress) -> Path:
    start = time.perf_counter()
    image = read_image(path, max_pixels=max_pixels)
    decoded = time.perf_counter()
    (result,) = session.infer_many([image], options, progress=progress)
    encode_start = time.perf_counter()
    for name, array in result.images.items():
        write_png(out / f"{path.stem}_{name}.png", array)
    timings = {"decode_seconds": decoded - start, **result.timings,
               "encode_seconds": time.perf_counter() - encode_start}
    record = {"image": str(path), "model": session.files.describe(), "startup_seconds": session.startup,
              "backend": session.info.as_dict(), "tile_size": options.tile_size, "batch_size": options.batch_size,
              "tiles": result.tiles, "empty_tiles": result.empty_tiles, "outputs": list(result.images),
              "scoring": result.scoring, "timings": timings}
    write_json(out / f"{path.stem}.json", record)
    logger.info("%s: %s", path.name, json.dumps(result.scoring))
    return out / f"{path.stem}.json"


def _open_session(args: argparse.Namespace, model_dir: Path) -> Session:
    return Session(model_dir, backend=args.backend, precision=args.precision, device=args.device,
                   cache_dir=args.cache_dir, batch_size=args.batch_size, onnx=args.onnx,
                   force_ungated=args.force_ungated)


def cmd_infer(args: argparse.Namespace) -> int:
    images, total = check_inputs(args.images, args.tile_size, args.max_pixels)
    postprocess_options = _postprocess_options(args)
    with _open_session(args, args.model_dir) as session:
        options = InferenceOptions(tile_size=args.tile_size, batch_size=args.batch_size or session.batch_size,
                                   outputs=OutputSet.parse(args.outputs), postprocess=postprocess_options)
        infer_files(session, images, args.out, options, args.max_pixels, args.quiet, total)
    print(f"results in {args.out}/")
    return 0


def cmd_postprocess(args: argparse.Namespace) -> int:
    image = read_image(args.image)
    seg = read_image(args.seg)
    marker = read_image(args.marker) if args.marker else None
    start = time.perf_counter()
    result = postprocess(image, seg, marker, args.tile_size, _postprocess_options(args))
    out = prepare_out_dir(args.out)
    stem = args.image.stem
    write_png(out / f"{stem}_SegOverlaid.png", result.overlaid)
    write_png(out / f"{stem}_SegRefined.png", result.refined)
    write_json(out / f"{stem}.json", {"image": str(args.image), "seg": str(args.seg),
                                         "marker": str(args.marker) if args.marker else None,
                                         "scoring": result.scoring,
                                         "timings": {"postprocess_seconds": time.perf_counter() - start}})
    print(json.dumps(result.scoring))
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from deepliif.demo import write_demo_model
    path = write_demo_model(args.out, Layout(args.layout), ngf=args.ngf, seed=args.seed)
    print(f"wrote a DeepLIIF model with RANDOM weights (ngf {args.ngf}, {args.layout} layout) to {path}/")
    return 0


def _demo_model(ngf: int) -> Path:
    directory = DEMO_MODEL_DIR / f"ngf{ngf}"
    if not directory.is_dir():
        logger.warning("creating a demo model with RANDOM weights in %s (plumbing and speed only)", directory)
        from deepliif.demo import write_demo_model
        write_demo_model(directory, Layout.TORCHSCRIPT, ngf=ngf)
    return directory


def cmd_demo(args: argparse.Namespace) -> int:
    model_dir = args.model_dir or _demo_model(args.ngf)
    images = sample_images()
    if not images:
        generated = args.out / "generated_ihc.png"
        prepare_out_dir(args.out)
        write_png(generated, synthetic_ihc(1024, 1024))
        images = [generated]
        logger.warning("no sample tiles found; using a generated image %s", generated)
    images, total = check_inputs(images, 512, DEFAULT_MAX_PIXELS)
    with _open_session(args, Path(model_dir)) as session:
        options = InferenceOptions(batch_size=args.batch_size or session.batch_size)
        records = infer_files(session, images, args.out, options, quiet=args.quiet, total_tiles=total)
    if args.model_dir is None:
        print("NOTE: the demo model has RANDOM weights: images and counts are meaningless; "
              "this shows plumbing and speed.")
    for record in records:
        print(f"  {record}")
    print(f"demo results in {args.out.resolve()}/ ({len(records)} images, PNGs and JSON per image)")
    if args.edi:
        from .edi.demo import round_trip
        for line in round_trip(Path(model_dir), images[0], args.out / "edi", args.cache_dir, args.backend,
                               args.device):
            print(line)
    return 0


def _csv(text: str, parse, what: str) -> list:
    try:
        return [parse(part.strip()) for part in text.split(",") if part.strip()]
    except (ValueError, DeepLIIFError) as exc:
        raise ArgumentError(f"--{what}: {exc}") from None


def bench_cases(args: argparse.Namespace) -> list[BenchCase]:
    from .bench import BenchCase
    kinds = [k for k in BackendKind if k is not BackendKind.AUTO] if args.backends == "all" else \
        _csv(args.backends, BackendKind.parse, "backends")
    precisions = _csv(args.precision, Precision.parse, "precision")
    sizes = _csv(args.batch_sizes, int, "batch-sizes")
    if not kinds or not precisions or not sizes or min(sizes) < 1 or args.tiles < max(sizes):
        raise ArgumentError("need at least one backend, precision and batch size, batch sizes >= 1, and "
                            f"--tiles ({args.tiles}) at least the largest batch size")
    switches = (("channels_last", args.channels_last), ("cuda_graphs", args.cuda_graphs))
    torch_options = tuple(item for item in switches if item[1])
    if Precision.INT8 in precisions and args.int8_onnx is None:
        raise ArgumentError("int8 cases need --int8-onnx OUT/deepliif.onnx (from `deepliif-engine calibrate`)")

    def options(kind: BackendKind, precision: Precision) -> tuple:
        if precision is Precision.INT8:
            return (("onnx", args.int8_onnx),)
        return torch_options if kind is BackendKind.TORCH else ()

    return [BenchCase(k, p, b, options(k, p)) for k in kinds for p in precisions for b in sizes]


def _bench_end_to_end(args: argparse.Namespace, case: BenchCase, model_dir: Path, cache_dir: Path,
                      scratch: Path) -> dict:
    from .bench import bench_end_to_end, mosaic
    image = args.image
    if image is None:
        tiles, _ = benchmark_tiles(8)
        image = scratch / f"mosaic-{args.end_to_end}.png"
        write_png(image, mosaic(args.end_to_end, tiles))
    with Session(model_dir, backend=case.backend, precision=case.precision.value, device=args.device,
                 cache_dir=cache_dir, batch_size=case.batch_size, **dict(case.options)) as session:
        session.warmup()
        return bench_end_to_end(session, image)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.whole_process:
        return _bench_processes(args)
    from deepliif.demo import write_demo_model
    from deepliif.model_dir import load_model_dir

    from .bench import format_end_to_end, format_table, plot, run_bench
    cases = bench_cases(args)
    with tempfile.TemporaryDirectory(prefix="deepliif-bench-") as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            logger.warning("benchmarking a full-size model with RANDOM weights (speed only)")
            model_dir = write_demo_model(Path(scratch) / "model", Layout.TORCHSCRIPT, ngf=64)
        cache_dir = args.cache_dir or Path(scratch) / "cache"
        if args.end_to_end:
            report = _bench_end_to_end(args, cases[0], Path(model_dir), cache_dir, Path(scratch))
            print(format_end_to_end(report))
        else:
            model = load_model_dir(model_dir)
            tiles, source = benchmark_tiles(args.tiles, args.image)
            report = run_bench(model, tiles, cases, args.device, cache_dir)
            report.update({"model": model.describe(), "tiles_from": source})
            print(format_table(report))
    if args.json:
        prepare_out_dir(args.json.parent)
        write_json(args.json, report)
    if args.plot and plot(report, args.plot):
        print(f"plot: {args.plot}")
    return 0


def _bench_processes(args: argparse.Namespace) -> int:
    from .process_bench import bench_processes, format_processes
    if args.model_dir is None or args.image is None:
        raise ArgumentError("--whole-process needs --model-dir and --image (a real model and image)")
    backend = args.backends.split(",")[0]
    device = args.device
    with tempfile.TemporaryDirectory(prefix="deepliif-bench-") as scratch:
        report = bench_processes(args.model_dir, args.image, args.cache_dir or Path(scratch) / "cache", backend,
                                 device, args.repeats)
    print(format_processes(report))
    if args.json:
        prepare_out_dir(args.json.parent)
        write_json(args.json, report)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose, format_report
    report = diagnose(args.model_dir)
    print(format_report(report))
    if args.json:
        prepare_out_dir(args.json.parent)
        write_json(args.json, report)
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except DeepLIIFError as exc:
        print(f"deepliif-engine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
