"""What each `deepliif-engine` subcommand does once its arguments are parsed (the parser is `engine.cli`)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from deepliif.cell_data import read_cell_data, uses_optical_density, write_cell_data
from deepliif.cells import CellGeometry, write_cells
from deepliif.rescore import rescore, rescore_cells
from deepliif.errors import ArgumentError, DeepLIIFError
from deepliif.imageio import (DEFAULT_MAX_PIXELS, expand_inputs, prepare_out_dir, probe_image, read_image,
                             write_json, write_png)
from deepliif.inference import InferenceOptions, OutputSet, check_working_size, tile_count
from deepliif.logs import project_logger
from deepliif.model_files import Layout
from deepliif.slides import fits_in_a_tile, is_slide, open_slide
from deepliif.tiling import DEFAULT_TILE_SIZE
from deepliif.postprocessing import postprocess
from deepliif.scoring_rules import PostprocessOptions
from engine.backends.precision import Precision

from .backends import BackendKind
from .image_files import describe_session, infer_image_files
from .session import Session
from .slide_inference import infer_slide, postprocess_slide, rescore_slide, slide_stem
from .samples import benchmark_tiles, mini_model_dir, sample_images, synthetic_ihc

logger = project_logger("engine")

if TYPE_CHECKING:  # torch-heavy; imported by the commands that use them
    from .bench import BenchCase


DEMO_MODEL_DIR = Path(".demo-model")


def _postprocess_options(args: argparse.Namespace) -> PostprocessOptions:
    return PostprocessOptions(seg_thresh=args.seg_thresh, size_thresh=args.size_thresh,
                              size_thresh_upper=args.size_thresh_upper, marker_thresh=args.marker_thresh,
                              large_noise_thresh=args.large_noise_thresh, od_thresh_lower=args.od_thresh_lower,
                              od_thresh_upper=args.od_thresh_upper)


def _polygons(args: argparse.Namespace) -> bool:
    return args.cell_geometry is CellGeometry.POLYGONS


def check_inputs(images: list[Path], tile_size: int, max_pixels: int) -> tuple[list[Path], int]:
    """Every input opened (header only) before any model loads: the files, and the tiles they hold."""
    files = expand_inputs(images)
    total = 0
    for path in files:
        width, height = _probe_slide(path) if is_slide(path) else probe_image(path, max_pixels)
        check_working_size(width, height, tile_size, max_pixels, str(path))
        total += tile_count(width, height, tile_size)
    return files, total


def infer_files(session: Session, images: list[Path], out: Path, options: InferenceOptions,
                max_pixels: int = DEFAULT_MAX_PIXELS, quiet: bool = False, total_tiles: int | None = None
                ) -> list[Path]:
    """Infer each image and write `OUT/<stem>_<Name>.png` and `OUT/<stem>.json` (`engine.image_files`);
    returns the JSON paths. One progress bar runs over the tiles of all images."""
    with tqdm(total=total_tiles, unit="tile", desc="tiles", disable=quiet, file=sys.stderr) as bar:
        return infer_image_files(session, images, out, options, describe_session(session), max_pixels,
                                 bar.update, lambda path: bar.set_postfix_str(path.name))


def _open_session(args: argparse.Namespace, model_dir: Path, **backend_options) -> Session:
    return Session(model_dir, backend=args.backend, precision=args.precision, device=args.device,
                   cache_dir=args.cache_dir, batch_size=args.batch_size, onnx=args.onnx,
                   force_ungated=args.force_ungated, **backend_options)


def _probe_slide(path: Path) -> tuple[int, int]:
    with open_slide(path) as slide:
        return slide.info.width, slide.info.height


def _streamed_slides(files: list[Path], tile_size: int | None) -> list[Path]:
    """The slides among `files` that are streamed, each opened first so a bad slide is refused before
    the model loads; a slide smaller than one tile (a small DICOM or SVS) is left to the image path."""
    streamed = []
    for path in (p for p in files if is_slide(p)):
        with open_slide(path) as slide:
            if fits_in_a_tile(slide.info, tile_size or slide.info.tile_size()):
                logger.info("%s: %dx%d is smaller than one tile; inferred as an image", path.name,
                            slide.info.width, slide.info.height)
            else:
                streamed.append(path)
    return streamed


def cmd_infer(args: argparse.Namespace) -> int:
    """Images are decoded whole; whole slides (tiled or pyramidal TIFF, told by content) are streamed."""
    files = expand_inputs(args.images)
    slides = _streamed_slides(files, args.tile_size)
    tile_size = args.tile_size or DEFAULT_TILE_SIZE
    images, total = check_inputs([p for p in files if p not in slides], tile_size, args.max_pixels)
    postprocess_options = _postprocess_options(args)
    if slides and args.seg_intermediate:
        raise ArgumentError(f"--seg-intermediate is for images; {slides[0]} is a whole slide (its pyramids hold "
                            "the five network outputs and the overlays)")
    if args.color_dapi or args.color_marker:
        logger.info("--color-dapi/--color-marker: DeepLIIF 1.2.7 returns the same images with them; so does this")
    seg_intermediate = {"seg_intermediate": True} if args.seg_intermediate else {}
    with _open_session(args, args.model_dir, **seg_intermediate) as session:
        options = InferenceOptions(tile_size=tile_size, batch_size=args.batch_size or session.batch_size,
                                   outputs=OutputSet.parse(args.outputs), postprocess=postprocess_options,
                                   threads=args.threads, cell_geometry=args.cell_geometry, cell_data=args.cell_data,
                                   seg_intermediate=args.seg_intermediate)
        if images:
            infer_files(session, images, args.out, options, args.max_pixels, args.quiet, total)
        for path in slides:
            with tqdm(unit="tile", desc=path.name, disable=args.quiet, file=sys.stderr) as bar:
                infer_slide(session, path, args.out, args.tile_size, bar.update, postprocess=postprocess_options,
                            outputs=options.outputs, threads=args.threads, compression=args.pyramid_compression,
                            cell_geometry=args.cell_geometry, cell_data=args.cell_data)
    print(f"results in {args.out}/")
    return 0


def cmd_postprocess(args: argparse.Namespace) -> int:
    """Images are decoded whole (up to --max-pixels); slides (the IHC, Seg and Marker all as slide files)
    are read band by band."""
    if is_slide(args.image):
        return _postprocess_slide(args)
    for path in (args.seg, args.marker):
        if path is not None and is_slide(path):
            raise ArgumentError(f"{path} is a slide but the image {args.image} is not; give the IHC slide")
    image = read_image(args.image, max_pixels=args.max_pixels)
    seg = read_image(args.seg, max_pixels=args.max_pixels)
    marker = read_image(args.marker, max_pixels=args.max_pixels) if args.marker else None
    start = time.perf_counter()
    result = postprocess(image, seg, marker, args.tile_size or DEFAULT_TILE_SIZE, _postprocess_options(args),
                         outlines=_polygons(args), cell_data=args.cell_data)
    out = prepare_out_dir(args.out)
    stem = args.image.stem
    write_png(out / f"{stem}_SegOverlaid.png", result.overlaid)
    write_png(out / f"{stem}_SegRefined.png", result.refined)
    cell_files = write_cells(out, stem, result.cells, outlines=result.outlines)
    if result.cell_data is not None:
        cell_files.append(write_cell_data(out, stem, result.cell_data))
    write_json(out / f"{stem}.json", {"image": str(args.image), "seg": str(args.seg),
                                         "marker": str(args.marker) if args.marker else None,
                                         "scoring": result.scoring, "cells": [p.name for p in cell_files],
                                         "timings": {"postprocess_seconds": time.perf_counter() - start}})
    print(json.dumps(result.scoring))
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    """DeepLIIF 1.2.7's `cells_to_final_results`: the scoring and both overlays from cell data alone; for
    a slide (its cell data from `infer`/`postprocess --cell-data`), the overlays as pyramids."""
    slide = is_slide(args.image)
    image = None if slide else read_image(args.image, max_pixels=args.max_pixels)
    cells, settings, version = read_cell_data(args.cells)
    options = PostprocessOptions(size_thresh=args.size_thresh, size_thresh_upper=args.size_thresh_upper,
                                 marker_thresh=None if uses_optical_density(version) else args.marker_thresh,
                                 od_thresh_lower=args.od_thresh_lower, od_thresh_upper=args.od_thresh_upper)
    start = time.perf_counter()
    stem = slide_stem(args.image) if slide else args.image.stem
    if slide:
        rescored = rescore_cells(cells, settings, version, options)
        outputs, scoring = rescore_slide(rescored, args.image, args.out, compression=args.pyramid_compression), rescored.scoring
    else:
        result = rescore(cells, settings, version, image, options)
        out = prepare_out_dir(args.out)
        write_png(out / f"{stem}_SegOverlaid.png", result.overlaid)
        write_png(out / f"{stem}_SegRefined.png", result.refined)
        outputs, scoring = [f"{stem}_SegOverlaid.png", f"{stem}_SegRefined.png"], result.scoring
    write_json(Path(args.out) / f"{stem}.json", {
        "image": str(args.image), "cells": str(args.cells), "data_version": version, "scoring": scoring,
        "outputs": outputs, "timings": {"rescore_seconds": round(time.perf_counter() - start, 4)}})
    print(json.dumps(scoring))
    return 0


def _postprocess_slide(args: argparse.Namespace) -> int:
    for path in (args.seg, args.marker):
        if path is not None and not is_slide(path):
            raise ArgumentError(f"{path} is not a slide but the image {args.image} is; give its outputs as slides "
                                "(the .ome.tif pyramids infer writes)")
    record = postprocess_slide(args.image, args.seg, args.marker, args.out, args.tile_size, _postprocess_options(args),
                               cell_geometry=args.cell_geometry, cell_data=args.cell_data,
                               compression=args.pyramid_compression)
    print(json.dumps(json.loads(record.read_text())["scoring"]))
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


def _demo_model_choice(args: argparse.Namespace) -> tuple[Path, str]:
    """The demo's model and why: the one given, else the mini model of ../shared, else random weights."""
    if args.model_dir is not None:
        return Path(args.model_dir), f"the model given ({args.model_dir})"
    mini = mini_model_dir()
    if mini is not None:
        return mini, (f"the mini DeepLIIF of ../shared ({mini}): small and trained on DeepLIIF's sample tiles, "
                      "so it finds cells on them; a demo model, NOT a clinical one")
    return _demo_model(args.ngf), ("a full-size model with RANDOM weights (../shared is absent, so no trained "
                                   "model is at hand): images and counts are meaningless; plumbing and speed only")


def cmd_demo(args: argparse.Namespace) -> int:
    model_dir, why = _demo_model_choice(args)
    print(f"demo model: {why}")
    images = sample_images(args.sample_dir)
    if not images:
        generated = args.out / "generated_ihc.png"
        prepare_out_dir(args.out)
        write_png(generated, synthetic_ihc(1024, 1024))
        images = [generated]
        logger.warning("no sample tiles found; using a generated image %s", generated)
    images, total = check_inputs(images, DEFAULT_TILE_SIZE, DEFAULT_MAX_PIXELS)
    with _open_session(args, model_dir) as session:
        options = InferenceOptions(batch_size=args.batch_size or session.batch_size)
        records = infer_files(session, images, args.out, options, quiet=args.quiet, total_tiles=total)
    for record in records:
        scoring = json.loads(record.read_text())["scoring"]
        stem = record.stem
        print(f"  {stem}: {scoring['num_total']} cells, {scoring['num_pos']} positive ({scoring['percent_pos']}%); "
              f"QuPath: {record.with_name(f'{stem}_cells.geojson')}; overlay: {record.with_name(f'{stem}_SegOverlaid.png')}")
    print(f"demo results in {args.out.resolve()}/ ({len(records)} images, PNGs and JSON per image)")
    if args.edi:
        from .edi.standin.demo import round_trip
        for line in round_trip(model_dir, images[0], args.out / "edi", args.cache_dir, args.backend, args.device):
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
    if args.pipeline:
        return _bench_pipeline(args)
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


def _bench_pipeline(args: argparse.Namespace) -> int:
    from .pipeline_bench import bench_pipeline, format_pipeline
    if args.replay is None:
        raise ArgumentError("--pipeline needs --replay DIR (one folder per tile of real DeepLIIF outputs)")
    report = bench_pipeline(args.pipeline, args.replay, args.network_tiles_per_s, args.threads,
                            max(_csv(args.batch_sizes, int, "batch-sizes")), args.repeats, args.pyramid_compression)
    print(format_pipeline(report))
    if args.json:
        prepare_out_dir(args.json.parent)
        write_json(args.json, report)
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
