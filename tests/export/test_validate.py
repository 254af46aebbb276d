from __future__ import annotations

import math

import numpy as np
import pytest

from deepliif.errors import ArgumentError
from deepliif.pipeline import OUTPUT_NAMES
from engine.errors import ValidationError
from engine.samples import synthetic_ihc
from export.config import Tolerance
from export.validate import ImageStats, format_report, validate


def _fake_runner(tiles: np.ndarray) -> dict[str, np.ndarray]:
    """A deterministic stand-in for a model: each output is a fixed function of the tile."""
    seg = np.zeros_like(tiles)
    seg[..., 0] = np.where(tiles[..., 2] > 140, 255, 0)  # blue-ish nuclei -> negative cells
    seg[..., 2] = np.where(tiles[..., 0] < 200, 255, 0)
    marker = 255 - tiles
    return {"Hema": tiles, "DAPI": tiles // 2, "Lap2": tiles // 3, "Marker": marker, "Seg": seg}


def _shifted(names: tuple[str, ...], by: int):
    def run(tiles: np.ndarray) -> dict[str, np.ndarray]:
        outputs = dict(_fake_runner(tiles))
        for name in names:
            outputs[name] = np.clip(outputs[name].astype(int) + by, 0, 255).astype(np.uint8)
        return outputs
    return run


TILES = np.stack([synthetic_ihc(seed=s) for s in range(4)])


def test_image_stats() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert ImageStats.between(a, b).psnr_db == math.inf and ImageStats.between(a, b).as_dict()["psnr_db"] is None
    b[0, 0, 0] = 3
    stats = ImageStats.between(a, b)
    assert stats.max_abs == 3 and stats.mean_abs == pytest.approx(3 / 48)
    assert stats.psnr_db == pytest.approx(10 * math.log10(255 ** 2 / (9 / 48)))


def test_identical_candidate_passes_with_a_full_report() -> None:
    report = validate(_fake_runner, _fake_runner, TILES, (1, 4), Tolerance(max_abs=1))
    assert report["passed"] and report["failures"] == [] and set(report["batches"]) == {"1", "4"}
    for entry in report["batches"].values():
        assert set(entry["outputs"]) == set(OUTPUT_NAMES)
        assert entry["cell_counts"]["max_num_pos_delta"] == 0
    assert "PASSED" in format_report(report)


def test_every_failing_output_is_collected_before_raising() -> None:
    with pytest.raises(ValidationError) as caught:
        validate(_fake_runner, _shifted(("Hema", "Lap2"), 2), TILES, (1, 2), Tolerance(max_abs=1))
    failures = caught.value.failures
    assert len(failures) == 4  # two outputs at two batch sizes
    assert all("max abs difference 2 > 1" in f for f in failures)
    assert {f.split()[2] for f in failures} == {"Hema", "Lap2"}
    assert caught.value.report["passed"] is False
    assert "FAILED" in format_report(caught.value.report)


def test_psnr_and_cell_count_gates() -> None:
    with pytest.raises(ValidationError, match="PSNR"):
        validate(_fake_runner, _shifted(("DAPI",), 40), TILES, (1,), Tolerance(max_abs=None, min_psnr=30))
    def flipped_seg(tiles):  # positive <-> negative: a clinical change, whatever the PSNR says
        outputs = dict(_fake_runner(tiles))
        outputs["Seg"] = outputs["Seg"][..., ::-1].copy()
        return outputs
    baseline = validate(_fake_runner, _fake_runner, TILES, (1,), Tolerance(max_abs=None))
    assert baseline["passed"]
    with pytest.raises(ValidationError, match="percent positive"):
        validate(_fake_runner, flipped_seg, TILES, (1,),
                 Tolerance(max_abs=None, max_percent_pos_delta=1.0))


@pytest.mark.parametrize("sizes", [(), (0,), (8,)])
def test_bad_batch_sizes(sizes) -> None:
    with pytest.raises(ArgumentError):
        validate(_fake_runner, _fake_runner, TILES, sizes, Tolerance())
