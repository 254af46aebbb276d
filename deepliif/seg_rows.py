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
from .postprocessing import CellTable, above_noise, classify_pixels
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
    are those the image is postprocessed with; with `outlines` the cells are traced too. `threaded`: the
    bands are worked on a thread of their own (in order) and traced on another, so stitching goes on
    meanwhile; `close` ends both. Without, everything runs on the caller's thread."""

    def __init__(self, orig: np.ndarray, options: PostprocessOptions, tile_size: int, threaded: bool = False,
                 outlines: bool = False) -> None:
        self.orig, self.options, self.resolution = orig, options, Resolution.from_tile_size(tile_size)
        self.traces = outlines
        self._measuring = ThreadPoolExecutor(1, "seg-rows") if threaded else None
        self._tracing = ThreadPoolExecutor(1, "seg-outlines") if threaded and outlines else None
        self._worked: list[Future] = []
        self._traced: list[Future] = []  # per measured band, its `_TracedInside`, with `outlines`
        self._border = BorderComponents(len(orig))
        self._waiting: deque[_Classified] = deque()
        self._joined = JoinedBands(diagonal=True)
        self._measured: list[tuple[int, int, dict[str, np.ndarray]]] = []  # per band: top, bottom, its figures
        self._labels = np.empty(orig.shape[:2], np.int32)  # each band's own labels until they are merged
        self._background = np.empty(orig.shape[:2], bool)
        self._done = 0

    def rows_final(self, outputs: Mapping[str, np.ndarray], final: int) -> None:
        """Rows above `final` of the Seg and Marker in `outputs` (the whole image's, being stitched) will
        not change. An earlier band's failure is raised here, so the tile loop stops."""
        if final <= self._done:
            return
        for worked in self._worked:
            if worked.done():
                worked.result()
        top, self._done = self._done, final
        self._worked.append(_call(self._measuring, self._band, top, outputs["Seg"][top:final], outputs.get("Marker")))

    def _band(self, top: int, seg: np.ndarray, marker: np.ndarray | None) -> None:
        """Classify and label the band at `top`, then measure every band whose background is settled."""
        positive, negative = classify_pixels(seg, self.options.seg_thresh)
        unknown, count = four_connected(~(positive | negative))
        self._border.add(top, unknown, count)
        self._waiting.append(_Classified(top, positive, negative, unknown, count, self._border.firsts[-1]))
        is_background, settled = self._border.verdicts()
        while self._waiting and len(self._measured) < settled:
            self._measure(self._waiting.popleft(), is_background, marker)

    def _measure(self, band: _Classified, is_background: np.ndarray, marker: np.ndarray | None) -> None:
        top, bottom = band.top, band.top + len(band.unknown)
        background = background_of((band.unknown, band.count), band.first, is_background,
                                   out=self._background[top:bottom])
        found = components(~background)
        grey = None if marker is None else grey_levels(marker[top:bottom])
        ihc = self.orig[top:bottom] if self.options.uses_optical_density else None
        self._measured.append((top, bottom, band_stats(found, top, grey, ihc, self.orig.shape[1], band.positive,
                                                       band.negative)))
        self._joined.add(found.labels, found.count)
        if self.traces:
            self._traced.append(_call(self._tracing, self._trace_inside, found, top, bottom))
        self._labels[top:bottom] = found.labels

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
        """`measure_cells(label_cells(seg))`: the rows left handed over, then the bands' cells merged
        across band edges, numbered by their first pixels, and the label image renumbered so on `threads`
        threads. With `outlines`, the cells that cross band edges are traced on the tracing thread while
        the caller goes on (`CellTable.traced` says when)."""
        self.rows_final({"Seg": seg} if marker is None else {"Seg": seg, "Marker": marker}, len(seg))
        for worked in self._worked:
            worked.result()
        merged, cell_of_label = merge_bands(self._joined.sets.roots(), [m for *_, m in self._measured],
                                            np.zeros(256, np.int64))

        def renumber(band: int) -> None:
            top, bottom, figures = self._measured[band]
            first = self._joined.firsts[band]
            table = np.concatenate([[0], cell_of_label[first: first + len(figures["sizes"])] + 1]).astype(np.int32)
            np.take(table, self._labels[top:bottom], out=self._labels[top:bottom])

        parallel_map(renumber, range(len(self._measured)), threads)
        table = self._table(merged, marker is not None)
        if self.traces:
            outlines: dict[int, Outline] = {}
            done = _call(self._tracing, self._outlines, outlines, table.components, cell_of_label)
            table.traced = TracedOutlines(outlines, len(seg), done)
        return table

    def _outlines(self, outlines: dict[int, Outline], found: Components, cell_of_label: np.ndarray) -> None:
        """Every cell's rings into `outlines`: those traced inside their bands, renumbered; then the cells
        that cross band edges, traced from the renumbered labels."""
        crossing = []
        for first, traced in zip(self._joined.firsts, self._traced):
            inside = traced.result()
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
        kept = above_noise(found.sizes, self.options, self.resolution)
        kept[0] = False
        return CellTable(found, self._background, np.concatenate([[True], merged.positive]), indexed(merged.marker),
                         indexed(merged.marker_sum) if has_marker else None, od, indexed(merged.first_pixel, -1), kept,
                         self.options, self.resolution)

    def close(self) -> None:
        """End the band threads: work not started is dropped, work running finishes."""
        for pool in (self._measuring, self._tracing):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
