"""What a cell's count and class depend on, as DeepLIIF 1.2.7 decides them: the options, the magnification
the tile size implies, and the positivity rule (colour, Marker threshold, optical-density band).

With an optical-density threshold (`od_thresh_lower` / `od_thresh_upper`), each cell's value is the mean
optical density of the input IHC over the cell, `round(100 * sum of log10(255 / v) over R, G, B)` per
pixel (0 counts as 1), in place of the Marker's maximum: a cell outside the band is negative whatever its
colour.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import ArgumentError

DEFAULT_SEG_THRESH = 120
DEFAULT_NOISE_THRESH = 4

Threshold = int | Literal["default"] | None


class Resolution(enum.Enum):
    """Magnification implied by the tile size, with its (min, default, max) sqrt-size thresholds and the
    size above which a component is noise when `large_noise_thresh` is "default"."""

    X40 = "40x"
    X20 = "20x"
    X10 = "10x"

    @classmethod
    def from_tile_size(cls, tile_size: int) -> Resolution:
        return cls.X40 if tile_size > 384 else cls.X20 if tile_size > 192 else cls.X10

    @property
    def sqrt_size_range(self) -> tuple[int, int, int]:
        return {"40x": (4, 7, 10), "20x": (3, 4, 6), "10x": (2, 2, 3)}[self.value]

    @property
    def large_noise_size(self) -> int:
        return {"40x": 16000, "20x": 4000, "10x": 1000}[self.value]


@dataclass(frozen=True)
class PostprocessOptions:
    seg_thresh: int = DEFAULT_SEG_THRESH
    size_thresh: Threshold = "default"
    size_thresh_upper: int | None = None
    marker_thresh: Threshold = None
    noise_thresh: int = DEFAULT_NOISE_THRESH
    large_noise_thresh: Threshold = None
    od_thresh_lower: int | None = None
    od_thresh_upper: int | None = None

    def __post_init__(self) -> None:
        _check_int("seg_thresh", self.seg_thresh, 0, 510)
        for name in ("size_thresh", "marker_thresh", "large_noise_thresh"):
            _check_threshold(name, getattr(self, name))
        for name in ("size_thresh_upper", "od_thresh_lower", "od_thresh_upper"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, None)
        _check_int("noise_thresh", self.noise_thresh, 0, None)
        if self.uses_optical_density and self.marker_thresh == "default":
            raise ArgumentError("marker_thresh 'default' comes from the Marker image; with od_thresh_lower or "
                                "od_thresh_upper positivity comes from the IHC's optical density: give a number "
                                "or leave marker_thresh unset")

    @property
    def uses_optical_density(self) -> bool:
        return self.od_thresh_lower is not None or self.od_thresh_upper is not None

    def large_noise_size(self, resolution: Resolution) -> int | None:
        """The size from which a component is noise, with "default" resolved by magnification."""
        return resolution.large_noise_size if self.large_noise_thresh == "default" else self.large_noise_thresh

    def above_noise(self, sizes: np.ndarray, resolution: Resolution) -> np.ndarray:
        """Per cell: kept, i.e. larger than `noise_thresh` and smaller than the large-noise size where the
        resolution has one."""
        kept = sizes > self.noise_thresh
        large_noise = self.large_noise_size(resolution)
        if large_noise is not None:
            kept &= sizes < large_noise
        return kept

    @property
    def wants_default_size(self) -> bool:
        return self.size_thresh == "default"

    def size_threshold(self, default_size: int | None) -> int:
        """The size threshold in force: the number given, else `default_size` (DeepLIIF's default, from the
        cells' sizes) for "default"; 0 (no threshold) for None."""
        if self.wants_default_size and default_size is None:
            raise ArgumentError("size_thresh 'default' needs the default size threshold of the cells")
        return (default_size if self.wants_default_size else self.size_thresh) or 0

    def counted(self, sizes: np.ndarray, size_thresh: int) -> np.ndarray:
        """Per cell: counted, i.e. larger than `size_thresh` (resolved) and smaller than `size_thresh_upper`."""
        counted = sizes > size_thresh
        if self.size_thresh_upper is not None:
            counted &= sizes < self.size_thresh_upper
        return counted

    def scoring(self, counted: np.ndarray, positive: np.ndarray, size_thresh: int, marker_thresh: int | None,
                seg_thresh: int | None = None) -> dict:
        """DeepLIIF's scoring record of the counted cells; `seg_thresh` defaults to this options' own
        (re-scoring reports the one its cell data was made with)."""
        num_total, num_pos = int(np.count_nonzero(counted)), int(np.count_nonzero(counted & positive))
        return {"num_total": num_total, "num_pos": num_pos, "num_neg": num_total - num_pos,
                "percent_pos": round(num_pos / num_total * 100, 1) if num_pos > 0 else 0,
                "seg_thresh": self.seg_thresh if seg_thresh is None else seg_thresh, "size_thresh": int(size_thresh),
                "size_thresh_upper": self.size_thresh_upper, "marker_thresh": marker_thresh}

    def positive(self, colour_positive: np.ndarray, values: np.ndarray, marker_thresh: int | None) -> np.ndarray:
        """Per cell: positive by colour, or by a value over `marker_thresh`; then negative outside the
        optical-density band. `values` are the Marker maxima, or the mean optical densities."""
        positive = colour_positive | (values > (np.iinfo(np.int64).max if marker_thresh is None else marker_thresh))
        if self.od_thresh_lower is not None:
            positive &= values >= self.od_thresh_lower
        if self.od_thresh_upper is not None:
            positive &= values <= self.od_thresh_upper
        return positive


def optical_density(image: np.ndarray) -> np.ndarray:
    """Per pixel of an RGB image, `round(100 * sum over channels of log10(255 / v))` (v = 0 read as 1),
    as uint16, summed channel by channel in float64 as DeepLIIF does, halves rounded to even."""
    table = np.array([np.log10(255 / max(v, 1)) for v in range(256)], np.float64)
    total = table[image[..., 0]] + table[image[..., 1]] + table[image[..., 2]]
    return np.rint(total * 100).astype(np.uint16)


def mean_density(density_sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per cell, its summed optical density over its size, halves rounded to even (DeepLIIF's `round`)."""
    return np.rint(density_sums / np.maximum(sizes, 1)).astype(np.int64)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{name} must be an integer; got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ArgumentError(f"{name} must be {bound}; got {value}")


def _check_threshold(name: str, value: object) -> None:
    if value is not None and value != "default":
        _check_int(name, value, 0, None)
