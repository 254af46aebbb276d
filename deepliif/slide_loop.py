"""A whole slide through the engine in row bands, with memory that does not grow with the slide.

The slide is cut into the same global `TileGrid` as a whole image of its size (no region seams): each row
of tiles is read as one band of level 0, its non-empty tiles are batched through `run` (the tile loop's
`batches`/`run_batch`), and results are pasted in DeepLIIF's order into a buffer a little more than one
tile row high. Rows above the next tile row's kept area can no longer be overwritten, so they are handed
to `sink(top, rows)` and dropped. Output pixels equal `infer` on the same pixels given as one image.

A run can start at any tile row: rows below the last release are all overwritten by the next tile row
(its kept area spans the slide's width and reaches up to the release), so a run resumed at tile row i
with nothing buffered hands over exactly the rows an uninterrupted run would have.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .contract import NETWORK_TILE, OUTPUT_NAMES
from .errors import ArgumentError, ImageError
from .slides import Slide, SlideInfo
from .tile_loop import Item, Run, TileTimings, batches, run_batch
from .tiling import EMPTY_TILE_COLOURS, Tile, TileGrid, is_empty_tile, resize_tile

Sink = Callable[[int, dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class SlidePosition:
    """Where a run stands after a tile row: the next tile row, output rows handed over, tiles done and
    the empty ones among them."""
    next_row: int = 0
    rows_done: int = 0
    tiles_done: int = 0
    empty_tiles: int = 0


@dataclass
class SlideRun:
    tile_size: int
    tiles: int
    empty_tiles: int
    timings: TileTimings
    seconds: float
    resumed_from: SlidePosition | None = None


def tile_rows(grid: TileGrid) -> list[list[Tile]]:
    return [list(row) for _, row in itertools.groupby(grid, key=lambda tile: tile.y)]


def release_points(rows: list[list[Tile]], height: int) -> list[int]:
    """After each tile row, the output rows final so far: down to the top of the next row's kept area."""
    return [following[0].y + following[0].keep[1] for following in rows[1:]] + [height]


class _Band:
    """The not-yet-final rows of every output, from `top` down."""

    def __init__(self, width: int, top: int = 0) -> None:
        self.width, self.top = width, top
        self.rows = {name: np.zeros((0, width, 3), np.uint8) for name in OUTPUT_NAMES}

    def cover(self, bottom: int) -> None:
        have = self.top + len(self.rows[OUTPUT_NAMES[0]])
        if bottom > have:
            extra = np.zeros((bottom - have, self.width, 3), np.uint8)
            self.rows = {name: np.concatenate([rows, extra]) for name, rows in self.rows.items()}

    def paste(self, tile: Tile, results: dict[str, np.ndarray] | None) -> None:
        x0, y0, x1, y1 = tile.keep
        top, left = tile.y - self.top, tile.x
        for name, rows in self.rows.items():
            rows[top + y0: top + y1, left + x0: left + x1] = \
                EMPTY_TILE_COLOURS[name] if results is None else results[name][y0:y1, x0:x1]

    def release(self, until: int, sink: Sink) -> None:
        count = until - self.top
        if count > 0:
            sink(self.top, {name: rows[:count] for name, rows in self.rows.items()})
            self.rows = {name: rows[count:] for name, rows in self.rows.items()}
            self.top = until


def slide_grid(info: SlideInfo, tile_size: int) -> TileGrid:
    if info.width < tile_size or info.height < tile_size:
        raise ImageError(f"{info.path}: a {info.width}x{info.height} slide is smaller than one {tile_size}-pixel "
                         "tile; infer it as an image")
    return TileGrid(info.width, info.height, tile_size)


def run_slide(run: Run, slide: Slide, tile_size: int, batch_size: int, sink: Sink,
              progress: Callable[[int], None] | None = None, start: SlidePosition | None = None,
              row_done: Callable[[SlidePosition], None] | None = None) -> SlideRun:
    """Every tile row from `start` (default: the top); `row_done` hears the position after each one."""
    begin = time.perf_counter()
    grid, timings = slide_grid(slide.info, tile_size), TileTimings()
    rows = tile_rows(grid)
    releases, position = release_points(rows, slide.info.height), start or SlidePosition()
    if position.next_row and (position.next_row > len(rows) or position.rows_done != releases[position.next_row - 1]):
        raise ArgumentError(f"cannot resume at tile row {position.next_row} with {position.rows_done} rows done: "
                            "not a tile row's end on this slide's grid")
    band = _Band(slide.info.width, position.rows_done)
    if progress and position.tiles_done:
        progress(position.tiles_done)
    for index in range(position.next_row, len(rows)):
        empty = _run_row(run, slide, rows[index], tile_size, band, batch_size, timings, progress)
        band.release(releases[index], sink)
        position = SlidePosition(index + 1, releases[index], position.tiles_done + len(rows[index]),
                                 position.empty_tiles + empty)
        if row_done:
            row_done(position)
    return SlideRun(tile_size, len(grid), position.empty_tiles, timings, time.perf_counter() - begin, start)


def _run_row(run: Run, slide: Slide, row: list[Tile], tile_size: int, band: _Band, batch_size: int,
             timings: TileTimings, progress: Callable[[int], None] | None) -> int:
    """One tile row read as a band, its non-empty tiles batched, results pasted; returns its empty tiles."""
    read = time.perf_counter()
    pixels = slide.read_region(0, row[0].y, slide.info.width, tile_size)
    timings.add("tiling", read)
    band.cover(row[0].y + tile_size)
    items = list(_split_row(row, pixels, timings))
    paster = _OrderedRow(band, row)
    for group, to_run in batches(iter(items), batch_size):
        outputs = run_batch(run, group, timings) if to_run else None
        _paste(paster, group, outputs, tile_size, timings)
        if progress:
            progress(len(group))
    return sum(item[2] is None for item in items)


def _split_row(row: list[Tile], pixels: np.ndarray, timings: TileTimings):
    for tile in row:
        start = time.perf_counter()
        crop = pixels[:, tile.x: tile.x + len(pixels)]
        network_tile = None if is_empty_tile(crop) else resize_tile(crop, NETWORK_TILE)
        timings.add("tiling", start)
        yield tile.index, tile, network_tile


class _OrderedRow:
    """Pastes a row's tiles in tile order (later tiles overwrite earlier ones where they overlap), however
    batches complete: empty tiles come back before the batch of non-empty tiles left of them."""

    def __init__(self, band: _Band, row: list[Tile]) -> None:
        self.band, self.row, self.next = band, row, 0
        self.ready: dict[int, dict[str, np.ndarray] | None] = {}

    def add(self, tile: Tile, results: dict[str, np.ndarray] | None) -> None:
        self.ready[tile.index] = results
        while self.next < len(self.row) and self.row[self.next].index in self.ready:
            tile = self.row[self.next]
            self.band.paste(tile, self.ready.pop(tile.index))
            self.next += 1


def _paste(paster: _OrderedRow, group: list[Item], outputs: dict[str, np.ndarray] | None, tile_size: int,
           timings: TileTimings) -> None:
    start = time.perf_counter()
    for position, (_, tile, _) in enumerate(group):
        results = None if outputs is None else \
            {name: resize_tile(outputs[name][position], tile_size) for name in OUTPUT_NAMES}
        paster.add(tile, results)
    timings.add("stitching", start)
