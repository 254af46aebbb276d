"""Re-scoring a slide from its cell data, band by band, equals re-scoring the same pixels as one image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepliif.postprocessing import postprocess
from deepliif.rescore import rescore, rescore_cells
from deepliif.scoring_rules import PostprocessOptions
from deepliif.slide_rescore import draw_rescored_slide

from .test_slide_scoring import on_glass


def draw_in_bands(cells: list[dict], settings: dict, version: int, orig: np.ndarray, options: PostprocessOptions,
                  band_height: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    height, width = orig.shape[:2]
    overlaid, refined = np.zeros_like(orig), np.zeros_like(orig)
    written = []

    def sink(top: int, over: np.ndarray, refine: np.ndarray) -> None:
        written.append((top, len(over)))
        overlaid[top: top + len(over)], refined[top: top + len(refine)] = over, refine

    draw_rescored_slide(rescore_cells(cells, settings, version, options), width, height,
                        lambda top, count: orig[top: top + count], sink, threads, band_height)
    assert [top for top, _ in written] == sorted({top for top, _ in written})  # top to bottom, each row once
    assert sum(count for _, count in written) == height
    return overlaid, refined


@pytest.mark.parametrize("band_height, threads", [(1, 1), (29, 2), (97, 3), (4000, 1)])
@pytest.mark.parametrize("version, options", [(3, PostprocessOptions()),
                                              (5, PostprocessOptions(od_thresh_lower=40, size_thresh=30))])
def test_slide_rescoring_draws_the_images_of_the_whole_image(deepliif_fixtures: Path, band_height: int,
                                                             threads: int, version: int,
                                                             options: PostprocessOptions) -> None:
    """The fixture tiles on a larger canvas, their cell data re-scored in bands of 1 to 4000 rows: the same
    SegOverlaid and SegRefined, pixel for pixel, as re-scoring the canvas as one image."""
    orig, seg, marker = on_glass(deepliif_fixtures)
    document = postprocess(orig, seg, marker, 512, cell_data=version).cell_data
    cells, settings = document["cells"], document["settings"]
    whole = rescore(cells, settings, version, orig, options)
    assert whole.scoring["num_total"] > 100
    overlaid, refined = draw_in_bands(cells, settings, version, orig, options, band_height, threads)
    np.testing.assert_array_equal(overlaid, whole.overlaid)
    np.testing.assert_array_equal(refined, whole.refined)


def test_nothing_counted_draws_the_input_alone(deepliif_fixtures: Path) -> None:
    """A size threshold above every cell counts none: image and slide re-scoring give the input unchanged
    as SegOverlaid and a black SegRefined, and score zero."""
    orig, seg, marker = on_glass(deepliif_fixtures)
    document = postprocess(orig, seg, marker, 512, cell_data=3).cell_data
    options = PostprocessOptions(size_thresh=10**9)
    whole = rescore(document["cells"], document["settings"], 3, orig, options)
    assert whole.scoring["num_total"] == 0
    np.testing.assert_array_equal(whole.overlaid, orig)
    assert not whole.refined.any()
    overlaid, refined = draw_in_bands(document["cells"], document["settings"], 3, orig, options, 97, 2)
    np.testing.assert_array_equal(overlaid, orig)
    assert not refined.any()
