"""A whole slide through the engine in row bands, with memory that does not grow with the slide.

The slide is cut into the same global `TileGrid` as a whole image of its size (no region seams): each row
of tiles is read as one band of level 0 (the splitter), its non-empty tiles are batched through `run` by
the one tile loop (`tile_loop.run_tiles`, batches spanning rows), and results are pasted in DeepLIIF's
order into a buffer one tile row high (the merger). Rows above the next tile row's kept area can no
longer be overwritten, so they are handed to `sink(top, rows)` (views valid only during the call: the
buffer is reused) and dropped. Output pixels equal `infer` on the same pixels given as one image.

A run can start at any tile row: rows below the last release are all overwritten by the next tile row
(its kept area spans the slide's width and reaches up to the release), so a run resumed at tile row i
with nothing buffered hands over exactly the rows an uninterrupted run would have.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .contract import OUTPUT_NAMES
from .errors import ArgumentError, ImageError
from .slides import Slide, SlideInfo
from .tile_loop import Item, Run, Strategy, TileTimings, network_tile, run_tiles
from .tiling import Tile, TileGrid, empty_tile_outputs, grey_of, resize_tile

# sink(top, rows): full-width rows from `top`, per output; views of the merger's buffer, so a sink that keeps
# rows past the call copies them.
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
    """The not-yet-final rows of every output, from `top` down, in buffers allocated once: a band is tens of
    megabytes per output, which glibc would map afresh (and the kernel zero) for every tile row. The rows
    handed to the sink are views of these buffers, valid only during the call."""

    def __init__(self, width: int, tile_size: int, top: int = 0) -> None:
        self.width, self.top, self.held = width, top, 0
        self.buffers = {name: np.empty((tile_size, width, 3), np.uint8) for name in OUTPUT_NAMES}
        self.empty = empty_tile_outputs(tile_size, OUTPUT_NAMES)

    def cover(self, bottom: int) -> None:
        """Holds rows down to `bottom` (every one of them is pasted before it is handed over)."""
        needed = bottom - self.top
        if needed > len(self.buffers[OUTPUT_NAMES[0]]):
            for name, rows in self.buffers.items():
                grown = np.empty((needed, self.width, 3), np.uint8)
                grown[: self.held] = rows[: self.held]
                self.buffers[name] = grown
        self.held = max(self.held, needed)

    def paste(self, tile: Tile, results: dict[str, np.ndarray] | None) -> None:
        x0, y0, x1, y1 = tile.keep
        top, left = tile.y - self.top, tile.x
        results = self.empty if results is None else results
        for name, rows in self.buffers.items():
            rows[top + y0: top + y1, left + x0: left + x1] = results[name][y0:y1, x0:x1]

    def release(self, until: int, sink: Sink) -> None:
        count = until - self.top
        if count > 0:
            sink(self.top, {name: rows[:count] for name, rows in self.buffers.items()})
            kept = self.held - count
            for rows in self.buffers.values():
                rows[:kept] = rows[count: self.held]  # NumPy copies overlapping rows safely
            self.top, self.held = until, kept


def slide_grid(info: SlideInfo, tile_size: int) -> TileGrid:
    if info.width < tile_size or info.height < tile_size:
        raise ImageError(f"{info.path}: a {info.width}x{info.height} slide is smaller than one {tile_size}-pixel "
                         "tile; infer it as an image")
    return TileGrid(info.width, info.height, tile_size)


def run_slide(run: Run, slide: Slide, tile_size: int, batch_size: int, sink: Sink,
              progress: Callable[[int], None] | None = None, start: SlidePosition | None = None,
              row_done: Callable[[SlidePosition], None] | None = None,
              strategy: Strategy = Strategy.THREADED) -> SlideRun:
    """Every tile row from `start` (default: the top) through the one tile loop (`run_tiles`): rows are
    read and split on one thread, batched through `run` (batches span rows), pasted and handed over on
    another; `row_done` hears the position after each tile row."""
    begin = time.perf_counter()
    grid, timings = slide_grid(slide.info, tile_size), TileTimings()
    rows = tile_rows(grid)
    releases, position = release_points(rows, slide.info.height), start or SlidePosition()
    if position.next_row and (position.next_row > len(rows) or position.rows_done != releases[position.next_row - 1]):
        raise ArgumentError(f"cannot resume at tile row {position.next_row} with {position.rows_done} rows done: "
                            "not a tile row's end on this slide's grid")
    if progress and position.tiles_done:
        progress(position.tiles_done)
    band = _Band(slide.info.width, tile_size, position.rows_done)
    merger = _SlideMerger(rows, releases, band, position, sink, row_done, progress, tile_size, timings)
    run_tiles(run, _slide_tiles(slide, rows[position.next_row:], tile_size, timings), merger, batch_size, timings,
              strategy)
    return SlideRun(tile_size, len(grid), merger.position.empty_tiles, timings, time.perf_counter() - begin, start)


def _slide_tiles(slide: Slide, rows: list[list[Tile]], tile_size: int, timings: TileTimings) -> Iterator[Item]:
    """The splitter: each tile row read as one band of level 0, its tiles cut from it."""
    for row in rows:
        read = time.perf_counter()
        pixels = slide.read_rows(row[0].y, tile_size)
        grey = grey_of(pixels)  # one conversion for the row's tiles, which overlap
        timings.add("tiling", read)
        for tile in row:
            start = time.perf_counter()
            columns = slice(tile.x, tile.x + tile_size)
            item = 0, tile, network_tile(pixels[:, columns], grey[:, columns])
            timings.add("tiling", start)
            yield item


class _SlideMerger:
    """The merger: pastes tiles in tile order (later tiles overwrite earlier ones where they overlap),
    however batches complete, and hands rows over as each tile row completes."""

    def __init__(self, rows: list[list[Tile]], releases: list[int], band: _Band, position: SlidePosition,
                 sink: Sink, row_done: Callable[[SlidePosition], None] | None,
                 progress: Callable[[int], None] | None, tile_size: int, timings: TileTimings) -> None:
        self.rows, self.releases, self.band, self.position = rows, releases, band, position
        self.sink, self.row_done, self.progress, self.tile_size, self.timings = sink, row_done, progress, \
            tile_size, timings
        self.ready: dict[int, dict[str, np.ndarray] | None] = {}
        self.row, self.column, self.row_empty = position.next_row, 0, 0

    def add(self, items: Sequence[Item], outputs: dict[str, np.ndarray] | None) -> None:
        start = time.perf_counter()
        for k, (_, tile, _) in enumerate(items):
            self.ready[tile.index] = None if outputs is None else \
                {name: resize_tile(outputs[name][k], self.tile_size) for name in OUTPUT_NAMES}
        while self.row < len(self.rows) and self.rows[self.row][self.column].index in self.ready:
            self._paste(self.rows[self.row][self.column])
        self.timings.add("stitching", start)

    def _paste(self, tile: Tile) -> None:
        if self.column == 0:
            self.band.cover(tile.y + self.tile_size)
        results = self.ready.pop(tile.index)
        self.band.paste(tile, results)
        self.row_empty += results is None
        self.column += 1
        if self.progress:
            self.progress(1)
        if self.column == len(self.rows[self.row]):
            self._row_complete()

    def _row_complete(self) -> None:
        self.band.release(self.releases[self.row], self.sink)
        done = self.position
        self.position = SlidePosition(self.row + 1, self.releases[self.row], done.tiles_done + self.column,
                                      done.empty_tiles + self.row_empty)
        self.row, self.column, self.row_empty = self.row + 1, 0, 0
        if self.row_done:
            self.row_done(self.position)
