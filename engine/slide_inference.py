"""`infer` on a whole slide: stream it through the session's backend and write each output as a tiled
pyramidal OME-TIFF, with the slide's scoring, its cells, and a JSON record of the slide, the tiles and the
time by stage."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepliif.cell_outlines import CellsInOrder, OutlineTracer
from deepliif.cell_data import uses_optical_density
from deepliif.cells import CellGeometry, cells_file_names, write_cells
from deepliif.contract import OUTPUT_NAMES
from deepliif.errors import ArgumentError
from deepliif.imageio import prepare_out_dir, write_json
from deepliif.inference import OVERLAY_NAMES, OutputSet
from deepliif.logs import project_logger
from deepliif.scoring_rules import PostprocessOptions
from deepliif.pyramid import LevelRows, PyramidCompression, PyramidWriter, assemble_pyramid, level_sizes
from deepliif.slide_background import StreamedBackground
from deepliif.slide_checkpoint import SlideCheckpoint, region_ends
from deepliif.slide_loop import SlidePosition, SlideRun, run_slide
from deepliif.rescore import RescoredCells
from deepliif.slide_cell_data import open_slide_cell_data, slide_cell_data_file_name
from deepliif.slide_rescore import draw_rescored_slide
from deepliif.slide_overlays import draw_slide
from deepliif.slide_scoring import Background, SlideScore, region_bands, score_slide, slide_bands
from deepliif.slides import Slide, SlideInfo, open_slide
from deepliif.tile_loop import Run
from deepliif.workers import resolve_threads

from .session import Session

logger = project_logger("engine")

def slide_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


@dataclass(frozen=True)
class CellDataRequest:
    """DeepLIIF 1.2.7's cell data of a slide: its version and the scoring options it records."""
    version: int
    options: PostprocessOptions
    has_marker: bool


@dataclass(frozen=True)
class Destination:
    """Where a slide's outputs go and how they are written: `OUT/<stem>_<Name>.ome.tif`, with the slide's
    pixel size, compressed as `compression` says for each output."""
    out: Path
    stem: str
    info: SlideInfo
    compression: PyramidCompression = PyramidCompression.default()
    cell_geometry: CellGeometry = CellGeometry.POLYGONS

    def path(self, name: str) -> Path:
        return self.out / f"{self.stem}_{name}.ome.tif"

    def described(self, name: str, levels: int) -> dict[str, dict]:
        return {name: {"file": self.path(name).name, "levels": levels,
                       "compression": self.compression.codec(name).compression}}

    def from_regions(self, name: str, regions: list[list[Path]]) -> dict[str, dict]:
        """The pyramid of `name` from its levels as a slide run's checkpoint holds them, region by region."""
        levels = assemble_pyramid(regions, self.path(name), self.info.mpp, codec=self.compression.codec(name))
        return self.described(name, levels)


class SlideOutputs:
    """Some outputs written as rows arrive, every level streamed to hidden temporaries; `finish` publishes
    each (by rename) and says how many levels it has."""

    def __init__(self, destination: Destination, names: tuple[str, ...]) -> None:
        self.destination, info = destination, destination.info
        sizes = level_sizes(info.height, info.width)
        self.pyramids = {name: PyramidWriter(destination.out / f".{destination.stem}_{name}", sizes,
                                             codec=destination.compression.codec(name)) for name in names}

    def add(self, rows: dict[str, np.ndarray]) -> None:
        for name, writer in self.pyramids.items():
            writer.add(rows[name])

    def finish(self) -> dict[str, dict]:
        published: dict[str, dict] = {}
        try:
            for name, writer in self.pyramids.items():
                levels = writer.publish(self.destination.path(name), self.destination.info.mpp)
                published.update(self.destination.described(name, levels))
            return published
        finally:
            self.close()

    def close(self) -> None:
        """Removes every temporary not published (all of them after a failure)."""
        for writer in self.pyramids.values():
            writer.discard()


def resume_fingerprint(session: Session, path: Path, tile_size: int) -> dict:
    """What must not change for a killed run's regions to be reused: the slide file, the model's files,
    the backend and the tile size."""
    stat = Path(path).stat()
    model = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in session.files.directory.iterdir()
                   if f.is_file())
    return {"slide": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "tile_size": tile_size, "model": model, "backend": [session.info.name, session.info.device,
                                                                session.info.precision.value]}


def infer_slide(session: Session, path: Path, out: Path, tile_size: int | None = None,
                progress: Callable[[int], None] | None = None, run: Run | None = None,
                stem: str | None = None, postprocess: PostprocessOptions = PostprocessOptions(),
                checkpoint_dir: Path | None = None, stage: Callable[[str], None] = lambda name: None,
                outputs: OutputSet = OutputSet.ALL, threads: int | None = None,
                compression: PyramidCompression = PyramidCompression.default(),
                cell_geometry: CellGeometry = CellGeometry.POLYGONS, cell_data: int | None = None) -> Path:
    """Writes `OUT/<stem>_<Name>.ome.tif` for the five network outputs and SegOverlaid/SegRefined, the
    slide's cells (`<stem>_cells.csv`, `.geojson.gz`, outlines or centroids by `cell_geometry`; with
    `cell_data`, DeepLIIF's `<stem>_cells.json.gz` of that version) and `OUT/<stem>.json` with its
    scoring. `run` wraps `session.run` (the kernel takes turns per batch); `stem` names the outputs
    (default: the file's). The network outputs are checkpointed region by region, every level of them, in
    `checkpoint_dir` (default `OUT/.<stem>.resume`): a rerun after a kill resumes from the last whole
    region. `stage` hears each stage as it begins: tiles, pyramids, scoring, overlays. Only the `outputs`
    asked for are published as pyramids; scoring reads the network's Seg and Marker from the run's own
    regions either way, so the pyramids are assembled from the regions' stored tiles on `threads` threads
    (default: the CPUs this process may use) while the slide is scored and its overlays drawn.
    `compression` chooses each output's codec (by default the display outputs JPEG, the rest lossless
    zstd)."""
    started = time.perf_counter()
    out, stem = prepare_out_dir(Path(out)), stem or slide_stem(path)
    with open_slide(path) as slide:
        info, chosen = slide.info, tile_size or slide.info.tile_size()
        ends = region_ends(info.height, info.width)
        destination = Destination(out, stem, info, compression, cell_geometry)
        with SlideCheckpoint(checkpoint_dir or out / f".{stem}.resume", resume_fingerprint(session, path, chosen),
                             OUTPUT_NAMES, info.width, ends,
                             {name: compression.codec(name) for name in OUTPUT_NAMES}) as checkpoint:
            start = checkpoint.resume()
            stage("tiles")
            threads = resolve_threads(threads)
            slide_run, background = _stream(run or session.run, slide, chosen, session.batch_size, checkpoint,
                                            progress, start, postprocess.seg_thresh, threads)
            seconds: dict[str, float] = {}
            wanted = None if cell_data is None else CellDataRequest(cell_data, postprocess, True)
            published, score, files = _pyramids_beside_scoring(checkpoint, path, destination, chosen, postprocess,
                                                               outputs.names, stage, seconds, threads, wanted,
                                                               background)
            record = _record(session, info, tile_size, chosen, slide_run, published, score, files, seconds, started)
            write_json(out / f"{stem}.json", record)
            checkpoint.remove()
    logger.info("%s: %d tiles (%d empty) at tile size %d, %.1f s", path.name, slide_run.tiles,
                slide_run.empty_tiles, chosen, time.perf_counter() - started)
    return out / f"{stem}.json"


def postprocess_slide(image: Path, seg: Path, marker: Path | None, out: Path, tile_size: int | None,
                      options: PostprocessOptions = PostprocessOptions(), threads: int | None = None,
                      cell_geometry: CellGeometry = CellGeometry.POLYGONS, cell_data: int | None = None,
                      compression: PyramidCompression = PyramidCompression.default()) -> Path:
    """`postprocess` of slide files (the IHC slide, its Seg and Marker as pyramids such as `infer` writes):
    scoring, cells (with `cell_data`, DeepLIIF's cell data too) and SegOverlaid/SegRefined pyramids,
    exactly as whole-image postprocessing of the same pixels, in bounded memory. Writes `OUT/<stem>.json`
    and returns its path."""
    start = time.perf_counter()
    if options.marker_thresh == "default" and marker is None:
        raise ArgumentError("--marker-thresh default needs the Marker slide (--marker)")
    with open_slide(image) as slide:
        info = slide.info
    tile_size = tile_size or info.tile_size()
    for other in (seg, marker):
        if other is not None:
            with open_slide(other) as check:
                if (check.info.width, check.info.height) != (info.width, info.height):
                    raise ArgumentError(f"{other}: {check.info.width}x{check.info.height}, but the slide {image} is "
                                        f"{info.width}x{info.height}; give the outputs of that slide")
    out, stem = prepare_out_dir(Path(out)), slide_stem(image)
    wanted = None if cell_data is None else CellDataRequest(cell_data, options, marker is not None)
    bands = slide_bands(seg, marker, image if _needs_ihc(options, wanted) else None)
    threads = resolve_threads(threads)
    score = score_slide(bands, info.width, info.height, tile_size, marker is not None, options, threads,
                        scratch=out)
    scored = time.perf_counter()
    outputs, files = _cells_and_overlays(image, Destination(out, stem, info, compression, cell_geometry), score,
                                         OVERLAY_NAMES, threads, wanted)
    write_json(out / f"{stem}.json", {
        "slide": info.as_dict(), "seg": str(seg), "marker": None if marker is None else str(marker),
        "tile_size": tile_size, "outputs": outputs, "scoring": score.scoring, "cells": files,
        "timings": {"scoring_seconds": round(scored - start, 3),
                    "overlay_seconds": round(time.perf_counter() - scored, 3),
                    "total_seconds": round(time.perf_counter() - start, 3)}})
    return out / f"{stem}.json"


def rescore_slide(rescored: RescoredCells, image: Path, out: Path, threads: int | None = None,
                  compression: PyramidCompression = PyramidCompression.default()) -> dict[str, dict]:
    """SegOverlaid and SegRefined pyramids of a slide from its re-scored cell data (`rescore` of a slide),
    band by band over the input slide; returns what was published."""
    with open_slide(image) as slide:
        info = slide.info
        overlays = SlideOutputs(Destination(prepare_out_dir(Path(out)), slide_stem(image), info, compression),
                                OVERLAY_NAMES)
        with contextlib.closing(overlays):
            draw_rescored_slide(rescored, info.width, info.height,
                                slide.read_rows,
                                lambda top, overlaid, refined: overlays.add(dict(zip(OVERLAY_NAMES,
                                                                                     (overlaid, refined)))),
                                resolve_threads(threads))
            return overlays.finish()


def _stream(run: Run, slide: Slide, tile_size: int, batch_size: int, checkpoint: SlideCheckpoint,
            progress: Callable[[int], None] | None, start: SlidePosition | None, seg_thresh: int, threads: int
            ) -> tuple[SlideRun, Background]:
    """The tile loop into the checkpoint, with pass one of scoring made from the Seg as it is handed over
    (rows a resumed run wrote before are read back from its regions first)."""
    info = slide.info
    background = StreamedBackground(info.width, info.height, seg_thresh, threads)
    try:
        if start is not None and start.rows_done:
            with LevelRows(checkpoint.written_level0("Seg")) as written:
                for top in range(0, start.rows_done, background.band_height):
                    background.add(top, written.rows(top, min(background.band_height, start.rows_done - top)))

        def sink(top: int, rows: dict[str, np.ndarray]) -> None:
            checkpoint.add(top, rows)
            background.add(top, rows["Seg"])
        slide_run = run_slide(run, slide, tile_size, batch_size, sink, progress, start, checkpoint.row_done)
        return slide_run, background.finish()
    except BaseException:
        background.abandon()
        raise


def _pyramids_beside_scoring(checkpoint: SlideCheckpoint, path: Path, destination: Destination, tile_size: int,
                             postprocess: PostprocessOptions, wanted: tuple[str, ...],
                             stage: Callable[[str], None], seconds: dict[str, float], threads: int,
                             cell_data: CellDataRequest | None, background: Background
                             ) -> tuple[dict[str, dict], SlideScore, dict[str, str]]:
    """The wanted network outputs' pyramids, assembled from the regions on a pool, while the slide is
    scored from the same regions and its overlays drawn; `seconds` gets each stage's own duration.
    Returns the pyramids published, the score and the cells files."""
    begun = time.perf_counter()
    stage("pyramids")
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyramid") as pool:
        pyramids = {name: pool.submit(destination.from_regions, name, checkpoint.levels(name))
                    for name in OUTPUT_NAMES if name in wanted}
        stage("scoring")
        info = destination.info
        bands = region_bands(checkpoint.level0("Seg"), checkpoint.level0("Marker"),
                             path if _needs_ihc(postprocess, cell_data) else None)
        score = score_slide(bands, info.width, info.height, tile_size, True, postprocess, threads, background,
                            checkpoint.folder)
        scored = time.perf_counter()
        stage("overlays")
        overlays = tuple(name for name in OVERLAY_NAMES if name in wanted)
        published, files = _cells_and_overlays(path, destination, score, overlays, threads, cell_data)
        drawn = time.perf_counter()
        for future in pyramids.values():
            published.update(future.result())
    seconds.update({"pyramid": time.perf_counter() - begun, "scoring": scored - begun, "overlay": drawn - scored})
    return published, score, files


def _needs_ihc(options: PostprocessOptions, cell_data: CellDataRequest | None) -> bool:
    """Whether scoring's bands must carry the input slide: a cell's optical density is read from it."""
    return options.uses_optical_density or (cell_data is not None and uses_optical_density(cell_data.version))


def _cells_and_overlays(path: Path, destination: Destination, score: SlideScore, names: tuple[str, ...],
                        threads: int, cell_data: CellDataRequest | None = None
                        ) -> tuple[dict[str, dict], dict[str, str]]:
    """The overlays `names` (perhaps none) and the cells files from one more pass over scoring's bands: the
    pass that draws the overlays also traces the cells' outlines and writes the cell data asked for. Returns
    the overlays published and the names of the cells files; the score's stored labels are released."""
    info, polygons = destination.info, destination.cell_geometry is CellGeometry.POLYGONS
    tracer = OutlineTracer.for_cells(score.cells) if polygons else None
    published: dict[str, dict] = {}
    files = cells_file_names(destination.stem, slide=True)
    in_order = CellsInOrder(score.cells)  # the cells files are written beside the pass, as it completes cells
    if tracer is None:
        in_order.passed(info.height)  # centroids only: every cell is complete already
    with contextlib.ExitStack() as stack:
        stack.callback(score.labels.close)
        cells_file = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="cells-file")).submit(
            write_cells, destination.out, destination.stem, in_order, info.mpp,
            None if tracer is None else tracer.outlines, slide=True)
        try:
            published = _overlay_pass(path, destination, score, names, threads, cell_data, tracer, in_order,
                                      files, stack)
            in_order.passed(info.height)
        except BaseException:
            in_order.abandon()
            raise
        cells_file.result()
    return published, files


def _overlay_pass(path: Path, destination: Destination, score: SlideScore, names: tuple[str, ...], threads: int,
                  cell_data: CellDataRequest | None, tracer: OutlineTracer | None, in_order: CellsInOrder,
                  files: dict[str, str], stack: contextlib.ExitStack) -> dict[str, dict]:
    """The pass itself, where one is needed (overlays, outlines or cell data asked for)."""
    info, writer = destination.info, None
    if cell_data is not None:
        writer = stack.enter_context(open_slide_cell_data(destination.out, destination.stem, score,
                                                          cell_data.version, cell_data.options,
                                                          cell_data.has_marker, info.width))
        files["cell_data"] = slide_cell_data_file_name(destination.stem)
    if not (names or tracer is not None or writer is not None):
        return {}
    overlays = stack.enter_context(contextlib.closing(SlideOutputs(destination, names)))
    with open_slide(path) as slide:
        draw_slide(slide.read_rows, score, info.width, info.height,
                   lambda top, overlaid, refined: overlays.add(dict(zip(OVERLAY_NAMES, (overlaid, refined)))),
                   threads, tracer, writer, in_order.passed)
    return overlays.finish()


def _record(session: Session, info: SlideInfo, given: int | None, chosen: int, slide_run: SlideRun,
            outputs: dict[str, dict], score: SlideScore, files: dict[str, str], seconds: dict[str, float],
            started: float) -> dict:
    return {"slide": info.as_dict(), "model": session.files.describe(), "backend": session.info.as_dict(),
            "tile_size": chosen, "tile_size_from": "given" if given else
            ("magnification" if info.objective_power else "default (no magnification in the slide)"),
            "batch_size": session.batch_size, "tiles": slide_run.tiles, "empty_tiles": slide_run.empty_tiles,
            "run_tiles": slide_run.tiles - slide_run.empty_tiles, "outputs": outputs,
            "timings": {**slide_run.timings.as_dict(), "stream_seconds": round(slide_run.seconds, 3),
                        **{f"{stage}_seconds": round(seconds[stage], 3) for stage in ("pyramid", "scoring", "overlay")},
                        "total_seconds": round(time.perf_counter() - started, 3)},  # pyramids overlap the rest
            "resumed": None if slide_run.resumed_from is None else {
                "from_row": slide_run.resumed_from.rows_done, "tiles_done_before": slide_run.resumed_from.tiles_done},
            "scoring": score.scoring, "cells": files}
