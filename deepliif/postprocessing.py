"""From the Seg image to cells, counts and the SegOverlaid / SegRefined images, vectorised.

DeepLIIF does this with per-pixel flood fills under a JIT; here every step is a whole-array operation
(scipy.ndimage labelling, bincounts, shifted masks) that gives the same cells, thresholds and counts.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage

from .cells import Cell, counted_cells
from .errors import ArgumentError

DEFAULT_SEG_THRESH = 120
DEFAULT_NOISE_THRESH = 4
KDE_POINTS = 500
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)
# Neighbour offsets (dy, dx) in the raster order of the *source* pixel relative to its target.
_RASTER_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
_RASTER_FOUR_NEIGHBOURS = [(-1, 0), (0, -1), (0, 1), (1, 0)]

Threshold = int | Literal["default"] | None


class Resolution(enum.Enum):
    """Magnification implied by the tile size, with its (min, default, max) sqrt-size thresholds."""

    X40 = "40x"
    X20 = "20x"
    X10 = "10x"

    @classmethod
    def from_tile_size(cls, tile_size: int) -> Resolution:
        return cls.X40 if tile_size > 384 else cls.X20 if tile_size > 192 else cls.X10

    @property
    def sqrt_size_range(self) -> tuple[int, int, int]:
        return {"40x": (4, 7, 10), "20x": (3, 4, 6), "10x": (2, 2, 3)}[self.value]


@dataclass(frozen=True)
class PostprocessOptions:
    seg_thresh: int = DEFAULT_SEG_THRESH
    size_thresh: Threshold = "default"
    size_thresh_upper: int | None = None
    marker_thresh: Threshold = None
    noise_thresh: int = DEFAULT_NOISE_THRESH
    large_noise_thresh: int | None = None

    def __post_init__(self) -> None:
        _check_int("seg_thresh", self.seg_thresh, 0, 510)
        _check_threshold("size_thresh", self.size_thresh)
        _check_threshold("marker_thresh", self.marker_thresh)
        for name in ("size_thresh_upper", "large_noise_thresh"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, None)
        _check_int("noise_thresh", self.noise_thresh, 0, None)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{name} must be an integer; got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ArgumentError(f"{name} must be {bound}; got {value}")


def _check_threshold(name: str, value: object) -> None:
    if value is not None and value != "default":
        _check_int(name, value, 0, None)


@dataclass
class CellTable:
    """Connected cells of a Seg image. Arrays are indexed by cell label (index 0 is background)."""

    labels: np.ndarray  # int32 [H, W], 0 = background
    background: np.ndarray  # bool [H, W]
    sizes: np.ndarray
    positive: np.ndarray  # bool: positive pixels >= negative pixels
    marker: np.ndarray  # max Marker grey value over the cell (0 without a Marker image)
    first_pixel: np.ndarray  # flat index of each cell's first pixel in raster order
    kept: np.ndarray  # bool: above the noise threshold


@dataclass
class PostprocessResult:
    overlaid: np.ndarray
    refined: np.ndarray
    scoring: dict
    cells: list[Cell] = field(default_factory=list)  # every counted cell, for the per-cell table


def classify_pixels(seg: np.ndarray, seg_thresh: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative cell pixels: R + B above the threshold, G <= 80; positive when R >= B."""
    red, green, blue = (seg[:, :, c].astype(np.int16) for c in range(3))
    cell = (red + blue > seg_thresh) & (green <= 80)
    positive = cell & (red >= blue)
    return positive, cell & ~positive


def mark_background(unknown: np.ndarray) -> np.ndarray:
    """Unknown pixels 4-connected to the image border through unknown pixels."""
    labels, _ = ndimage.label(unknown, structure=_FOUR_CONNECTED)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    touching = np.unique(edge[edge > 0])
    return np.isin(labels, touching)


def find_cells(seg: np.ndarray, marker: np.ndarray | None, options: PostprocessOptions) -> CellTable:
    positive, negative = classify_pixels(seg, options.seg_thresh)
    background = mark_background(~(positive | negative))
    labels, count = ndimage.label(~background, structure=_EIGHT_CONNECTED)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count + 1)
    n_pos = np.bincount(flat, weights=positive.ravel(), minlength=count + 1)
    n_neg = np.bincount(flat, weights=negative.ravel(), minlength=count + 1)
    marker_values = np.zeros(count + 1, dtype=np.int64)
    if marker is not None and count:
        grey = marker.max(axis=2) if marker.ndim == 3 else marker
        marker_values[1:] = ndimage.maximum(grey, labels, index=np.arange(1, count + 1))
    present, first_index = np.unique(flat, return_index=True)
    first = np.full(count + 1, -1, dtype=np.int64)  # -1 only for label 0 when nothing is background
    first[present] = first_index
    kept = sizes > options.noise_thresh
    if options.large_noise_thresh is not None:
        kept &= sizes < options.large_noise_thresh
    kept[0] = False
    return CellTable(labels, background, sizes, n_pos >= n_neg, marker_values, first, kept)


def kernel_density(values: np.ndarray, points: int = KDE_POINTS, bandwidth: float = 1.0) -> tuple[np.ndarray, float]:
    """Gaussian KDE at `i * step`, `step = (max + 1) / points`, summed in DeepLIIF's order, kept in float32."""
    step = (float(values.max()) + 1) / points
    x = np.arange(points, dtype=np.float64) * step
    total = np.zeros(points, dtype=np.float64)
    for chunk in np.array_split(values, max(1, len(values) // 4096)):
        z = (x[:, None] - chunk[None, :]) / bandwidth
        terms = np.exp(-(z * z / 2)) * (1 / np.sqrt(2 * np.pi))
        total = np.cumsum(np.concatenate([total[:, None], terms], axis=1), axis=1)[:, -1]
    return (total / (len(values) * bandwidth)).astype(np.float32), step


def default_size_threshold(sizes: np.ndarray, resolution: Resolution) -> int:
    """Size at the first valley of the sqrt-size distribution, clamped to the resolution's range."""
    if len(sizes) <= 1:
        return 0
    kde, step = kernel_density(np.sqrt(sizes.astype(np.float64)))
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
    grey = marker.max(axis=2) if marker.ndim == 3 else marker
    nonzero = grey[grey != 0]
    if nonzero.size == 0:
        return 0
    low, high = round(float(np.percentile(nonzero, 0.1))), round(float(np.percentile(nonzero, 99.9)))
    return round((high - low) * 0.9) + low


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = mask[y + dy, x + dx], False outside the image."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)] = \
        mask[max(0, dy): h - max(0, -dy), max(0, dx): w - max(0, -dx)]
    return out


def cell_borders(cells: CellTable, counted: np.ndarray, is_positive: np.ndarray, in_counted: np.ndarray,
                 positive_pixels: np.ndarray, grow_steps: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Outlines of counted cells; `counted`/`is_positive` are per cell, `in_counted`/`positive_pixels` the
    same as pixel masks. Returns (outline, outline_is_positive)."""
    ids = np.flatnonzero(counted)
    return outline(cells.background, in_counted, positive_pixels, cells.first_pixel[ids], is_positive[ids],
                   grow_steps)


def outline(background: np.ndarray, in_counted: np.ndarray, positive_pixels: np.ndarray, seeds: np.ndarray,
            seeds_positive: np.ndarray, grow_steps: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Background pixels 4-adjacent to a counted cell, grown `grow_steps` times (8-neighbourhood) into
    background; where outlines of two cells meet, the later in raster order wins. DeepLIIF also marks each
    cell's first pixel (its flood-fill seed, a flat index in `seeds`) as outline; so does this. Every step
    looks one pixel away, so a pixel's outline depends on pixels at most `1 + grow_steps` rows away: a band
    with that many rows of halo each side is drawn exactly."""
    border, border_positive = _grow(in_counted, positive_pixels, background, _RASTER_FOUR_NEIGHBOURS)
    border &= background
    for _ in range(grow_steps):
        border, border_positive = _grow(border, border_positive, background, _RASTER_NEIGHBOURS)
    border.ravel()[seeds] = True
    border_positive.ravel()[seeds] = seeds_positive
    return border, border_positive & border


def paint(orig: np.ndarray, border: np.ndarray, border_positive: np.ndarray, in_counted: np.ndarray,
          positive_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SegOverlaid (outlines on the input: red positive, blue negative) and SegRefined (green outlines,
    red/blue interiors on black)."""
    interior = in_counted & ~border
    interior_positive = interior & positive_pixels
    overlaid = orig.copy()
    overlaid[border & border_positive] = (255, 0, 0)
    overlaid[border & ~border_positive] = (0, 0, 255)
    refined = np.zeros_like(orig)
    refined[border, 1] = 255
    refined[interior_positive, 0] = 255
    refined[interior & ~interior_positive, 2] = 255
    return overlaid, refined


def _grow(source: np.ndarray, source_positive: np.ndarray, allowed: np.ndarray,
          offsets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Add allowed pixels next to `source` (at the given offsets, in raster order of the neighbour)."""
    grown, grown_positive = source.copy(), source_positive.copy()
    for dy, dx in offsets:
        reached = _shift(source, dy, dx) & allowed & ~source
        grown |= reached
        grown_positive[reached] = _shift(source_positive, dy, dx)[reached]
    return grown, grown_positive


def postprocess(orig: np.ndarray, seg: np.ndarray, marker: np.ndarray | None, tile_size: int,
                options: PostprocessOptions = PostprocessOptions()) -> PostprocessResult:
    """Cells, counts and the two overlay images for one (stitched) image."""
    if seg.shape[:2] != orig.shape[:2] or (marker is not None and marker.shape[:2] != orig.shape[:2]):
        raise ArgumentError(f"image sizes differ: input {orig.shape[:2]}, Seg {seg.shape[:2]}, "
                            f"Marker {None if marker is None else marker.shape[:2]}")
    if options.marker_thresh == "default" and marker is None:
        raise ArgumentError("marker_thresh 'default' needs the Marker image")
    cells = find_cells(seg, marker, options)
    size_thresh = options.size_thresh
    if size_thresh == "default":
        size_thresh = default_size_threshold(cells.sizes[cells.kept], Resolution.from_tile_size(tile_size))
    size_thresh = size_thresh or 0
    marker_thresh = default_marker_threshold(marker) if options.marker_thresh == "default" else options.marker_thresh

    counted = cells.kept & (cells.sizes > size_thresh)
    if options.size_thresh_upper is not None:
        counted &= cells.sizes < options.size_thresh_upper
    is_positive = cells.positive | (cells.marker > (255 if marker_thresh is None else marker_thresh))
    in_counted = counted[cells.labels]
    positive_pixels = in_counted & is_positive[cells.labels]
    border, border_positive = cell_borders(cells, counted, is_positive, in_counted, positive_pixels)
    overlaid, refined = paint(orig, border, border_positive, in_counted, positive_pixels)

    num_pos = int(np.count_nonzero(counted & is_positive))
    num_total = int(np.count_nonzero(counted))
    scoring = {
        "num_total": num_total,
        "num_pos": num_pos,
        "num_neg": num_total - num_pos,
        "percent_pos": round(num_pos / num_total * 100, 1) if num_pos > 0 else 0,
        "seg_thresh": options.seg_thresh,
        "size_thresh": int(size_thresh),
        "size_thresh_upper": options.size_thresh_upper,
        "marker_thresh": marker_thresh if marker is not None else None,
    }
    cells_table = counted_cells(cells.labels, np.flatnonzero(counted), cells.sizes, is_positive, cells.marker)
    return PostprocessResult(overlaid, refined, scoring, cells_table)
