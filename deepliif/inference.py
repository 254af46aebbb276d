"""Whole-image inference: tile, skip empty tiles, run the rest in batches, stitch, postprocess.

Results equal DeepLIIF's one-tile-at-a-time inference because the networks normalise per sample and
result tiles are pasted in DeepLIIF's order, whatever the batch size.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .contract import MODALITIES, NETWORK_TILE, OUTPUT_NAMES
from .errors import ArgumentError, ImageError, parse_enum
from .postprocessing import PostprocessOptions, postprocess
from .tiling import (
    EMPTY_TILE_COLOURS, Stitcher, Tile, TileGrid, check_tile_size, extend_by_mirroring, is_empty_tile,
    resize_tile,
)

MAX_BATCH_SIZE = 256


SEG_MASKS = ("Seg", "SegOverlaid", "SegRefined")


class OutputSet(enum.Enum):
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
    def parse(cls, value: object) -> OutputSet:
        return parse_enum(cls, value, "outputs")


class TileBatchRunner(Protocol):
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class InferenceOptions:
    tile_size: int = 512
    batch_size: int = 4
    outputs: OutputSet = OutputSet.ALL
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)

    def __post_init__(self) -> None:
        check_tile_size(self.tile_size)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ArgumentError(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}; got {self.batch_size!r}")


@dataclass
class InferenceResult:
    images: dict[str, np.ndarray]
    scoring: dict
    timings: dict[str, float]
    tiles: int
    empty_tiles: int


class OrderedPaster:
    """Pastes tile results strictly in tile order, however batches complete; DeepLIIF's overwrite order."""

    def __init__(self, stitcher: Stitcher, progress: Callable[[int], None] | None) -> None:
        self.stitcher, self.progress = stitcher, progress
        self.ready: dict[int, tuple[Tile, dict[str, np.ndarray] | None]] = {}
        self.next_index = 0

    def add(self, tile: Tile, results: dict[str, np.ndarray] | None) -> None:
        self.ready[tile.index] = (tile, results)
        while self.next_index in self.ready:
            ready_tile, ready_results = self.ready.pop(self.next_index)
            if ready_results is None:
                self.stitcher.paste_solid(ready_tile, EMPTY_TILE_COLOURS)
            else:
                self.stitcher.paste(ready_tile, ready_results)
            self.next_index += 1
            if self.progress:
                self.progress(1)


def run_tiles(runner: TileBatchRunner, image: np.ndarray, tile_size: int, batch_size: int,
              progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], int, int]:
    """The five stitched network images for one RGB image, plus (tile count, empty tile count)."""
    extended, grid, paster = start_image(image, tile_size, progress)
    pending: list[tuple[Tile, np.ndarray]] = []
    empty = 0

    def flush() -> None:
        if not pending:
            return
        outputs = runner.run(np.stack([network_tile for _, network_tile in pending]))
        for i, (tile, _) in enumerate(pending):
            paster.add(tile, {name: resize_tile(outputs[name][i], tile_size) for name in OUTPUT_NAMES})
        pending.clear()

    for tile in grid:
        crop = grid.crop(extended, tile)
        if is_empty_tile(crop):
            empty += 1
            paster.add(tile, None)
            continue
        pending.append((tile, resize_tile(crop, NETWORK_TILE)))
        if len(pending) == batch_size:
            flush()
    flush()
    return paster.stitcher.results(), len(grid), empty


def check_image_array(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 \
            or 0 in image.shape:
        raise ArgumentError(f"expected a non-empty RGB uint8 image [H, W, 3]; got "
                            f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image).__name__)}")


def start_image(image: np.ndarray, tile_size: int, progress: Callable[[int], None] | None
                ) -> tuple[np.ndarray, TileGrid, OrderedPaster]:
    """The mirror-extended image, its tile grid, and the paster that stitches results to the original size."""
    height, width = image.shape[:2]
    extended = extend_by_mirroring(image, tile_size)
    grid = TileGrid(extended.shape[1], extended.shape[0], tile_size)
    return extended, grid, OrderedPaster(Stitcher(grid, OUTPUT_NAMES, (width, height)), progress)


def finish_image(image: np.ndarray, network_images: dict[str, np.ndarray],
                 options: InferenceOptions) -> tuple[dict[str, np.ndarray], dict]:
    """Postprocess stitched network images: the selected output images and the scoring."""
    post = postprocess(image, network_images["Seg"], network_images["Marker"], options.tile_size,
                       options.postprocess)
    everything = {**network_images, "SegOverlaid": post.overlaid, "SegRefined": post.refined}
    return {name: everything[name] for name in options.outputs.names}, post.scoring


def infer_image(runner: TileBatchRunner, image: np.ndarray, options: InferenceOptions = InferenceOptions(),
                progress: Callable[[int], None] | None = None) -> InferenceResult:
    """DeepLIIF's `infer_modalities` for one RGB uint8 image: images, scoring and timings."""
    check_image_array(image)
    start = time.perf_counter()
    network_images, tiles, empty = run_tiles(runner, image, options.tile_size, options.batch_size, progress)
    inferred = time.perf_counter()
    images, scoring = finish_image(image, network_images, options)
    done = time.perf_counter()
    return InferenceResult(
        images=images,
        scoring=scoring,
        timings={"inference_seconds": inferred - start, "postprocess_seconds": done - inferred,
                 "total_seconds": done - start},
        tiles=tiles,
        empty_tiles=empty,
    )


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
