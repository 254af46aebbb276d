"""DeepLIIF 1.2.7's scoring options: optical-density thresholds and the default large-noise size."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deepliif.errors import ArgumentError
from deepliif.postprocessing import postprocess
from deepliif.scoring_rules import PostprocessOptions, Resolution, optical_density
from deepliif.slide_scoring import score_slide

from .bands import array_bands

from .test_postprocessing import _load, _tiles, assert_overlays_match


def test_optical_density_is_deepliifs_per_pixel_formula() -> None:
    image = np.array([[[0, 1, 255], [128, 64, 32]]], np.uint8)
    table = [math.log10(255 / max(v, 1)) for v in range(256)]
    expected = [[round((table[r] + table[g] + table[b]) * 100) for r, g, b in row] for row in image.tolist()]
    assert optical_density(image).tolist() == expected and optical_density(image).dtype == np.uint16


@pytest.mark.parametrize("case", ["od_lower", "od_band"])
def test_od_thresholds_score_and_draw_as_deepliif_127(deepliif_fixtures: Path, case: str) -> None:
    for tile in _tiles(deepliif_fixtures):
        reference = deepliif_fixtures / "postprocess-1.2.7" / tile.name
        expected = json.loads((reference / "reference.json").read_text())["cases"][case]
        result = postprocess(*_load(tile), 512, PostprocessOptions(**expected["arguments"]))
        assert result.scoring == expected["scoring"], tile.name
        assert_overlays_match(result.overlaid, result.refined, reference, f"{case}_")


def test_large_noise_default_follows_the_magnification(deepliif_fixtures: Path) -> None:
    assert [r.large_noise_size for r in Resolution] == [16000, 4000, 1000]
    ihc, seg, marker = _load(_tiles(deepliif_fixtures)[0])
    at_10x = postprocess(ihc, seg, marker, 128, PostprocessOptions(large_noise_thresh="default", size_thresh=0))
    explicit = postprocess(ihc, seg, marker, 128, PostprocessOptions(large_noise_thresh=1000, size_thresh=0))
    unlimited = postprocess(ihc, seg, marker, 128, PostprocessOptions(size_thresh=0))
    assert at_10x.scoring == explicit.scoring
    assert at_10x.scoring["num_total"] <= unlimited.scoring["num_total"]


def test_od_thresholds_refuse_what_they_cannot_mean() -> None:
    with pytest.raises(ArgumentError, match="marker_thresh 'default'"):
        PostprocessOptions(od_thresh_lower=50, marker_thresh="default")
    with pytest.raises(ArgumentError, match="od_thresh_upper"):
        PostprocessOptions(od_thresh_upper=-1)
    seg = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ArgumentError, match="bands that carry the IHC"):
        score_slide(array_bands(seg, None, 8), 16, 16, 512, False, PostprocessOptions(od_thresh_lower=10))


@pytest.mark.parametrize("case", ["od_lower", "od_band"])
def test_od_thresholds_score_a_slide_in_bands_as_deepliif_127(deepliif_fixtures: Path, case: str) -> None:
    """Bands of 37 rows cut through the cells; each cell's optical density is summed across them and the
    slide scores exactly as DeepLIIF 1.2.7 scores the image."""
    for tile in _tiles(deepliif_fixtures):
        expected = json.loads((deepliif_fixtures / "postprocess-1.2.7" / tile.name / "reference.json").read_text())
        arguments = expected["cases"][case]["arguments"]
        ihc, seg, marker = _load(tile)
        score = score_slide(array_bands(seg, marker, 37, ihc), seg.shape[1], seg.shape[0], 512, True,
                            PostprocessOptions(**arguments), threads=2)
        assert score.scoring == expected["cases"][case]["scoring"], tile.name
        assert score.cells == postprocess(ihc, seg, marker, 512, PostprocessOptions(**arguments)).cells


def test_the_size_threshold_in_force_is_the_number_given_or_the_default_asked_for() -> None:
    assert PostprocessOptions(size_thresh=40).size_threshold(77) == 40
    assert PostprocessOptions(size_thresh=None).size_threshold(77) == 0
    assert PostprocessOptions(size_thresh="default").size_threshold(77) == 77
    assert PostprocessOptions(size_thresh=40).size_threshold(None) == 40
    with pytest.raises(ArgumentError, match="size_thresh 'default' needs"):
        PostprocessOptions(size_thresh="default").size_threshold(None)
