"""`infer` on a whole slide: stream it through the session's backend and write each network output as a
tiled pyramidal OME-TIFF, with a JSON record of the slide, the tiles and the time by stage."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deepliif.contract import OUTPUT_NAMES
from deepliif.imageio import prepare_out_dir, write_json
from deepliif.pyramid import StreamedLevel, assemble_pyramid
from deepliif.slide_loop import run_slide
from deepliif.tile_loop import Run
from deepliif.slides import open_slide
from deepliif.cells import write_cells
from deepliif.postprocessing import PostprocessOptions
from deepliif.slide_scoring import pyramid_bands, score_slide

from .session import Session

logger = logging.getLogger("engine")

POSTPROCESS_NOTE = ("scoring and per-cell tables are exact over the whole slide; SegOverlaid and SegRefined are not "
                    "made for slides yet")


def slide_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def infer_slide(session: Session, path: Path, out: Path, tile_size: int | None = None,
                progress: Callable[[int], None] | None = None, run: Run | None = None,
                stem: str | None = None, postprocess: PostprocessOptions = PostprocessOptions()) -> Path:
    """Writes `OUT/<stem>_<Name>.ome.tif` for the five network outputs, the slide's cells
    (`<stem>_cells.csv`, `.geojson`) and `OUT/<stem>.json` with its scoring. `run` wraps `session.run` (the
    kernel takes turns per batch); `stem` names the outputs (default: the file's)."""
    start = time.perf_counter()
    out, stem = prepare_out_dir(Path(out)), stem or slide_stem(path)
    with open_slide(path) as slide:
        info = slide.info
        chosen = tile_size or info.tile_size()
        level0 = {name: StreamedLevel(out / f".{stem}_{name}.level0.tif", info.width, info.height)
                  for name in OUTPUT_NAMES}

        def sink(top: int, rows: dict[str, np.ndarray]) -> None:
            for name, writer in level0.items():
                writer.add(rows[name])

        run = run_slide(run or session.run, slide, chosen, session.batch_size, sink, progress)
    written = time.perf_counter()
    for writer in level0.values():
        writer.close()
    levels = {name: assemble_pyramid(writer.path, out / f"{stem}_{name}.ome.tif", info.mpp)
              for name, writer in level0.items()}
    pyramids = time.perf_counter()
    bands = pyramid_bands(out / f"{stem}_Seg.ome.tif", out / f"{stem}_Marker.ome.tif", info.width)
    scoring, cells = score_slide(bands, info.width, info.height, chosen, True, postprocess)
    write_cells(out, stem, cells, info.mpp)
    record = {"slide": info.as_dict(), "model": session.files.describe(), "backend": session.info.as_dict(),
              "tile_size": chosen, "tile_size_from": "given" if tile_size else
              ("magnification" if info.objective_power else "default (no magnification in the slide)"),
              "batch_size": session.batch_size, "tiles": run.tiles, "empty_tiles": run.empty_tiles,
              "run_tiles": run.tiles - run.empty_tiles,
              "outputs": {name: {"file": f"{stem}_{name}.ome.tif", "levels": n} for name, n in levels.items()},
              "timings": {**run.timings.as_dict(), "stream_seconds": round(run.seconds, 3),
                          "pyramid_seconds": round(pyramids - written, 3),
                          "scoring_seconds": round(time.perf_counter() - pyramids, 3),
                          "total_seconds": round(time.perf_counter() - start, 3)},
              "scoring": scoring, "cells": {"csv": f"{stem}_cells.csv", "geojson": f"{stem}_cells.geojson"},
              "postprocess": POSTPROCESS_NOTE}
    write_json(out / f"{stem}.json", record)
    logger.info("%s: %d tiles (%d empty) at tile size %d, %.1f s", path.name, run.tiles, run.empty_tiles, chosen,
                time.perf_counter() - start)
    return out / f"{stem}.json"
