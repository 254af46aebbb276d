"""Cells, thresholds and counts of a whole slide, equal to `postprocess` on the same pixels as one image.

A slide's Seg is too large to label at once, so it is read in full-width row bands, twice. Pass one labels
the pixels that are no cell (4-connected) band by band, joins labels that touch across band edges with a
union-find, and notes which touch the slide's border: DeepLIIF's background is exactly those. Pass two
labels everything that is not background (8-connected), joins across band edges the same way, and sums
each cell's size, positive and negative pixels, Marker maximum, first pixel and coordinates, and counts the
Marker's grey values (its default threshold is a percentile over the whole slide); it keeps each band's
labels compressed (`BandLabels`) for the pass that draws the overlays. Because bands
are full-width rows, raster order across the slide is band order, so ordering the merged cells by their
first pixel numbers them as whole-image labelling does, and the size threshold's KDE sums the same values
in the same order. Thresholds and counts then follow `postprocess` exactly.
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import imagecodecs
import numpy as np

from .cells import Cell, counted_cells
from .errors import ArgumentError
from .label_stats import (Components, JoinedBands, LabelledPixels, background_of, border_components, components,
                          four_connected, grey_levels)
from .scoring_rules import PostprocessOptions, Resolution, mean_density, optical_density
from .postprocessing import classify_pixels, default_size_threshold
from .pyramid import LevelRows
from .slides import open_slide
from .workers import ordered_map


class Band(NamedTuple):
    """Full-width rows of a slide's outputs: the Seg (RGB), the Marker and the input IHC (None when not
    read: the IHC only where a cell's optical density is wanted)."""
    top: int
    seg: np.ndarray
    marker: np.ndarray | None
    ihc: np.ndarray | None = None


# `bands(measuring)`, called once per pass: the slide's bands top to bottom. Only the pass that measures the
# cells (`measuring`) is given the Marker and the IHC; the others read the Seg alone.
Bands = Callable[[bool], Iterator[Band]]
BAND_PIXELS = 4_000_000


def _unknown_labels(seg: np.ndarray, seg_thresh: int) -> tuple[np.ndarray, int]:
    positive, negative = classify_pixels(seg, seg_thresh)
    return unknown_labels(~(positive | negative))


def unknown_labels(unknown: np.ndarray) -> tuple[np.ndarray, int]:
    """The 4-connected components of a band's pixels of unknown class (DeepLIIF's background candidates)."""
    return four_connected(unknown)


def background_labels(bands: Bands, height: int, seg_thresh: int, threads: int = 1) -> tuple[list[int], np.ndarray]:
    """Pass one of scoring: `border_components` of the Seg's no-cell pixels."""
    return border_components(bands(measuring=False), height,
                             lambda band: (band.top, *_unknown_labels(band.seg, seg_thresh)), threads)


StoredBand = tuple[int, tuple[int, int], int, bytes]  # top row, shape, label count, compressed labels


class BandLabels:
    """Every band's own 8-connected labels as pass two made them, zstd-compressed in an anonymous temporary
    file in `folder` (the run's own, known writable; default the system's temporary folder), so memory does
    not grow with the slide; the system removes the file once it is closed. The overlay pass reads
    them back rather than decoding the Seg and labelling it again: a cell-dense band of 16 MB of labels
    compresses to about 0.2 MB in 10 ms and decompresses in 8 ms, where reading, classifying and labelling
    its Seg again took about 0.2 s (measured on a 16k slide's bands)."""

    def __init__(self, folder: Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="deepliif-labels-", dir=folder)
        self._bands: list[tuple[int, tuple[int, int], int, int, int]] = []  # top, shape, labels, offset, bytes

    def add(self, top: int, shape: tuple[int, int], count: int, compressed: bytes) -> None:
        """Band after band, top to bottom: its top row, shape, number of labels and compressed labels."""
        offset = self._bands[-1][3] + self._bands[-1][4] if self._bands else 0
        self._file.seek(offset)
        self._file.write(compressed)
        self._bands.append((top, shape, count, offset, len(compressed)))

    def read(self) -> Iterator[StoredBand]:
        """Each band's top row, shape, label count and compressed labels (`decode` them), top to bottom."""
        for top, shape, count, offset, size in self._bands:
            self._file.seek(offset)
            yield top, shape, count, self._file.read(size)

    @staticmethod
    def encode(labels: np.ndarray) -> bytes:
        return imagecodecs.zstd_encode(np.ascontiguousarray(labels, np.int32), level=1)

    @staticmethod
    def decode(shape: tuple[int, int], compressed: bytes) -> np.ndarray:
        return np.frombuffer(imagecodecs.zstd_decode(compressed), np.int32).reshape(shape)

    def close(self) -> None:
        self._file.close()


@dataclass
class SlideLabels:
    """Each band's labels as pass two made them (`stored`), and per label its merged cell, so a later pass
    (drawing the overlays) finds each pixel's merged cell without holding a label image of the slide."""
    stored: BandLabels
    cell_firsts: list[int]
    cell_of_label: np.ndarray  # per pass-two id: index of its merged cell (whole-image order)

    def band_labels(self, band: int, shape: tuple[int, int], count: int, compressed: bytes
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Band `band`'s own 8-connected labels, and per label its merged cell's index (-1 for label 0)."""
        first = self.cell_firsts[band] - 1
        return BandLabels.decode(shape, compressed), \
            np.concatenate([[-1], self.cell_of_label[first + 1: first + 1 + count]])

    def close(self) -> None:
        self.stored.close()


@dataclass
class SlideCells:
    """Every connected non-background component of the slide, in whole-image label order."""
    sizes: np.ndarray
    positive: np.ndarray
    marker: np.ndarray
    marker_sum: np.ndarray
    first_pixel: np.ndarray
    sum_x: np.ndarray
    sum_y: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    marker_histogram: np.ndarray  # of the Marker's grey values over the whole slide (for its default threshold)
    od_sum: np.ndarray | None = None  # the IHC's optical density summed over each cell, where bands carry the IHC
    labels: SlideLabels | None = None

    def mean_optical_density(self) -> np.ndarray:
        """Per cell, its mean optical density, as for an image."""
        if self.od_sum is None:
            raise ArgumentError("the optical density of a slide's cells needs bands that carry the IHC")
        return mean_density(self.od_sum, self.sizes)


Background = tuple[list[int], np.ndarray]  # pass one's result: per band its first id, per id its verdict


def slide_cells(bands: Bands, width: int, height: int, seg_thresh: int, threads: int = 1,
                background: Background | None = None, scratch: Path | None = None) -> SlideCells:
    """Pass two: the cells, merged across bands and ordered by their first pixel. Bands are labelled and
    measured on `threads` threads; their labels are numbered and joined in band order. `background`: pass
    one's result where it was made already (as the tile loop handed the Seg over), else it is made here.
    `scratch`: where the bands' labels are kept for the overlay pass (`BandLabels`)."""
    no_cell_firsts, is_background = background or background_labels(bands, height, seg_thresh, threads)

    def measured(item: tuple[Band, int]) -> tuple[int, np.ndarray, int, dict[str, np.ndarray], np.ndarray | None,
                                                  bytes]:
        band, first = item
        grey = None if band.marker is None else grey_levels(band.marker)
        positive, negative = classify_pixels(band.seg, seg_thresh)  # once, for the background and the counts
        background = background_of(unknown_labels(~(positive | negative)), first, is_background)
        found = components(~background)
        histogram = None if grey is None else np.bincount(grey.ravel(), minlength=256)
        stats = band_stats(found, band.top, grey, band.ihc, width, positive, negative)
        return band.top, found.labels, found.count, stats, histogram, BandLabels.encode(found.labels)

    joined, parts, histogram = JoinedBands(diagonal=True), [], np.zeros(256, np.int64)
    stored = BandLabels(scratch)
    measured_bands = ordered_map(measured, zip(bands(measuring=True), no_cell_firsts), threads)
    try:
        for top, labels, count, stats, band_histogram, compressed in measured_bands:
            if band_histogram is not None:
                histogram += band_histogram
            stored.add(top, labels.shape, count, compressed)
            joined.add(labels, count)
            parts.append(stats)
        cells, cell_of_label = merge_bands(joined.sets.roots(), parts, histogram)
    except BaseException:
        stored.close()
        raise
    finally:
        measured_bands.close()  # a failure here stops the band threads and the read-ahead at once
    cells.labels = SlideLabels(stored, joined.firsts, cell_of_label)
    return cells


def band_stats(found: Components, top: int, grey: np.ndarray | None, ihc: np.ndarray | None, width: int,
               positive: np.ndarray, negative: np.ndarray) -> dict[str, np.ndarray]:
    """One band's own cells (label 1.. of `found`, indices 0..), measured in image coordinates (the band
    starts at row `top`): the figures that add, or take a minimum or maximum, across band edges
    (`merge_bands`); the optical density's sums where the band's IHC is given."""
    count = found.count
    pixels = LabelledPixels.of(found.labels, count)
    sizes = found.sizes[1:]
    od = {} if ihc is None else {"od_sum": pixels.image_sums(optical_density(ihc))[1:]}
    return {**od, "sizes": sizes, "positive": pixels.count_true(positive)[1:],
            "negative": pixels.count_true(negative)[1:],
            "marker": pixels.maximum(grey)[1:] if grey is not None else np.zeros(count, np.int64),
            "marker_sum": pixels.image_sums(grey)[1:] if grey is not None else np.zeros(count, np.int64),
            "first_pixel": pixels.first_pixels()[1:] + top * width,
            "sum_x": found.sum_x[1:], "sum_y": found.sum_y[1:] + top * sizes,
            "x0": found.x0[1:], "x1": found.x1[1:], "y0": found.y0[1:] + top, "y1": found.y1[1:] + top}


def merge_bands(roots: np.ndarray, parts: list[dict[str, np.ndarray]], histogram: np.ndarray
                ) -> tuple[SlideCells, np.ndarray]:
    """One cell per union-find root, ordered by first pixel; and each band label's cell."""
    joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    unique_roots, cell = np.unique(roots, return_inverse=True)
    n = len(unique_roots)

    def reduce(key: str, how) -> np.ndarray:
        out = np.full(n, {"sum": 0, "min": np.iinfo(np.int64).max, "max": np.iinfo(np.int64).min}[how], np.int64)
        {"sum": np.add, "min": np.minimum, "max": np.maximum}[how].at(out, cell, joined[key])
        return out
    first = reduce("first_pixel", "min")
    order = np.argsort(first, kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    summed = ("sizes", "positive", "negative", "marker_sum", "sum_x", "sum_y", "od_sum")
    sums = {key: reduce(key, "sum")[order] for key in summed if key in joined}
    cells = SlideCells(sums["sizes"], sums["positive"] >= sums["negative"], reduce("marker", "max")[order],
                       sums["marker_sum"], first[order], sums["sum_x"], sums["sum_y"], reduce("x0", "min")[order],
                       reduce("y0", "min")[order], reduce("x1", "max")[order], reduce("y1", "max")[order], histogram,
                       sums.get("od_sum"))
    return cells, rank[cell.reshape(-1)]


def percentile_from_histogram(counts: np.ndarray, q: float) -> float:
    """`np.percentile(values, q)` (linear) of the values a histogram of integers counts, without the values."""
    cumulative = np.cumsum(counts)
    index = (cumulative[-1] - 1) * q / 100
    low, high = int(np.floor(index)), int(np.ceil(index))
    value_at = lambda k: int(np.searchsorted(cumulative, k, side="right"))  # noqa: E731 - the k-th sorted value
    a, b = value_at(low), value_at(high)
    return float(a + (b - a) * (index - low))


def slide_marker_threshold(histogram: np.ndarray) -> int:
    """`default_marker_threshold` over the whole slide's Marker, from its histogram."""
    counts = histogram.copy()
    counts[0] = 0
    if counts.sum() == 0:
        return 0
    low = round(percentile_from_histogram(counts, 0.1))
    high = round(percentile_from_histogram(counts, 99.9))
    return round((high - low) * 0.9) + low


@dataclass
class SlideScore:
    """A slide's scoring and counted cells, and what drawing its outlines needs: which cells are counted and
    positive, their seeds (first pixels, flat level-0 indices, ascending) and how to find each pixel's cell."""
    scoring: dict
    cells: list[Cell]
    counted: np.ndarray
    is_positive: np.ndarray
    seeds: np.ndarray
    seeds_positive: np.ndarray
    labels: SlideLabels
    counted_ids: np.ndarray  # per merged cell: its number in `cells` (1..), 0 if it is not counted
    merged: SlideCells  # every merged cell, counted or not (what DeepLIIF's cell data lists)
    kept: np.ndarray  # per merged cell: above the noise thresholds
    resolution: Resolution
    default_size_thresh: int | None  # DeepLIIF's default size threshold, where the scoring needed it


def score_slide(bands: Bands, width: int, height: int, tile_size: int, has_marker: bool,
                options: PostprocessOptions = PostprocessOptions(), threads: int = 1,
                background: Background | None = None, scratch: Path | None = None) -> SlideScore:
    """The scoring `postprocess` gives for the same pixels as one image, and its counted cells; bands are
    worked on `threads` threads. With optical-density thresholds the bands must carry the IHC. `background`:
    pass one's result, where it was made as the Seg streamed past (`StreamedBackground`); `scratch`: the
    run's folder, where the bands' labels are kept until the overlays are drawn."""
    resolution = Resolution.from_tile_size(tile_size)
    cells = slide_cells(bands, width, height, options.seg_thresh, threads, background, scratch)
    kept = options.above_noise(cells.sizes, resolution)
    default_size = default_size_threshold(cells.sizes[kept], resolution, threads) \
        if options.wants_default_size else None
    size_thresh = options.size_threshold(default_size)
    marker_thresh = options.marker_thresh
    if marker_thresh == "default":
        marker_thresh = slide_marker_threshold(cells.marker_histogram)
    counted = kept & options.counted(cells.sizes, size_thresh)
    values = cells.mean_optical_density() if options.uses_optical_density else cells.marker
    is_positive = options.positive(cells.positive, values, marker_thresh)
    scoring = options.scoring(counted, is_positive, size_thresh, marker_thresh if has_marker else None)
    table = counted_cells(cells, np.flatnonzero(counted), is_positive, cells.marker,
                          cells.marker_sum if has_marker else None)
    counted_ids = np.zeros(len(counted), np.int32)
    counted_ids[counted] = np.arange(1, len(table) + 1)
    return SlideScore(scoring, table, counted, is_positive, cells.first_pixel[counted], is_positive[counted],
                      cells.labels, counted_ids, cells, kept, resolution, default_size)


def band_rows(width: int) -> int:
    """Rows per band: about 4 megapixels, so memory stays bounded whatever the slide's size."""
    return int(min(2048, max(16, BAND_PIXELS // max(width, 1))))


def _ihc_rows(stack: contextlib.ExitStack, ihc_path: Path | None) -> Callable[[int, int], np.ndarray | None]:
    """(top, count) -> full-width level-0 rows of the input slide, or None without one."""
    if ihc_path is None:
        return lambda top, count: None
    slide = stack.enter_context(open_slide(ihc_path))
    return slide.read_rows


def slide_bands(seg_path: Path, marker_path: Path | None, ihc_path: Path | None = None) -> Bands:
    """Bands of level 0 of a Seg (and Marker) slide, such as the pyramids `infer` writes, read region by
    region through the slide reader; with `ihc_path`, the input slide's rows too."""

    def bands(measuring: bool = True) -> Iterator[Band]:
        with contextlib.ExitStack() as stack:
            seg = stack.enter_context(open_slide(seg_path))
            marker = stack.enter_context(open_slide(marker_path)) if marker_path is not None and measuring else None
            ihc = _ihc_rows(stack, ihc_path if measuring else None)
            height, rows = seg.info.height, band_rows(seg.info.width)
            for top in range(0, height, rows):
                count = min(rows, height - top)
                yield Band(top, seg.read_rows(top, count), None if marker is None else marker.read_rows(top, count),
                           ihc(top, count))
    return bands


def region_bands(seg_regions: list[Path], marker_regions: list[Path] | None, ihc_path: Path | None = None) -> Bands:
    """Bands of level 0 of the network's Seg (and Marker) as a slide run keeps them: tiled TIFF regions,
    top to bottom (with `ihc_path`, the input slide's rows too). Scoring reads these rather than the
    published pyramids, so it needs no pyramid of an output nobody asked for, and does not wait for them."""

    def bands(measuring: bool = True) -> Iterator[Band]:
        with contextlib.ExitStack() as stack:
            seg = stack.enter_context(LevelRows(seg_regions))
            marker = stack.enter_context(LevelRows(marker_regions)) \
                if marker_regions is not None and measuring else None
            ihc = _ihc_rows(stack, ihc_path if measuring else None)
            rows = band_rows(seg.width)
            for top in range(0, seg.height, rows):
                count = min(rows, seg.height - top)
                yield Band(top, seg.rows(top, count), None if marker is None else marker.rows(top, count),
                           ihc(top, count))
    return bands
