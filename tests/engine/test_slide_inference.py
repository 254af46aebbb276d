"""A slide run killed midway resumes from its last whole region and ends with the outputs of a run that
was never killed; nothing it leaves behind looks complete."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from deepliif import slide_checkpoint
from deepliif.model_dir import Layout
from engine.session import Session
from engine.slide_inference import infer_slide

from ..deepliif.test_slides import SLIDE_OUTPUTS, glass_with_tissue, write_ome_pyramid

TILE = 256  # 6 tile rows of 224 on a 1300-row slide; regions of 2 tile rows: 3 regions


class Killed(Exception):
    """Stands for the process dying mid-slide."""


@pytest.fixture
def session(generated_models: dict[Layout, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(slide_checkpoint, "REGION_PIXELS", 1500 * 224 * 2)
    with Session(generated_models[Layout.TORCHSCRIPT], backend="onnxruntime", device="cpu",
                 cache_dir=tmp_path / "cache", batch_size=4) as live:
        yield live


def counting(session: Session, tiles: list[int], kill_when=lambda: False):
    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        if kill_when():
            raise Killed()
        tiles.append(len(batch))
        return session.run(batch)
    return run


def listed_regions(folder: Path) -> int:
    try:
        return len(json.loads((folder / "checkpoint.json").read_text())["regions"])
    except FileNotFoundError:
        return 0


def level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tiff:
        return tiff.series[0].levels[0].asarray()


def test_a_killed_slide_run_resumes_from_its_last_region_with_identical_outputs(session: Session,
                                                                                tmp_path: Path) -> None:
    slide = write_ome_pyramid(tmp_path / "slide.ome.tif", glass_with_tissue())
    whole_tiles: list[int] = []
    infer_slide(session, slide, tmp_path / "whole", TILE, run=counting(session, whole_tiles))

    out, folder = tmp_path / "killed", tmp_path / "killed" / ".slide.resume"
    with pytest.raises(Killed):
        infer_slide(session, slide, out, TILE, run=counting(session, [], lambda: listed_regions(folder) >= 1))
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # nothing looks complete
    assert listed_regions(folder) == 1

    resumed_tiles: list[int] = []
    progress: list[int] = []
    record = json.loads(infer_slide(session, slide, out, TILE, progress.append,
                                    run=counting(session, resumed_tiles)).read_text())
    assert record["resumed"]["from_row"] > 0 and record["resumed"]["tiles_done_before"] == 14  # two rows of 7
    assert 0 < sum(resumed_tiles) < sum(whole_tiles)  # the first region was not run again
    assert sum(progress) == record["tiles"] == 42  # the bar starts where the killed run stopped
    whole = json.loads((tmp_path / "whole" / "slide.json").read_text())
    assert (record["scoring"], record["empty_tiles"]) == (whole["scoring"], whole["empty_tiles"])
    for name in SLIDE_OUTPUTS:
        np.testing.assert_array_equal(level0(out / f"slide_{name}.ome.tif"),
                                      level0(tmp_path / "whole" / f"slide_{name}.ome.tif"), err_msg=name)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the checkpoint is gone


def test_a_damaged_region_or_a_changed_slide_is_not_reused(session: Session, tmp_path: Path) -> None:
    slide = write_ome_pyramid(tmp_path / "slide.ome.tif", glass_with_tissue())
    out, folder = tmp_path / "out", tmp_path / "out" / ".slide.resume"
    with pytest.raises(Killed):
        infer_slide(session, slide, out, TILE, run=counting(session, [], lambda: listed_regions(folder) >= 2))
    region = json.loads((folder / "checkpoint.json").read_text())["regions"][1]
    damaged = folder / region["files"]["Seg"]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-100])  # cut short: the second region is redone
    record = json.loads(infer_slide(session, slide, out, TILE).read_text())
    assert record["resumed"]["tiles_done_before"] == 14

    with pytest.raises(Killed):
        infer_slide(session, slide, out, TILE, run=counting(session, [], lambda: listed_regions(folder) >= 1))
    slide.touch()  # the slide changed since: every region is stale
    record = json.loads(infer_slide(session, slide, out, TILE).read_text())
    assert record["resumed"] is None


def test_a_second_run_on_the_same_outputs_is_refused_while_the_first_holds_them(session: Session,
                                                                                  tmp_path: Path) -> None:
    from deepliif.slide_checkpoint import CheckpointBusyError, SlideCheckpoint
    slide = write_ome_pyramid(tmp_path / "slide.ome.tif", glass_with_tissue())
    with SlideCheckpoint(tmp_path / "out" / ".slide.resume", {}, ("Seg",), 1500, [1300]):
        with pytest.raises(CheckpointBusyError, match="another run is writing"):
            infer_slide(session, slide, tmp_path / "out", TILE)
