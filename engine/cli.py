"""`deepliif-engine`: infer, postprocess, demo-model, demo, export, calibrate, bench, serve, package, doctor."""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

from deepliif.cell_data import CELL_DATA_VERSIONS
from deepliif.cells import CellGeometry
from deepliif.errors import DeepLIIFError
from deepliif.imageio import DEFAULT_MAX_PIXELS
from deepliif.inference import OutputSet
from deepliif.logs import project_logger
from deepliif.model_files import Layout
from deepliif.scoring_rules import DEFAULT_SEG_THRESH
from deepliif.pyramid import PyramidCompression
from deepliif.tiling import TILE_SIZE_MAX, TILE_SIZE_MIN
from deepliif.workers import keep_freed_memory

from calibration.cli import add_calibrate_parser
from calibration.gate import require_passed
from export.cli import add_export_parser
from engine.backends.precision import Precision

from .backends import BackendKind
from .cache import default_cache_dir
from .samples import sample_dir
from .settings import process_environment
from .edi.cli import add_edi_parsers
from .edi.deploy_cli import add_deploy_parsers
from .commands import DEMO_MODEL_DIR, cmd_bench, cmd_demo, cmd_demo_model, cmd_doctor, cmd_infer, cmd_postprocess, cmd_rescore

logger = project_logger("engine")



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


def _add_threshold_args(parser: argparse.ArgumentParser) -> None:
    """The thresholds that decide which cells count and how they are classed (postprocess and rescore)."""
    parser.add_argument("--size-thresh", type=_threshold, default="default", help="smallest cell in pixels: N, or "
                        "'default' (DeepLIIF's automatic threshold)")
    parser.add_argument("--size-thresh-upper", type=int, default=None, help="largest cell in pixels (none: no limit)")
    parser.add_argument("--marker-thresh", type=_threshold, default=None, help="Marker grey level for a positive "
                        "cell: N, 'default' (automatic), or none (DeepLIIF's colour rule)")
    parser.add_argument("--od-thresh-lower", type=int, default=None, help="a cell is positive only if the IHC's mean "
                        "optical density over it is at least N (DeepLIIF 1.2.7; 100 x the sum of log10(255/v) over RGB)")
    parser.add_argument("--od-thresh-upper", type=int, default=None, help="... and at most N")


def _add_postprocess_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seg-thresh", type=int, default=DEFAULT_SEG_THRESH, help="Seg grey level that makes a "
                        "pixel part of a cell")
    _add_threshold_args(parser)
    parser.add_argument("--large-noise-thresh", type=_threshold, default=None, help="components of N pixels or "
                        "more are noise: N, 'default' (by magnification: 40x 16000, 20x 4000, 10x 1000), or none")
    parser.add_argument("--cell-geometry", type=CellGeometry, choices=list(CellGeometry), metavar=_values(CellGeometry),
                        default=CellGeometry.POLYGONS, help="cells in the GeoJSON: their outlines (polygons) or "
                        "their centroids (points)")
    parser.add_argument("--cell-data", type=int, choices=CELL_DATA_VERSIONS, default=None, help="also write "
                        "<stem>_cells.json (slides: .json.gz) in DeepLIIF 1.2.7's cell-data format of this version "
                        "(3/4: Marker value, 5/6: optical density; 4/6 packed), for `rescore`")


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
    parser.add_argument("--tile-size", type=_tile_size, default=None, help="tile size in image pixels (64-4096); "
                        "tiles are resized to 512 for the networks (default: 512 for images; for a whole slide, "
                        "from its magnification: 40x 512, 20x 256, 10x 128)")
    parser.add_argument("--outputs", type=_output_set, default="all", help="which images to write: all, "
                        "modalities, seg_masks, or one image (Hema, DAPI, Lap2, Marker, Seg, SegOverlaid, SegRefined)")
    parser.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS, help="refuse larger images "
                        "before decoding them")
    parser.add_argument("--threads", type=_positive, help="CPU threads for postprocessing and encoding (default: "
                        "the CPUs this process may use: its affinity, capped by its cgroup's CPU quota)")
    _add_pyramid_compression(parser)
    _add_postprocess_args(parser)


def _values(choices) -> str:
    """How --help shows an enum's choices: its values, as a user types them (not the members' reprs)."""
    return "{" + ",".join(member.value for member in choices) + "}"


def _add_pyramid_compression(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pyramid-compression", type=PyramidCompression, choices=list(PyramidCompression),
                        metavar=_values(PyramidCompression),
                        default=PyramidCompression.default(), help="slides: jpeg (default: JPEG q90 without "
                        "chroma subsampling for the display images Hema, DAPI, Lap2 and SegOverlaid; Seg, Marker and "
                        "SegRefined lossless zstd), zstd (lossless, every output) or deflate (lossless, every output, "
                        "for TIFF readers built without zstd)")


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
    infer.add_argument("--seg-intermediate", action="store_true", help="also write each segmentation generator's "
                       "own output, <stem>_IHC_s.png ... <stem>_Marker_s.png (DeepLIIF 1.2.7's mod<k>-<Name>_s; "
                       "images only, on the torch backend: exported graphs carry the five outputs alone)")
    infer.add_argument("--color-dapi", action="store_true", help="accepted as DeepLIIF 1.2.7's flag; 1.2.7 returns "
                       "the same DAPI with it (its colouring is disabled), and so does this")
    infer.add_argument("--color-marker", action="store_true", help="accepted as DeepLIIF 1.2.7's flag; the same "
                       "Marker, as in 1.2.7")
    _add_run_args(infer)
    _add_backend_args(infer)
    infer.set_defaults(handler=cmd_infer)

    post = sub.add_parser("postprocess", help="re-score existing Seg/Marker outputs without the model")
    post.add_argument("--image", type=Path, required=True, help="the IHC image, or slide (tiled/pyramidal TIFF)")
    post.add_argument("--seg", type=Path, required=True, help="its Seg output (a slide for a slide)")
    post.add_argument("--marker", type=Path, help="its Marker output (needed for --marker-thresh default)")
    post.add_argument("--tile-size", type=_tile_size, default=None, help="tile size the outputs were made with "
                      "(default: 512 for images; from a slide's magnification, as infer chooses it)")
    post.add_argument("--out", type=Path, required=True, help="output folder")
    post.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS, help="largest image decoded whole "
                      f"(default {DEFAULT_MAX_PIXELS}); slides are read band by band whatever their size")
    _add_postprocess_args(post)
    _add_pyramid_compression(post)
    post.set_defaults(handler=cmd_postprocess)

    again = sub.add_parser("rescore", help="scoring, SegOverlaid and SegRefined again from a cell-data file "
                           "(postprocess/infer --cell-data, or DeepLIIF 1.2.7's), without the Seg")
    again.add_argument("--cells", type=Path, required=True, help="<stem>_cells.json (data version 3 to 6)")
    again.add_argument("--image", type=Path, required=True, help="the IHC image the cell data was made from")
    again.add_argument("--out", type=Path, required=True, help="output folder: <stem>_SegOverlaid.png, "
                       "<stem>_SegRefined.png, <stem>.json")
    again.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS, help="largest image decoded")
    _add_threshold_args(again)
    _add_pyramid_compression(again)
    again.set_defaults(handler=cmd_rescore)

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

    add_export_parser(sub, accuracy_gate=require_passed)
    add_calibrate_parser(sub)
    add_edi_parsers(sub)
    add_deploy_parsers(sub)

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
    bench.add_argument("--repeats", type=int, default=2, help="--whole-process pairs of runs, or --pipeline runs "
                       "(default 2)")
    bench.add_argument("--pipeline", type=Path, metavar="IMAGE_OR_SLIDE", help="instead: `infer`'s own path on "
                       "this image or slide, every output written, with the network replaced by --replay outputs")
    bench.add_argument("--replay", type=Path, help="--pipeline: a folder of tile folders, each with Hema.png "
                       "DAPI.png Lap2.png Marker.png Seg.png (512x512), handed back in sorted order")
    bench.add_argument("--network-tiles-per-s", type=float, help="--pipeline: pace the stand-in network to this "
                       "many tiles per second, as a GPU would (default: unpaced)")
    bench.add_argument("--threads", type=_positive, help="--pipeline: CPU threads for the stages around the "
                       "network (default: the CPUs this process may use)")
    _add_pyramid_compression(bench)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    environment = process_environment()  # the command line's one read of it
    if getattr(args, "cache_dir", False) is None:  # the one place the CLI reads its environment's cache dir
        args.cache_dir = default_cache_dir(environment)
    args.sample_dir = sample_dir(environment)  # and its sample images
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except DeepLIIFError as exc:
        print(f"deepliif-engine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
