from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from deepliif.contract import OUTPUT_NAMES
from deepliif.errors import ArgumentError
from deepliif.imageio import write_png
from engine.replay import ReplaySession


def _replay_dir(root: Path, count: int = 3) -> Path:
    for index in range(count):
        folder = root / f"tile{index}"
        folder.mkdir(parents=True)
        for offset, name in enumerate(OUTPUT_NAMES):
            write_png(folder / f"{name}.png", np.full((512, 512, 3), 10 * index + offset, np.uint8))
    return root


def test_tiles_are_handed_back_in_sorted_order_cycling(tmp_path: Path) -> None:
    session = ReplaySession(_replay_dir(tmp_path / "replay"))
    batch = np.zeros((4, 512, 512, 3), np.uint8)
    first, second = session.run(batch), session.run(batch[:2])
    assert [int(t[0, 0, 0]) for t in first["Hema"]] == [0, 10, 20, 0]
    assert [int(t[0, 0, 0]) for t in second["Seg"]] == [14, 24]
    assert session.tiles == 6 and session.busy_seconds > 0


def test_pacing_makes_a_batch_take_as_long_as_the_gpu_would(tmp_path: Path) -> None:
    session = ReplaySession(_replay_dir(tmp_path / "replay", 1), tiles_per_second=100)
    start = time.perf_counter()
    session.run(np.zeros((5, 512, 512, 3), np.uint8))
    assert time.perf_counter() - start >= 0.05 and session.busy_seconds >= 0.05


def test_a_bad_replay_folder_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="folder of tile folders"):
        ReplaySession(tmp_path / "absent")
    replay = _replay_dir(tmp_path / "replay", 1)
    (replay / "tile0" / "Seg.png").unlink()
    with pytest.raises(ArgumentError, match="missing Seg.png"):
        ReplaySession(replay)
    with pytest.raises(ArgumentError, match="must be positive"):
        ReplaySession(_replay_dir(tmp_path / "other", 1), tiles_per_second=0)
