"""Whole-image inference: the options a request gives, the tile loop (`deepliif.tile_loop`), then
postprocessing into the images and scoring a caller gets.

Results equal DeepLIIF's one-tile-at-a-time inference because the networks normalise per sample and
result tiles are pasted in DeepLIIF's order, whatever the batch size.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .cell_data import CELL_DATA_VERSIONS
from .cells import Cell, CellGeometry, Outline
from .contract import MODALITIES, OUTPUT_NAMES, SEG_INTERMEDIATE_NAMES
from .errors import ArgumentError, ChoiceEnum, ImageError
from .postprocessing import PostprocessResult, PostprocessSink, postprocess
from .seg_rows import SegRows
from .scoring_rules import PostprocessOptions
from .tile_loop import StitchedImage, Strategy, run_tile_loop
from .tiling import DEFAULT_TILE_SIZE, TileGrid, check_tile_size
from .workers import resolve_threads

MAX_BATCH_SIZE = 256


OVERLAY_NAMES = ("SegOverlaid", "SegRefined")  # drawn by postprocessing, not by the network
SEG_MASKS = ("Seg",) + OVERLAY_NAMES


class OutputSet(ChoiceEnum):
    """Which images a caller wants back: a named set, or one image by its name (case-insensitive).
    The original input is always available to the caller."""

    ALL = "all"
    MODALITIES = "modalities"
    SEG_MASKS = "seg_masks"
    HEMA = "hema"
    DAPI = "dapi"
    LAP2 = "lap2"
    MARKER = "marker"
    SEG = "seg"
    SEG_OVERLAID = "segoverlaid"
    SEG_REFINED = "segrefined"

    @property
    def names(self) -> tuple[str, ...]:
        sets = {"all": MODALITIES + SEG_MASKS, "modalities": MODALITIES, "seg_masks": SEG_MASKS}
        if self.value in sets:
            return sets[self.value]
        return tuple(name for name in MODALITIES + SEG_MASKS if name.lower() == self.value)

    @classmethod
    def choice_name(cls) -> str:
        return "outputs"


class ImageSink(Protocol):
    """Hears each image of an `infer_images` call as its results are made, so a caller writes them while
    the network runs the later tiles and the cells are traced: its network outputs as their rows become
    final (the tile loop's `RowsFinal`), then what its postprocessing finishes."""

    def rows_final(self, index: int, outputs: dict[str, np.ndarray], final: int) -> None: ...

    def postprocessed(self, index: int) -> PostprocessSink | None:
        """What hears image `index`'s overlay bands and cells (None: nothing)."""


class TileBatchRunner(Protocol):
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class TileSpec:
    """What decides how an image is tiled and batched (the overlap and the network tile follow from the
    tile size by `tiling.TileGrid`'s rules); images that share one share network batches, whatever each
    asks back."""
    tile_size: int = DEFAULT_TILE_SIZE
    batch_size: int = 4


@dataclass(frozen=True)
class InferenceOptions:
    """One request's options: its `tile_spec` (how it is tiled) and what it wants back (outputs,
    postprocessing, cells files), which the tile loop applies per image."""
    tile_size: int = DEFAULT_TILE_SIZE
    batch_size: int = 4
    outputs: OutputSet = OutputSet.ALL
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    threads: int | None = None  # CPU threads for postprocessing (None: every CPU this process may use)
    # what the cells GeoJSON holds, outlines or centroids; None: no cells file is written, nothing is traced
    cell_geometry: CellGeometry | None = CellGeometry.POLYGONS
    cell_data: int | None = None  # also DeepLIIF 1.2.7's per-cell data of this version (3 to 6)
    seg_intermediate: bool = False  # also each segmentation generator's own output (`<Source>_s`)

    def __post_init__(self) -> None:
        check_tile_size(self.tile_size)
        if self.threads is not None:
            resolve_threads(self.threads)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ArgumentError(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}; got {self.batch_size!r}")
        if self.cell_data is not None and self.cell_data not in CELL_DATA_VERSIONS:
            raise ArgumentError(f"cell_data must be one of {CELL_DATA_VERSIONS}; got {self.cell_data!r}")

    @property
    def tile_spec(self) -> TileSpec:
        return TileSpec(self.tile_size, self.batch_size)

    @property
    def intermediate_names(self) -> tuple[str, ...]:
        """The per-generator segmentations this image asks back (none unless `seg_intermediate`)."""
        return SEG_INTERMEDIATE_NAMES if self.seg_intermediate else ()

    @property
    def network_names(self) -> tuple[str, ...]:
        """The network outputs the tile loop stitches for this image."""
        return OUTPUT_NAMES + self.intermediate_names


@dataclass
class InferenceResult:
    images: dict[str, np.ndarray]
    scoring: dict
    timings: dict[str, float]
    tiles: int
    empty_tiles: int
    cells: list[Cell] = field(default_factory=list)  # every counted cell (the per-cell table)
    outlines: dict[int, Outline] | None = None  # cell id -> outline, with CellGeometry.POLYGONS
    cell_data: dict | None = None  # DeepLIIF 1.2.7's per-cell data, with InferenceOptions.cell_data


def check_image_array(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 \
            or 0 in image.shape:
        raise ArgumentError(f"expected a non-empty RGB uint8 image [H, W, 3]; got "
                            f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image).__name__)}")




def finish_image(image: np.ndarray, network_images: dict[str, np.ndarray], options: InferenceOptions,
                 sink: PostprocessSink | None = None, seg_rows: SegRows | None = None
                 ) -> tuple[dict[str, np.ndarray], PostprocessResult]:
    """Postprocess stitched network images: the selected output images, and the scoring and cells. The
    overlays are drawn only when one of them is selected, the outlines only when polygons are; `sink`
    hears them as they are finished; `seg_rows` holds the cells found as the Seg was stitched."""
    wanted = options.outputs.names
    post = postprocess(image, network_images["Seg"], network_images["Marker"], options.tile_size,
                       options.postprocess, options.threads, overlays=any(n in wanted for n in OVERLAY_NAMES),
                       outlines=options.cell_geometry is CellGeometry.POLYGONS, cell_data=options.cell_data,
                       sink=sink, measured=None if seg_rows is None else seg_rows.cells(
                           network_images["Seg"], network_images["Marker"], resolve_threads(options.threads)))
    everything = {**network_images, "SegOverlaid": post.overlaid, "SegRefined": post.refined}
    return {name: everything[name] for name in wanted + options.intermediate_names}, post


def infer_images(run: Callable[[np.ndarray], dict[str, np.ndarray]], images: Sequence[np.ndarray],
                 options: InferenceOptions | Sequence[InferenceOptions] = InferenceOptions(),
                 strategy: Strategy = Strategy.THREADED, progress: Callable[[int], None] | None = None,
                 sink: ImageSink | None = None) -> list[InferenceResult]:
    """DeepLIIF's `infer_modalities` for several RGB uint8 images through one tile loop (tiles of all of
    them batched together): images, scoring and timings per image. `options` is one for all, or one per
    image: they must share a `TileSpec`, and each image gets back what its own options ask for. Each
    result's timings hold the stage sums of the whole call (one image's own figures when called with one)
    and its own total. `sink` hears each image's network outputs as their rows become final, all of them
    before its postprocessing, then its overlay bands and cells as they are finished (`ImageSink`)."""
    for image in images:
        check_image_array(image)
    per_image = [options] * len(images) if isinstance(options, InferenceOptions) else list(options)
    if len(per_image) != len(images):
        raise ArgumentError(f"{len(per_image)} options for {len(images)} images")
    specs = {o.tile_spec for o in per_image}
    if len(specs) > 1:
        raise ArgumentError(f"images inferred together must share one tile spec; got {sorted(specs, key=str)}")
    spec = specs.pop() if specs else InferenceOptions().tile_spec
    seg_rows: dict[int, SegRows] = {}  # per image in the tile loop: its cells, found as it is stitched

    def rows_of(index: int) -> SegRows:
        if index not in seg_rows:
            o = per_image[index]
            threads = resolve_threads(o.threads) if strategy is Strategy.THREADED else None
            seg_rows[index] = SegRows(images[index], o.postprocess, spec.tile_size, threads,
                                      outlines=o.cell_geometry is CellGeometry.POLYGONS)
        return seg_rows[index]

    def rows_final(index: int, outputs: dict[str, np.ndarray], final: int) -> None:
        rows_of(index).rows_final(outputs, final)  # its cells found while the network runs the later tiles
        if sink is not None:
            sink.rows_final(index, outputs, final)

    def finish(done: StitchedImage) -> InferenceResult:
        rows = rows_of(done.index)
        del seg_rows[done.index]  # its arrays go with its result
        try:
            selected, post = finish_image(images[done.index], done.images, per_image[done.index],
                                          None if sink is None else sink.postprocessed(done.index), rows)
        finally:
            rows.close()
        return InferenceResult(selected, post.scoring, {"total_seconds": time.perf_counter() - done.started},
                               done.tiles, done.empty, post.cells, post.outlines, post.cell_data)

    try:
        results, timings = run_tile_loop(run, images, spec.tile_size, spec.batch_size, finish, strategy, progress,
                                         [o.network_names for o in per_image], rows_final)
    finally:
        for rows in list(seg_rows.values()):  # after a failure, no band is left running
            rows.close()
    for result in results:
        result.timings = {**timings.as_dict(), **result.timings}
    return results


def infer_image(runner: TileBatchRunner, image: np.ndarray, options: InferenceOptions = InferenceOptions(),
                progress: Callable[[int], None] | None = None) -> InferenceResult:
    """One image, serially: the reference path the accuracy gate and parity tests judge through."""
    return infer_images(runner.run, [image], options, Strategy.SERIAL, progress)[0]


def check_working_size(width: int, height: int, tile_size: int, max_pixels: int, label: str = "image") -> None:
    """Refuse by what will be allocated, not by the input's pixel count: an image narrower or shorter than
    a tile is mirrored up to one, and the stitched outputs have that extended size. A 1 x 2,000,000 PNG
    (6 kB) would otherwise ask for a 512 x 2,000,000 working image per output (several GB)."""
    work_w, work_h = max(width, tile_size), max(height, tile_size)
    if work_w * work_h > max_pixels:
        raise ImageError(f"{label}: a {width}x{height} image is processed as {work_w}x{work_h} = "
                         f"{work_w * work_h} pixels (extended to at least one {tile_size}-pixel tile each way), "
                         f"over the limit of {max_pixels}; crop it or use a smaller tile size")


def tile_count(width: int, height: int, tile_size: int) -> int:
    """How many tiles an image of this size is cut into (for progress bars and run-time estimates)."""
    return len(TileGrid(max(width, tile_size), max(height, tile_size), tile_size))
