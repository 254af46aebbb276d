"""From the Seg image to cells, counts and the SegOverlaid / SegRefined images, vectorised.

DeepLIIF does this with per-pixel flood fills under a JIT; here every step is a whole-array operation
(OpenCV labelling and morphology, bincounts, lookup tables) that gives the same cells, thresholds and counts.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .cell_data import CELL_DATA_VERSIONS, cell_data_document, cell_records, uses_optical_density
from .cell_outlines import CellsInOrder, LabelOutlines, TracedOutlines
from .cells import Cell, Outline, counted_cells
from .errors import ArgumentError
from .scoring_rules import PostprocessOptions, Resolution, mean_density, optical_density
from .label_stats import (Components, LabelledPixels, background_of, border_components, components, four_connected,
                          grey_levels)
from .overlays import OUTLINE_REACH, cell_codes, outline, paint
from .workers import for_row_bands, parallel_map, resolve_threads, row_bands

KDE_POINTS = 500


@dataclass
class CellTable:
    """Connected cells of a Seg. Arrays are indexed by cell label (index 0 is background)."""

    components: Components  # labels, sizes, boxes and coordinate sums
    background: np.ndarray  # bool [H, W]
    positive: np.ndarray  # bool: positive pixels >= negative pixels
    marker: np.ndarray  # max Marker grey value over the cell (0 without a Marker image)
    marker_sum: np.ndarray | None  # sum of the Marker grey values over the cell (None without a Marker image)
    od: np.ndarray | None  # mean optical density of the IHC over the cell, when an od threshold is set
    first_pixel: np.ndarray  # flat index of each cell's first pixel in raster order
    kept: np.ndarray  # bool: above the noise threshold
    options: PostprocessOptions  # what the cells were found and measured with
    resolution: Resolution
    traced: TracedOutlines | None = None  # every label's rings, where they are traced as the cells are found

    @property
    def labels(self) -> np.ndarray:
        return self.components.labels

    @property
    def sizes(self) -> np.ndarray:
        return self.components.sizes


@dataclass
class PostprocessResult:
    overlaid: np.ndarray | None  # None when the overlays were not asked for
    refined: np.ndarray | None
    scoring: dict
    cells: list[Cell] = field(default_factory=list)  # every counted cell, for the per-cell table
    outlines: dict[int, Outline] | None = None  # cell id -> its outline, when asked for
    cell_data: dict | None = None  # DeepLIIF 1.2.7's per-cell data document, when asked for


class PostprocessSink(Protocol):
    """Hears parts of one image's results as soon as they are final, so a caller writes them while the
    rest is still being made (the encoders run beside the tracing and drawing, not after them)."""

    def overlay_rows(self, top: int, overlaid: np.ndarray, refined: np.ndarray) -> None:
        """Rows `top` to `top + len(overlaid)` of SegOverlaid and SegRefined are drawn (bands arrive in
        any order, from any thread)."""

    def cells(self, cells: Iterable[Cell], outlines: Mapping[int, Outline] | None) -> None:
        """The counted cells, once: iterating `cells` yields each as soon as its outline in `outlines` is
        complete, and blocks until then, so it must be consumed on another thread. If postprocessing
        fails, the iteration raises at the first cell not complete."""


def classify_pixels(seg: np.ndarray, seg_thresh: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative cell pixels: R + B above the threshold, G <= 80; positive when R >= B."""
    positive, negative = (np.empty(seg.shape[:2], bool) for _ in range(2))

    def classify(rows: slice) -> None:
        red, green, blue = (seg[rows, :, c].astype(np.int16) for c in range(3))
        cell = (red + blue > seg_thresh) & (green <= 80)
        np.logical_and(cell, red >= blue, out=positive[rows])
        np.logical_and(cell, ~positive[rows], out=negative[rows])

    for_row_bands(classify, len(seg), threads)
    return positive, negative


def mark_background(unknown: np.ndarray, threads: int = 1) -> np.ndarray:
    """Unknown pixels 4-connected to the image border through unknown pixels: row bands labelled at once
    on `threads` threads (OpenCV frees the GIL), their labels joined across band edges as for slides
    (`border_components`), then each band's verdicts looked up on its own thread."""
    bands = row_bands(len(unknown), threads)
    labelled = parallel_map(lambda rows: (rows[0], *four_connected(unknown[rows[0]:rows[1]])), bands, threads)
    firsts, is_background = border_components(labelled, len(unknown), lambda band: band)
    background = np.empty(unknown.shape, bool)

    def look(index: int) -> None:
        top, labels, count = labelled[index]
        background_of((labels, count), firsts[index], is_background, out=background[top: top + len(labels)])

    parallel_map(look, range(len(labelled)), threads)
    return background


def find_cells(seg: np.ndarray, marker: np.ndarray | None, options: PostprocessOptions,
               threads: int = 1, resolution: Resolution = Resolution.X40, orig: np.ndarray | None = None
               ) -> CellTable:
    """The cells of a Seg; with an optical-density threshold in `options`, their mean optical density
    over `orig` (the input IHC) too."""
    return measure_cells(label_cells(seg, options.seg_thresh, threads), marker, options, threads, resolution, orig)


@dataclass(frozen=True)
class LabelledSeg:
    """A Seg's classified pixels, its background and its cells' components, before any per-cell measure."""
    positive: np.ndarray
    negative: np.ndarray
    background: np.ndarray
    found: Components


def label_cells(seg: np.ndarray, seg_thresh: int, threads: int = 1) -> LabelledSeg:
    """Cell pixels, the unknown pixels 4-connected to the border (background), and the 8-connected
    components of everything else."""
    positive, negative = classify_pixels(seg, seg_thresh, threads)
    background = mark_background(~(positive | negative), threads)
    return LabelledSeg(positive, negative, background, components(~background, threads))


def measure_cells(labelled: LabelledSeg, marker: np.ndarray | None, options: PostprocessOptions, threads: int = 1,
                  resolution: Resolution = Resolution.X40, orig: np.ndarray | None = None) -> CellTable:
    """Per label: class, Marker values, optical density, first pixel, and whether it is above the noise."""
    found = labelled.found
    pixels, sizes = LabelledPixels.of(found.labels, found.count, threads), found.sizes
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cell-counts") as pool:  # bincount frees the GIL
        counts = pool.submit(lambda: (pixels.count_true(labelled.positive) >= pixels.count_true(labelled.negative),
                                      pixels.first_pixels()))
        grey = None if marker is None else grey_levels(marker)
        marker_values = np.zeros(found.count + 1, np.int64) if grey is None else pixels.maximum(grey)
        marker_sum = None if grey is None else pixels.image_sums(grey)
        is_positive, first = counts.result()
        od = mean_optical_density(pixels, sizes, orig) if options.uses_optical_density else None
    kept = options.above_noise(sizes, resolution)
    kept[0] = False
    return CellTable(found, labelled.background, is_positive, marker_values, marker_sum, od, first, kept, options,
                     resolution)


def mean_optical_density(pixels: LabelledPixels, sizes: np.ndarray, orig: np.ndarray) -> np.ndarray:
    """Per label, the IHC's optical density summed over its pixels and divided by its size, halves rounded
    to even (DeepLIIF's `round` of the mean)."""
    return mean_density(pixels.image_sums(optical_density(orig)), sizes)


def kernel_density(values: np.ndarray, points: int = KDE_POINTS, bandwidth: float = 1.0,
                   threads: int = 1) -> tuple[np.ndarray, float]:
    """Gaussian KDE at `i * step`, `step = (max + 1) / points`, summed in DeepLIIF's order, kept in float32."""
    step = (float(values.max()) + 1) / points
    sums = gaussian_sums(values, np.arange(points, dtype=np.float64) * step, bandwidth, threads)
    return (sums / (len(values) * bandwidth)).astype(np.float32), step


def gaussian_sums(values: np.ndarray, at: np.ndarray, bandwidth: float = 1.0, threads: int = 1) -> np.ndarray:
    """Per point of `at`, the Gaussian terms of `values` added one after another in their order (DeepLIIF's
    loop). Each point's sum is its own, so the points are split across `threads` threads. A point's terms
    run down a column and `add.reduce` over rows adds row after row, in vector steps that free the GIL; a
    cumulative sum along each row gives the same bits ten times slower, holding the GIL."""
    total = np.zeros(len(at), dtype=np.float64)

    def sums(rows: slice) -> None:
        points = at[None, rows]
        for chunk in np.array_split(values, max(1, len(values) // 4096)):
            z = (points - chunk[:, None]) / bandwidth
            terms = np.exp(-(z * z / 2)) * (1 / np.sqrt(2 * np.pi))
            total[rows] = np.add.reduce(np.concatenate([total[None, rows], terms]), axis=0)

    for_row_bands(sums, len(at), threads)
    return total


def default_size_threshold(sizes: np.ndarray, resolution: Resolution, threads: int = 1) -> int:
    """Size at the first valley of the sqrt-size distribution, clamped to the resolution's range."""
    if len(sizes) <= 1:
        return 0
    kde, step = kernel_density(np.sqrt(sizes.astype(np.float64)), threads=threads)
    valleys = np.flatnonzero((kde[1:-1] < kde[:-2]) & (kde[1:-1] < kde[2:])) + 1
    index = int(valleys[0]) if len(valleys) else 1
    thresh_sqrt = (index - 1) * step
    low, default, high = resolution.sqrt_size_range
    if thresh_sqrt < low:
        thresh_sqrt = low
    elif thresh_sqrt > high:
        thresh_sqrt = default
    return round(thresh_sqrt * thresh_sqrt)


def default_marker_threshold(marker: np.ndarray) -> int:
    """90% of the way from the 0.1 to the 99.9 percentile of the non-zero Marker grey values."""
    grey = grey_levels(marker)
    nonzero = grey[grey != 0]
    if nonzero.size == 0:
        return 0
    low, high = round(float(np.percentile(nonzero, 0.1))), round(float(np.percentile(nonzero, 99.9)))
    return round((high - low) * 0.9) + low


def draw_overlays(orig: np.ndarray, background: np.ndarray, labels: np.ndarray, codes: np.ndarray, seeds: np.ndarray,
                  seeds_positive: np.ndarray, threads: int = 1, sink: PostprocessSink | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """SegOverlaid and SegRefined from each label's code (`codes`, indexed by label: `overlays.NONE` for
    what is not a counted cell, else its class), drawn in row bands on `threads` threads, each band handed
    to `sink` as soon as it is painted. Each band looks its pixels' codes up itself (drawing starts at
    once, without a whole-image pass before it) and is outlined from its rows plus `OUTLINE_REACH` rows of
    halo each side, so the result equals drawing the whole image at once."""
    overlaid, refined = np.empty_like(orig), np.empty_like(orig)
    width = orig.shape[1]
    seed_rows = seeds // width

    def band(rows: tuple[int, int]) -> None:
        top, bottom = rows
        low, high = max(0, top - OUTLINE_REACH), min(len(orig), bottom + OUTLINE_REACH)
        inside = (seed_rows >= top) & (seed_rows < bottom)
        cells = np.take(codes, labels[low:high])
        border = outline(background[low:high], cells, seeds[inside] - low * width, seeds_positive[inside])
        keep = slice(top - low, bottom - low)
        overlaid[top:bottom], refined[top:bottom] = paint(orig[top:bottom], border[keep], cells[keep])
        if sink is not None:
            sink.overlay_rows(top, overlaid[top:bottom], refined[top:bottom])

    parallel_map(band, row_bands(len(orig), overlay_bands(len(orig), threads, sink is not None)), threads)
    return overlaid, refined


OVERLAY_BAND_ROWS = 512  # rows per overlay band when the bands are handed on to be encoded as drawn


def overlay_bands(height: int, threads: int, streamed: bool) -> int:
    """How many row bands the overlays are drawn in: two per thread (one band with one thread); when each
    is handed on as drawn, bands of about `OVERLAY_BAND_ROWS` rows, so encoding starts after the first."""
    parts = 2 * threads if threads > 1 else 1
    return max(parts, -(-height // OVERLAY_BAND_ROWS)) if streamed else parts


def postprocess(orig: np.ndarray, seg: np.ndarray, marker: np.ndarray | None, tile_size: int,
                options: PostprocessOptions = PostprocessOptions(), threads: int | None = None,
                overlays: bool = True, outlines: bool = False, cell_data: int | None = None,
                sink: PostprocessSink | None = None, measured: CellTable | None = None) -> PostprocessResult:
    """Cells, counts and the two overlay images for one (stitched) image; the overlays are drawn on
    `threads` threads (default: every CPU this process may use), or not at all with `overlays=False`
    (a caller that wants only the scoring and cells; `overlaid` and `refined` are then None). With
    `outlines`, each counted cell's outline is traced too (beside the measures and overlays); with `cell_data` (3 to
    6), DeepLIIF 1.2.7's per-cell data of that version is made too. A `sink` hears the overlay bands and
    the cells as they are finished. `measured`: the cells already found and measured (as the Seg was
    stitched: `SegRows`), with these options at this tile size's resolution."""
    if seg.shape[:2] != orig.shape[:2] or (marker is not None and marker.shape[:2] != orig.shape[:2]):
        raise ArgumentError(f"image sizes differ: input {orig.shape[:2]}, Seg {seg.shape[:2]}, "
                            f"Marker {None if marker is None else marker.shape[:2]}")
    if options.marker_thresh == "default" and marker is None:
        raise ArgumentError("marker_thresh 'default' needs the Marker image")
    threads = resolve_threads(threads)
    resolution = Resolution.from_tile_size(tile_size)
    if measured is not None:
        _check_measured(measured, seg, marker, options, resolution)
    with contextlib.ExitStack() as stack:
        labelled = None if measured is not None else label_cells(seg, options.seg_thresh, threads)
        found = labelled.found if measured is None else measured.components
        traced = None
        if outlines:
            traced = measured.traced if measured is not None and measured.traced is not None else \
                stack.enter_context(LabelOutlines(found, threads))
        cells = measured if measured is not None else \
            measure_cells(labelled, marker, options, threads, resolution, orig)
        default_size, size_thresh, marker_thresh = _thresholds(cells, marker, options, resolution, threads,
                                                               cell_data is not None)
        counted = cells.kept & options.counted(cells.sizes, size_thresh)
        is_positive = options.positive(cells.positive, cells.marker if cells.od is None else cells.od, marker_thresh)
        ids = np.flatnonzero(counted)
        table = counted_cells(cells.components, ids, is_positive, cells.marker, cells.marker_sum)
        overlaid, refined, cell_outlines = _draw_and_trace(orig, cells, counted, is_positive, table, ids, traced,
                                                           overlays, threads, sink)
    scoring = options.scoring(counted, is_positive, size_thresh, marker_thresh if marker is not None else None)
    document = None if cell_data is None else \
        _cell_data(cells, cell_data, orig, marker, options, resolution, default_size)
    return PostprocessResult(overlaid, refined, scoring, table, cell_outlines, document)


def _check_measured(measured: CellTable, seg: np.ndarray, marker: np.ndarray | None, options: PostprocessOptions,
                    resolution: Resolution) -> None:
    """Refuse cells measured with other options, at another resolution or size, or with(out) a Marker."""
    made = (measured.options, measured.resolution, measured.background.shape, measured.marker_sum is not None)
    asked = (options, resolution, seg.shape[:2], marker is not None)
    if made != asked:
        raise ArgumentError(f"the cells were measured with {made[0]} at {made[1]}, size {made[2]}, "
                            f"Marker {made[3]}; this asks {asked[0]} at {asked[1]}, size {asked[2]}, Marker {asked[3]}")


def _thresholds(cells: CellTable, marker: np.ndarray | None, options: PostprocessOptions, resolution: Resolution,
                threads: int, need_default_size: bool) -> tuple[int | None, int, int]:
    """The default size threshold (when asked for, or `need_default_size`), the size threshold and the
    Marker threshold in force."""
    default_size = default_size_threshold(cells.sizes[cells.kept], resolution, threads) \
        if options.wants_default_size or need_default_size else None
    size_thresh = options.size_threshold(default_size)
    marker_thresh = default_marker_threshold(marker) if options.marker_thresh == "default" else options.marker_thresh
    return default_size, size_thresh, marker_thresh


def _draw_and_trace(orig: np.ndarray, cells: CellTable, counted: np.ndarray, is_positive: np.ndarray,
                    table: list[Cell], ids: np.ndarray, traced: LabelOutlines | TracedOutlines | None, overlays: bool,
                    threads: int, sink: PostprocessSink | None
                    ) -> tuple[np.ndarray | None, np.ndarray | None, dict[int, Outline] | None]:
    """The overlays (with `overlays`) drawn while the labels' tracing finishes; `sink` is handed the cells
    first, each to be taken once the bands down to its last row are traced, and every overlay band as it
    is drawn. Returns the overlays and the counted cells' outlines (None without tracing)."""
    in_order = CellsInOrder(table)
    cell_outlines = None if traced is None else CountedOutlines(traced.outlines, ids)
    if sink is not None:
        sink.cells(in_order, cell_outlines)
    try:
        if traced is None:
            in_order.passed(len(orig))
        else:
            traced.follow(in_order.passed)  # before drawing: the cells files are written beside the overlays
        overlaid, refined = _overlays(orig, cells, counted, is_positive, ids, threads, sink) if overlays \
            else (None, None)
        if traced is not None:
            traced.wait()
    except BaseException:
        in_order.abandon()
        raise
    return overlaid, refined, None if cell_outlines is None else dict(cell_outlines)


def _overlays(orig: np.ndarray, cells: CellTable, counted: np.ndarray, is_positive: np.ndarray, ids: np.ndarray,
              threads: int, sink: PostprocessSink | None) -> tuple[np.ndarray, np.ndarray]:
    return draw_overlays(orig, cells.background, cells.labels, cell_codes(counted, counted & is_positive),
                         cells.first_pixel[ids], is_positive[ids], threads, sink)


class CountedOutlines(Mapping):
    """Counted cell id (1.., in the order of `ids`) -> its outline, read through to the outlines of every
    label (`LabelOutlines.outlines`) as they are traced; a cell not traced yet is not in it."""

    def __init__(self, by_label: Mapping[int, Outline], ids: np.ndarray) -> None:
        self._by_label, self._ids = by_label, ids.tolist()

    def __getitem__(self, cell_id: int) -> Outline:
        if not 1 <= cell_id <= len(self._ids):
            raise KeyError(cell_id)
        return self._by_label[self._ids[cell_id - 1]]

    def __iter__(self) -> Iterator[int]:
        return (cell_id for cell_id, label in enumerate(self._ids, start=1) if label in self._by_label)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _cell_data(cells: CellTable, version: int, orig: np.ndarray, marker: np.ndarray | None,
               options: PostprocessOptions, resolution: Resolution, default_size: int) -> dict:
    """DeepLIIF 1.2.7's `compute_cell_results` document of `version` for every cell above the noise."""
    if version not in CELL_DATA_VERSIONS:
        raise ArgumentError(f"cell data version must be one of {CELL_DATA_VERSIONS}; got {version!r}")
    by_density = uses_optical_density(version)
    if by_density:
        values = cells.od if cells.od is not None else mean_optical_density(
            LabelledPixels.of(cells.labels, cells.components.count), cells.sizes, orig)
    else:
        values = cells.marker
    records = cell_records(cells.labels, np.flatnonzero(cells.kept), cells.sizes, cells.positive, values,
                           cells.first_pixel, cells.components.sum_x, cells.components.sum_y,
                           "od" if by_density else "marker")
    settings = {"default_size_thresh": int(default_size), "noise_thresh": options.noise_thresh,
                "large_noise_thresh": options.large_noise_size(resolution), "seg_thresh": options.seg_thresh}
    if not by_density:
        settings["default_marker_thresh"] = None if marker is None else default_marker_threshold(marker)
    return cell_data_document(records, version, settings)
