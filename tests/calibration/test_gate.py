from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.gate import ACCURACY_FILE, GateThresholds, evaluate, format_markdown, require_passed
from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256, write_json
from deepliif.pipeline import OUTPUT_NAMES
from engine.errors import AccuracyGateError
from engine.samples import synthetic_ihc

RED, BLUE = (255, 0, 0), (0, 0, 255)


class PaintedCells:
    """A stand-in network whose Seg output is `positive` red and `negative` blue discs (radius 6), so the
    cell counts after DeepLIIF's postprocessing are known exactly; the modalities echo the input."""

    def __init__(self, positive: int, negative: int, noise: int = 0) -> None:
        self.colours = [RED] * positive + [BLUE] * negative
        self.noise = noise

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        yy, xx = np.mgrid[:512, :512]
        seg = np.zeros_like(batch)
        for k, colour in enumerate(self.colours):
            seg[:, (yy - 100 - 60 * (k // 6)) ** 2 + (xx - 60 - 70 * (k % 6)) ** 2 <= 36] = colour
        echo = np.clip(batch.astype(int) + self.noise, 0, 255).astype(np.uint8)
        return {name: (seg if name == "Seg" else echo) for name in OUTPUT_NAMES}


IMAGES = [("a.png", synthetic_ihc(seed=1)), ("b.png", synthetic_ihc(seed=2))]


def test_identical_candidates_pass_the_strictest_gate() -> None:
    strict = GateThresholds(0, 0, 0, 99.0, 0)
    report = evaluate(PaintedCells(6, 4), PaintedCells(6, 4), IMAGES, strict)
    assert report["passed"] and report["failures"] == []
    first = report["images"][0]
    assert first["reference"] == {"num_total": 10, "num_pos": 6, "num_neg": 4, "percent_pos": 60.0}
    assert first["delta"] == {"num_total": 0, "num_pos": 0, "num_neg": 0, "percent_pos": 0}
    assert report["pooled_percent_pos"] == {"reference": 60.0, "candidate": 60.0, "delta": 0.0}


def test_one_flipped_cell_in_ten_fails_the_default_gate_and_names_the_image() -> None:
    report = evaluate(PaintedCells(6, 4), PaintedCells(5, 5), IMAGES, GateThresholds())
    assert not report["passed"]
    assert report["images"][0]["delta"] == {"num_total": 0, "num_pos": 1, "num_neg": 1, "percent_pos": 10.0}
    assert report["pooled_percent_pos"]["delta"] == 10.0
    assert "a.png: percent positive changes by 10.0 points > 1.0" in report["failures"]
    assert any(f.startswith("pooled percent positive") for f in report["failures"])
    assert report["worst_image"] == "a.png"  # equal deltas: the first image is kept as the worst
    assert "FAILED" in format_markdown(report) and "a.png" in format_markdown(report)


def test_image_quality_and_cell_count_limits_are_gated_only_when_set() -> None:
    report = evaluate(PaintedCells(6, 4), PaintedCells(6, 2, noise=3), IMAGES, GateThresholds(
        max_percent_pos_delta=None, max_pooled_percent_pos_delta=None, max_num_total_delta_ratio=0.1,
        min_psnr=50.0, max_abs=2))
    text = " ".join(report["failures"])
    assert "cell count changes by 2 of 10" in text
    assert "Hema max difference 3 > 2" in text and "Hema PSNR" in text
    assert report["max_abs"]["Hema"] == 3 and report["max_abs"]["Seg"] == 255
    assert report["images"][0]["candidate"]["percent_pos"] == 75.0
    relaxed = evaluate(PaintedCells(6, 4), PaintedCells(6, 2, noise=3), IMAGES,
                       GateThresholds(max_percent_pos_delta=None, max_pooled_percent_pos_delta=None))
    assert relaxed["passed"]


def test_thresholds_are_checked() -> None:
    with pytest.raises(ArgumentError, match="min_psnr must be a non-negative number"):
        GateThresholds(min_psnr=-1)
    with pytest.raises(ArgumentError, match="max_abs"):
        GateThresholds(max_abs=float("nan"))
    with pytest.raises(ArgumentError, match="at least one held-out image"):
        evaluate(PaintedCells(1, 1), PaintedCells(1, 1), [], GateThresholds())


def _graph_with_report(tmp_path: Path, **report) -> Path:
    path = tmp_path / "deepliif.onnx"
    path.write_bytes(b"graph bytes")
    if report:
        write_json(tmp_path / ACCURACY_FILE, {"onnx_sha256": file_sha256(path), **report})
    return path


def test_the_engine_refuses_a_graph_without_a_passed_report(tmp_path: Path, caplog) -> None:
    (tmp_path / "a").mkdir()
    missing = _graph_with_report(tmp_path / "a")
    with pytest.raises(AccuracyGateError, match="no accuracy report"):
        require_passed(missing)
    assert require_passed(missing, force=True) is None
    assert "forced" in caplog.text
    (tmp_path / "b").mkdir()
    failed = _graph_with_report(tmp_path / "b", passed=False, worst_image="x.png", failures=["x.png: bad"])
    with pytest.raises(AccuracyGateError, match=r"failed its accuracy gate \(worst image x.png\): x.png: bad"):
        require_passed(failed)
    (tmp_path / "c").mkdir()
    passed = _graph_with_report(tmp_path / "c", passed=True)
    assert require_passed(passed)["passed"] is True
    passed.write_bytes(b"another graph")
    with pytest.raises(AccuracyGateError, match="for another file"):
        require_passed(passed)
    (tmp_path / "c" / ACCURACY_FILE).write_text("{not json")
    with pytest.raises(AccuracyGateError, match="unreadable"):
        require_passed(passed)
    assert json.loads((tmp_path / "b" / ACCURACY_FILE).read_text())["passed"] is False


@pytest.mark.slow
def test_the_gate_refuses_a_damaged_candidate_of_the_trained_mini_model(deepliif_fixtures: Path,
                                                                         sample_dir: Path) -> None:
    """On weights that find cells the gate has something to judge: the mini DeepLIIF against itself
    passes; with its segmentation weights perturbed by 10% noise it is refused, naming an image."""
    import copy

    import torch

    from deepliif.imageio import read_image
    from deepliif.model_dir import load_model_dir
    from deepliif.pipeline import FusedPipeline, TileRunner
    model = load_model_dir(deepliif_fixtures / "models" / "mini")
    images = [(name, read_image(sample_dir / name)) for name in ("Lung1.png", "34_3.png")]
    reference = TileRunner(FusedPipeline(model))
    same = evaluate(reference, TileRunner(FusedPipeline(model)), images, GateThresholds())
    assert same["passed"] and min(e["reference"]["num_total"] for e in same["images"]) > 20  # it finds cells
    damaged = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for segmenter in damaged.segmenters:
            for weight in segmenter.parameters():
                weight.mul_(1 + 0.1 * torch.randn(weight.shape, generator=generator))
    report = evaluate(reference, TileRunner(FusedPipeline(damaged)), images, GateThresholds())
    assert not report["passed"] and report["worst_image"] in {name for name, _ in images}
    assert any("percent positive" in failure or "cell" in failure for failure in report["failures"])
