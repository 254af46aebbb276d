"""A Seg's cells found, measured and traced band by band while the tile loop stitches it.

DeepLIIF's cells are the 8-connected components of what is not background, and its background is the
unknown pixels 4-connected to the image's border, so neither can be decided from a band alone. As the tile
loop makes rows final, they are classified and their unknown pixels labelled (`BorderComponents` joins the
labels across band edges); a band's background is settled once every unknown component in it touches the
border or no longer reaches the last row handed over. Each settled band's cells are then labelled and
measured as a slide's band is (`slide_scoring.band_stats`), and joined across band edges; the cells lying
wholly inside it are traced (a cell's rings depend on its own pixels only). After the last tile only the
bottom bands are left, then the merge, which numbers the cells in raster order as labelling the whole image
does, and the tracing of the cells that cross band edges. The cells, every per-cell figure and every ring
equal those of the whole image at once.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .cell_outlines import OutlineTracer, TracedOutlines, trace_mask
from .cells import Outline
from .label_stats import BorderComponents, Components, JoinedBands, background_of, components, four_connected, \
    grey_levels
from .postprocessing import CellTable, classify_pixels
from .scoring_rules import PostprocessOptions, Resolution, mean_density
from .slide_scoring import SlideCells, band_stats, merge_bands
from .workers import parallel_map


@dataclass(frozen=True)
class _TracedInside:
    """The rings of a band's cells that lie wholly inside it, by their band label, and the labels of those
    that touch one of its edges inside the image (traced once the bands are merged)."""
    owners: list[int]
    rings: list[np.ndarray]
    at_edge: np.ndarray


@dataclass(frozen=True)
class _BandCells:
    """A settled band's own cells: its rows, their count, their figures (`band_stats`), the labels of its
    first and last rows (joined to the bands beside it) and, with outlines, what it traces (a task of its
    own, so the band's measures are not held up by it)."""
    top: int
    bottom: int
    count: int
    figures: dict[str, np.ndarray]
    first_row: np.ndarray
    last_row: np.ndarray
    traced: Future | None  # its `_TracedInside`


@dataclass(frozen=True)
class _Classified:
    """A band classified, its unknown pixels labelled, waiting for their background verdicts."""
    top: int
    positive: np.ndarray
    negative: np.ndarray
    unknown: np.ndarray  # 4-connected labels of the unknown pixels
    count: int
    first: int  # the image-wide id of its first unknown label


def _call(pool: ThreadPoolExecutor | None, function: Callable, *args) -> Future:
    """`function(*args)` on `pool`, or now on this thread (its error raised here) without one."""
    if pool is not None:
        return pool.submit(function, *args)
    done: Future = Future()
    done.set_result(function(*args))
    return done


class SegRows:
    """One image's cells, made from its Seg (and Marker) rows as the tile loop makes them final:
    `rows_final` from the stitching thread while the network runs the later tiles, then `cells` once the
    last tile is pasted. `orig` is the input IHC (for optical densities); `options` and `tile_size`
    are those the image is postprocessed with; with `outlines` the cells are traced too. With `threads`,
    the bands are classified and their background settled on a thread of their own (in order), and their
    cells measured and traced on `threads` more (any order), so stitching goes on meanwhile; `close` ends
    them. Without, everything runs on the caller's thread."""

    def __init__(self, orig: np.ndarray, options: PostprocessOptions, tile_size: int, threads: int | None = None,
                 outlines: bool = False) -> None:
        self.orig, self.options, self.resolution = orig, options, Resolution.from_tile_size(tile_size)
        self.traces = outlines
        self._settling = ThreadPoolExecutor(1, "seg-rows") if threads else None
        self._measuring = ThreadPoolExecutor(threads, "seg-cells") if threads else None
        self._settled: list[Future] = []  # per `rows_final` band, its classification and settling
        self._measured: list[Future] = []  # per settled band, its `_BandCells`
        self._border = BorderComponents(len(orig))
        self._waiting: deque[_Classified] = deque()
        self._labels = np.empty(orig.shape[:2], np.int32)  # each band's own labels until they are merged
        self._background = np.empty(orig.shape[:2], bool)
        self._done = self._settled_rows = 0

    @property
    def settled_rows(self) -> int:
        """How many rows from the top have their background settled (and their cells being measured)."""
        for work in self._settled:
            work.result()
        return self._settled_rows

    def rows_final(self, outputs: Mapping[str, np.ndarray], final: int) -> None:
        """Rows above `final` of the Seg and Marker in `outputs` (the whole image's, being stitched) will
        not change. An earlier band's failure is raised here, so the tile loop stops."""
        if final <= self._done:
            return
        for work in self._settled + self._measured:
            if work.done():
                work.result()
        top, self._done = self._done, final
        self._settled.append(_call(self._settling, self._settle, top, outputs["Seg"][top:final],
                                   outputs.get("Marker")))

    def _settle(self, top: int, seg: np.ndarray, marker: np.ndarray | None) -> None:
        """Classify and label the band at `top`; then every band whose background is now settled gets it,
        and its cells are measured (`_band_cells`)."""
        positive, negative = classify_pixels(seg, self.options.seg_thresh)
        unknown, count = four_connected(~(positive | negative))
        self._border.add(top, unknown, count)
        self._waiting.append(_Classified(top, positive, negative, unknown, count, self._border.firsts[-1]))
        is_background, settled = self._border.verdicts()
        while self._waiting and len(self._measured) < settled:
            band = self._waiting.popleft()
            bottom = band.top + len(band.unknown)
            background_of((band.unknown, band.count), band.first, is_background, out=self._background[band.top:bottom])
            self._settled_rows = bottom
            self._measured.append(_call(self._measuring, self._band_cells, band, marker))

    def _band_cells(self, band: _Classified, marker: np.ndarray | None) -> _BandCells:
        """A settled band's own cells: labelled, measured, and (with `outlines`) those inside it traced."""
        top, bottom = band.top, band.top + len(band.unknown)
        found = components(~self._background[top:bottom])
        grey = None if marker is None else grey_levels(marker[top:bottom])
        ihc = self.orig[top:bottom] if self.options.uses_optical_density else None
        figures = band_stats(found, top, grey, ihc, self.orig.shape[1], band.positive, band.negative)
        self._labels[top:bottom] = found.labels
        return _BandCells(top, bottom, found.count, figures, found.labels[0].copy(), found.labels[-1].copy(),
                          _call(self._measuring, self._trace_inside, found, top, bottom) if self.traces else None)

    def _trace_inside(self, found: Components, top: int, bottom: int) -> _TracedInside:
        """The band's cells that touch neither of its edges inside the image are whole: traced now."""
        at_edge = np.zeros(found.count + 1, bool)
        if top > 0:
            at_edge[1:] |= found.y0[1:] == 0
        if bottom < len(self.orig):
            at_edge[1:] |= found.y1[1:] == bottom - top
        inside = ~at_edge
        inside[0] = False
        rings, owners = trace_mask(np.take(inside, found.labels), found.labels, top)
        return _TracedInside(owners, rings, np.flatnonzero(at_edge))

    def cells(self, seg: np.ndarray, marker: np.ndarray | None, threads: int = 1) -> CellTable:
        """`measure_cells(label_cells(seg))`: the rows left handed over, then the bands' cells joined
        across band edges (in band order), numbered by their first pixels, and the label image renumbered
        so on `threads` threads. With `outlines`, the cells that cross band edges are traced on a band
        thread while the caller goes on (`CellTable.traced` says when)."""
        self.rows_final({"Seg": seg} if marker is None else {"Seg": seg, "Marker": marker}, len(seg))
        for work in self._settled:
            work.result()
        bands = [work.result() for work in self._measured]
        joined = JoinedBands(diagonal=True)
        for band in bands:
            joined.add_edges(band.first_row, band.last_row, band.count)
        merged, cell_of_label = merge_bands(joined.sets.roots(), [band.figures for band in bands],
                                            np.zeros(256, np.int64))

        def renumber(index: int) -> None:
            band, first = bands[index], joined.firsts[index]
            table = np.concatenate([[0], cell_of_label[first: first + band.count] + 1]).astype(np.int32)
            np.take(table, self._labels[band.top:band.bottom], out=self._labels[band.top:band.bottom])

        parallel_map(renumber, range(len(bands)), threads)
        table = self._table(merged, marker is not None)
        if self.traces:
            outlines: dict[int, Outline] = {}
            done = _call(self._measuring, self._outlines, outlines, table.components, cell_of_label,
                         list(zip(joined.firsts, [band.traced for band in bands])))
            table.traced = TracedOutlines(outlines, len(seg), done)
        return table

    def _outlines(self, outlines: dict[int, Outline], found: Components, cell_of_label: np.ndarray,
                  traced: list[tuple[int, Future]]) -> None:
        """Every cell's rings into `outlines`: those traced inside their bands (each band's first id and
        what it traced), renumbered; then the cells that cross band edges, traced from the renumbered
        labels."""
        crossing = []
        for first, tracing in traced:
            inside = tracing.result()
            for owner, ring in zip(cell_of_label[first - 1 + np.asarray(inside.owners, np.int64)].tolist(),
                                   inside.rings):
                outlines.setdefault(owner + 1, []).append(ring)
            crossing.append(cell_of_label[first - 1 + inside.at_edge] + 1)
        tracer = OutlineTracer(found.x0[1:], found.y0[1:], found.x1[1:], found.y1[1:])
        tracer.trace_whole(found.labels, np.unique(np.concatenate(crossing)).tolist() if crossing else [])
        outlines.update(tracer.outlines)

    def _table(self, merged: SlideCells, has_marker: bool) -> CellTable:
        """The merged cells as `measure_cells` gives them, indexed by label: index 0 is the unlabelled
        pixels (their count; no box is made for them, nothing reads it)."""
        unlabelled = np.int64(self._labels.size - merged.sizes.sum())

        def indexed(values: np.ndarray, at_zero: int = 0) -> np.ndarray:
            return np.concatenate([[at_zero], values]).astype(np.int64)

        found = Components(self._labels, len(merged.sizes), indexed(merged.sizes, unlabelled),
                           *(indexed(getattr(merged, edge)) for edge in ("x0", "y0", "x1", "y1", "sum_x", "sum_y")))
        od = indexed(mean_density(merged.od_sum, merged.sizes)) if merged.od_sum is not None else None
        kept = self.options.above_noise(found.sizes, self.resolution)
        kept[0] = False
        return CellTable(found, self._background, np.concatenate([[True], merged.positive]), indexed(merged.marker),
                         indexed(merged.marker_sum) if has_marker else None, od, indexed(merged.first_pixel, -1), kept,
                         self.options, self.resolution)

    def close(self) -> None:
        """End the band threads: work not started is dropped, work running finishes."""
        for pool in (self._settling, self._measuring):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
