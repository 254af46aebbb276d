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
from .overlays import RASTER_FOUR_NEIGHBOURS, cell_codes, outline, paint
from .postprocessing import mark_background
from .scoring_rules import PostprocessOptions


@dataclass
class Rescored:
    overlaid: np.ndarray
    refined: np.ndarray
    scoring: dict


@dataclass
class RescoredCells:
    """The scoring from cell data, and the counted cells with their class (what the images draw)."""
    scoring: dict
    counted: list[dict]
    positive: np.ndarray  # per counted cell


def rescore_cells(cells: list[dict], settings: dict, version: int,
                  options: PostprocessOptions = PostprocessOptions()) -> RescoredCells:
    """DeepLIIF's scoring from cell data. As in 1.2.7, optical-density thresholds apply only to data of
    versions 5 and 6 (which carry `od`), Marker thresholds only to 3 and 4 (which carry `marker`)."""
    by_density = uses_optical_density(version)
    key = "od" if by_density else "marker"
    marker_thresh = None if by_density else options.marker_thresh
    if marker_thresh == "default":
        marker_thresh = settings.get("default_marker_thresh")
        if marker_thresh is None:
            raise ArgumentError("marker_thresh 'default': this cell data has no default_marker_thresh "
                                "(it was made without a Marker image)")
    band = options if by_density else PostprocessOptions()
    size_thresh = options.size_threshold(settings.get("default_size_thresh"))
    counted = options.counted(np.array([cell["size"] for cell in cells], np.int64), size_thresh)
    values = np.array([cell[key] for cell in cells], np.int64)
    colour = np.array([bool(cell["positive"]) for cell in cells], bool)
    is_positive = band.positive(colour, values, marker_thresh)
    scoring = options.scoring(counted, is_positive, size_thresh, marker_thresh, settings["seg_thresh"])
    return RescoredCells(scoring, [c for c, keep in zip(cells, counted) if keep], is_positive[counted])


def rescore(cells: list[dict], settings: dict, version: int, orig: np.ndarray,
            options: PostprocessOptions = PostprocessOptions()) -> Rescored:
    """DeepLIIF's scoring and images for `orig` from its cell data (`cells_to_final_results`)."""
    rescored = rescore_cells(cells, settings, version, options)
    height, width = orig.shape[:2]
    boundaries = BoundaryPixels(rescored.counted, rescored.positive, width, height)
    drawn = boundaries.rows(0, height)
    background = mark_background(drawn == 0)
    overlaid, refined = outline_and_paint(orig, background, cell_codes(~background, positive_pixels(drawn, background)))
    return Rescored(overlaid, refined, rescored.scoring)


class BoundaryPixels:
    """Every pixel of the counted cells' boundaries with its class, sorted by row, so any rows of the
    image are drawn without the others."""

    def __init__(self, cells: list[dict], positive: np.ndarray, width: int, height: int) -> None:
        parts = [np.array(full_contour([tuple(p) for p in cell["boundary"]]), np.int64).reshape(-1, 2)
                 for cell in cells]
        for index, points in enumerate(parts):
            if points.min() < 0 or points[:, 0].max() >= width or points[:, 1].max() >= height:
                raise ArgumentError(f"cell {index} of the cell data lies outside the {width}x{height} image: "
                                    "give the image the cell data was made from")
        points = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        classes = np.repeat(np.where(positive, 1, 2).astype(np.int8), [len(p) for p in parts])
        flat = points[:, 1] * width + points[:, 0]
        order = np.argsort(flat, kind="stable")
        ordered = flat[order]
        kept = order[np.append(ordered[1:] != ordered[:-1], True)] if len(flat) else order  # shared pixel: the later
        self.x, self.y, self.classes, self.width = points[kept, 0], points[kept, 1], classes[kept], width

    def rows(self, top: int, count: int) -> np.ndarray:
        """Rows [top, top + count): 0 where no boundary runs, 1 on a positive cell's, 2 on a negative's."""
        low, high = np.searchsorted(self.y, [top, top + count])
        drawn = np.zeros((count, self.width), np.int8)
        drawn[self.y[low:high] - top, self.x[low:high]] = self.classes[low:high]
        return drawn


def positive_pixels(drawn: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Positive boundaries, and the enclosed pixels whose nearest boundary to the left in their row is a
    positive one (row by row, so any rows are filled alone)."""
    height, width = drawn.shape
    enclosed = (drawn == 0) & ~background
    columns = np.broadcast_to(np.arange(width), (height, width))
    left = np.maximum.accumulate(np.where(enclosed, -1, columns), axis=1)  # the boundary left of each run
    return (drawn == 1) | (enclosed & (np.take_along_axis(drawn, np.maximum(left, 0), axis=1) == 1))


def outline_and_paint(orig: np.ndarray, background: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SegOverlaid and SegRefined from the cells' codes (every pixel not background is in a cell): the
    background 4-adjacent to a cell (the first such neighbour in raster order deciding), grown twice through
    the 8-neighbourhood as for `overlays.outline`, whose reach in rows it shares; no seed pixels."""
    return paint(orig, outline(background, cells, first_step=RASTER_FOUR_NEIGHBOURS), cells)
