from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deepliif.imageio import read_image, write_png
from deepliif.postprocessing import postprocess
from engine.cli import main
from engine.pipeline_bench import bench_pipeline


def _mosaic(replay: Path, name: str) -> np.ndarray:
    """Two replay tiles side by side: a 1024x512 input of real IHC."""
    tiles = [read_image(folder / f"{name}.png") for folder in sorted(replay.iterdir())]
    return np.concatenate(tiles[:2], axis=1)


def _share_of_wall(report: dict, seconds_key: str, share: float, digits: int) -> bool:
    """Whether `share` is `report[seconds_key] / wall_s` up to the rounding of all three figures: seconds are
    rounded to 3 digits and the share to `digits`, so on a run of a few hundredths of a second the ratio of the
    rounded figures can differ from the rounded ratio by more than any fixed tolerance."""
    wall, seconds = report["wall_s"], report[seconds_key]
    slack = 0.5 * 10 ** -digits * wall + 0.0005 * (1 + share)
    return abs(share * wall - seconds) <= slack + 1e-9


def test_the_pipeline_bench_runs_infers_own_path_on_replayed_outputs(deepliif_fixtures: Path, tmp_path: Path) -> None:
    replay = deepliif_fixtures / "replay"
    image = tmp_path / "ihc.png"
    write_png(image, _mosaic(replay, "IHC"))
    report = bench_pipeline(image, replay, threads=2, batch_size=2, repeats=1)
    assert report["tiles"] == 3 and report["network_tiles"] == 3  # 1024 wide: x at 0, 448, 512
    assert 0 < report["network_s"] < report["wall_s"]
    assert _share_of_wall(report, "network_s", report["network_busy"], digits=3)
    assert report["cpu_s"] > 0 and _share_of_wall(report, "cpu_s", report["cores_busy"], digits=2)
    assert report["cores_busy"] <= 2.05, "the runs are held to the CPUs `threads` asks for"
    assert set(report["stages"]) == {"decode", "tiling", "inference", "stitching", "postprocess", "encode"}
    assert report["pixels"] == 1024 * 512 and report["threads"] == 2 and report["scoring"]["num_total"] > 0


def test_bench_pipeline_on_the_command_line_writes_its_json(deepliif_fixtures: Path, tmp_path: Path) -> None:
    replay = deepliif_fixtures / "replay"
    tile = sorted(replay.iterdir())[0]
    report_path = tmp_path / "bench.json"
    assert main(["-q", "bench", "--pipeline", str(tile / "IHC.png"), "--replay", str(replay), "--threads", "1",
                 "--network-tiles-per-s", "50", "--repeats", "1", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    expected = postprocess(read_image(tile / "IHC.png"), read_image(tile / "Seg.png"),
                           read_image(tile / "Marker.png"), 512)
    assert report["scoring"] == expected.scoring  # one 512 tile: the replayed tile is the stitched image
    assert report["network_tiles_per_s"] == 50 and report["network_s"] >= 1 / 50
