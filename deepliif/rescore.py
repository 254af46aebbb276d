"""Re-scoring from DeepLIIF 1.2.7 cell data alone (`cells_to_final_results`): counts, SegOverlaid and
SegRefined without the Seg, so a lab re-scores a cohort with new thresholds in seconds.

Each counted cell's boundary is drawn in its class; pixels that no boundary encloses (4-connected to the
image border) are background; enclosed pixels take the class of the boundary to their left in the same
row. The outline is then the background 4-adjacent to a cell, its class that of the first such cell pixel
in raster order (up, left, right, down), grown twice into the background through the 8-neighbourhood,
the first outline pixel in raster order deciding each new one: DeepLIIF's raster-order label writes, as
whole-array steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cell_data import full_contour, uses_optical_density
from .errors import ArgumentError
from .postprocessing import RASTER_FOUR_NEIGHBOURS, RASTER_NEIGHBOURS, grow, mark_background, paint
from .scoring_rules import PostprocessOptions


@dataclass
class Rescored:
    overlaid: np.ndarray
    refined: np.ndarray
    scoring: dict


def rescore(cells: list[dict], settings: dict, version: int, orig: np.ndarray,
            options: PostprocessOptions = PostprocessOptions()) -> Rescored:
    """DeepLIIF's scoring and images for `orig` from its cell data. As in 1.2.7, optical-density
    thresholds apply only to data of versions 5 and 6 (which carry `od`), Marker thresholds only to 3
    and 4 (which carry `marker`)."""
    by_density = uses_optical_density(version)
    key = "od" if by_density else "marker"
    marker_thresh = None if by_density else options.marker_thresh
    if marker_thresh == "default":
        marker_thresh = settings.get("default_marker_thresh")
        if marker_thresh is None:
            raise ArgumentError("marker_thresh 'default': this cell data has no default_marker_thresh "
                                "(it was made without a Marker image)")
    band = options if by_density else PostprocessOptions()
    size_thresh = settings["default_size_thresh"] if options.size_thresh == "default" else options.size_thresh or 0
    counted = options.counted(np.array([cell["size"] for cell in cells], np.int64), size_thresh)
    values = np.array([cell[key] for cell in cells], np.int64)
    colour = np.array([bool(cell["positive"]) for cell in cells], bool)
    is_positive = band.positive(colour, values, marker_thresh)
    overlaid, refined = _draw(orig, [c for c, keep in zip(cells, counted) if keep], is_positive[counted])
    scoring = options.scoring(counted, is_positive, size_thresh, marker_thresh, settings["seg_thresh"])
    return Rescored(overlaid, refined, scoring)


def _draw(orig: np.ndarray, cells: list[dict], positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height, width = orig.shape[:2]
    drawn = np.zeros((height, width), np.int8)  # 0: no boundary, 1: positive boundary, 2: negative boundary
    for index, (cell, is_positive) in enumerate(zip(cells, positive)):
        points = np.array(full_contour([tuple(p) for p in cell["boundary"]]), np.int64)
        if points.min() < 0 or points[:, 0].max() >= width or points[:, 1].max() >= height:
            raise ArgumentError(f"cell {index} of the cell data lies outside the {width}x{height} image: "
                                "give the image the cell data was made from")
        drawn[points[:, 1], points[:, 0]] = 1 if is_positive else 2
    unknown = drawn == 0
    background = mark_background(unknown)
    enclosed = unknown & ~background
    columns = np.broadcast_to(np.arange(width), (height, width))
    left = np.maximum.accumulate(np.where(enclosed, -1, columns), axis=1)  # the boundary left of each run
    filled_positive = enclosed & (np.take_along_axis(drawn, np.maximum(left, 0), axis=1) == 1)
    in_cell = ~background
    positive_pixels = (drawn == 1) | filled_positive
    border, border_positive = grow(in_cell, positive_pixels, background, RASTER_FOUR_NEIGHBOURS[::-1])
    border &= background
    for _ in range(2):
        border, border_positive = grow(border, border_positive, background, RASTER_NEIGHBOURS[::-1])
    return paint(orig, border, border_positive & border, in_cell, positive_pixels)
