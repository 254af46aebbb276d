from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from deepliif.cells import write_cells
from deepliif.imageio import read_image
from deepliif.inference import InferenceOptions, OutputSet, tile_count
from deepliif.postprocessing import postprocess
from engine import image_files
from engine.image_files import infer_image_files
from engine.replay import ReplaySession


def _inputs(replay: Path, into: Path) -> list[Path]:
    """The replay tiles' IHC inputs under their folder names (22_2.png, ...)."""
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for folder in sorted(replay.iterdir()):
        paths.append(into / f"{folder.name}.png")
        paths[-1].write_bytes((folder / "IHC.png").read_bytes())
    return paths


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith(("encode", "decode", "tile-", "cells-file", "outlines", "cpu-stage"))]


def test_every_image_gets_its_files_and_json_equal_to_postprocessing_its_outputs(
        deepliif_fixtures: Path, tmp_path: Path) -> None:
    replay = deepliif_fixtures / "replay"
    inputs = _inputs(replay, tmp_path / "in")
    written = infer_image_files(ReplaySession(replay), inputs, tmp_path / "out", InferenceOptions(threads=2), {})
    (tmp_path / "expected").mkdir()
    assert [p.name for p in written] == [f"{p.stem}.json" for p in inputs]
    for folder in sorted(replay.iterdir()):  # the stand-in answers the tiles in this order, one per image
        expected = postprocess(read_image(folder / "IHC.png"), read_image(folder / "Seg.png"),
                               read_image(folder / "Marker.png"), 512, outlines=True)
        out = tmp_path / "out" / folder.name
        for path in write_cells(tmp_path / "expected", folder.name, expected.cells, outlines=expected.outlines):
            assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name
        assert np.array_equal(read_image(f"{out}_SegRefined.png"), expected.refined)
        assert np.array_equal(read_image(f"{out}_SegOverlaid.png"), expected.overlaid)
        assert np.array_equal(read_image(f"{out}_Hema.png"), read_image(folder / "Hema.png"))
        assert json.loads(Path(f"{out}.json").read_text())["scoring"] == expected.scoring
    assert _threads() == []


def test_outputs_not_asked_for_are_not_written(deepliif_fixtures: Path, tmp_path: Path) -> None:
    replay = deepliif_fixtures / "replay"
    options = InferenceOptions(outputs=OutputSet.MODALITIES)
    infer_image_files(ReplaySession(replay), _inputs(replay, tmp_path / "in")[:1], tmp_path / "out", options, {})
    stem = sorted(replay.iterdir())[0].name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{stem}.json", f"{stem}_cells.csv", f"{stem}_cells.geojson"]
        + [f"{stem}_{n}.png" for n in OutputSet.MODALITIES.names])


def test_a_failed_write_stops_the_run_leaves_no_json_and_no_thread(deepliif_fixtures: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    replay = deepliif_fixtures / "replay"
    real = image_files.write_atomically

    def failing(path: Path, data) -> None:
        if threading.current_thread().name.startswith("encode") and failing.calls == 3:
            raise OSError("no space left on device")
        failing.calls += 1
        real(path, data)

    failing.calls = 0
    monkeypatch.setattr(image_files, "write_atomically", failing)
    with pytest.raises(OSError, match="no space"):
        infer_image_files(ReplaySession(replay), _inputs(replay, tmp_path / "in"), tmp_path / "out",
                          InferenceOptions(threads=2), {})
    assert not list((tmp_path / "out").glob("*.json")) and not list((tmp_path / "out").glob(".*tmp"))
    assert _threads() == []


def test_a_failure_while_drawing_leaves_no_cells_file_half_written_and_no_thread(
        deepliif_fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cells files are being written while the overlays are drawn: a failure there ends their writer
    at the first cell not yet complete, so nothing of theirs is left under a temporary name, and what is
    left under a final name (the tracing may have finished first) holds every cell; no JSON says the
    image is done."""
    from deepliif import postprocessing
    replay = deepliif_fixtures / "replay"

    def broken(*args, **kwargs):
        raise MemoryError("drawing the overlays")

    monkeypatch.setattr(postprocessing, "draw_overlays", broken)
    with pytest.raises(MemoryError, match="drawing the overlays"):
        infer_image_files(ReplaySession(replay), _inputs(replay, tmp_path / "in")[:1], tmp_path / "out",
                          InferenceOptions(threads=2), {})
    out = tmp_path / "out"
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if name.endswith((".json", ".tmp")) or name.startswith(".")], left
    cells_files = sorted(name for name in left if "_cells" in name)
    if cells_files:  # only ever both, each whole
        (csv_name, geojson_name) = cells_files
        features = json.loads((out / geojson_name).read_text())["features"]
        rows = (out / csv_name).read_text().splitlines()
        assert len(features) > 0 and len(rows) == len(features) + 1
        assert all(feature["geometry"]["type"] == "Polygon" for feature in features)
    assert _threads() == []


def test_overlay_bands_from_several_drawing_threads_make_one_whole_file_each(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of one overlay arrive at once from several threads; a slow first look at the rows (widening
    the window in which two threads could each start a file) must still give one file holding every band."""
    import time
    real = image_files.check_png_image

    def slow(rows):
        time.sleep(0.02)
        return real(rows)

    monkeypatch.setattr(image_files, "check_png_image", slow)
    rng = np.random.default_rng(5)
    overlaid, refined = (rng.integers(0, 256, (96, 40, 3)).astype(np.uint8) for _ in range(2))
    encoders = image_files.Encoders(2)
    files = image_files.StreamedFiles(encoders, tmp_path, "x", ["SegOverlaid", "SegRefined"], len(overlaid))
    start = threading.Barrier(8)

    def hand(top: int) -> None:
        start.wait()
        files.overlay_rows(top, overlaid[top: top + 12], refined[top: top + 12])

    threads = [threading.Thread(target=hand, args=(top,)) for top in range(0, 96, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for write in files.writes:
        write.result()
    encoders.close()
    assert sorted(files.files) == ["SegOverlaid", "SegRefined"]
    assert np.array_equal(read_image(tmp_path / "x_SegOverlaid.png"), overlaid)
    assert np.array_equal(read_image(tmp_path / "x_SegRefined.png"), refined)


def test_an_image_whose_named_file_was_not_published_gets_no_json(tmp_path: Path) -> None:
    from deepliif.errors import DeepLIIFError
    encoders = image_files.Encoders(1)
    finishing = image_files._Finishing({"timings": {}}, tmp_path / "x.json", [], [tmp_path / "x_Seg.png"])
    with pytest.raises(DeepLIIFError, match="x_Seg.png was not published"):
        image_files._publish(finishing, encoders)
    encoders.close()
    assert not (tmp_path / "x.json").exists()


class _CountingReplay(ReplaySession):
    """The replay stand-in, recording how many images each tile loop call held and each batch's size."""

    def __init__(self, replay: Path) -> None:
        super().__init__(replay)
        self.calls: list[int] = []
        self.batches: list[int] = []

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.batches.append(len(batch))
        return super().run(batch)

    def infer_many(self, images, *args, **kwargs):
        self.calls.append(len(images))
        return super().infer_many(images, *args, **kwargs)


def test_small_images_share_tile_loop_calls_that_run_full_batches(deepliif_fixtures: Path, tmp_path: Path) -> None:
    """Nine one-tile images at batch size 2: calls of 8 and 1 images (CALL_BATCHES batches each at most),
    every batch of the first call full; each image's files are still its own, equal to postprocessing it."""
    replay = deepliif_fixtures / "replay"
    folders = sorted(replay.iterdir())  # the stand-in answers tiles in this order, cycling
    (tmp_path / "in").mkdir()
    inputs = []
    for number in range(9):
        inputs.append(tmp_path / "in" / f"tile{number}.png")
        inputs[-1].write_bytes((folders[number % len(folders)] / "IHC.png").read_bytes())
    session = _CountingReplay(replay)
    assert image_files.CALL_BATCHES * 2 == 8
    written = infer_image_files(session, inputs, tmp_path / "out", InferenceOptions(batch_size=2, threads=2), {})
    assert session.calls == [8, 1] and session.batches == [2, 2, 2, 2, 1]
    assert [p.name for p in written] == [f"tile{n}.json" for n in range(9)]
    for number, path in enumerate(written):
        folder = folders[number % len(folders)]
        expected = postprocess(read_image(folder / "IHC.png"), read_image(folder / "Seg.png"),
                               read_image(folder / "Marker.png"), 512, outlines=True)
        record = json.loads(path.read_text())
        assert record["scoring"] == expected.scoring and record["timings"]["call_images"] == (8 if number < 8 else 1)
        assert np.array_equal(read_image(tmp_path / "out" / f"tile{number}_SegRefined.png"), expected.refined)
    assert _threads() == []


def test_calls_are_planned_from_the_headers_in_order_and_a_slide_has_its_own(tmp_path: Path) -> None:
    import tifffile
    from PIL import Image
    sizes = {"a": (512, 512), "b": (512, 512), "c": (1024, 512), "d": (2048, 2048), "e": (400, 300),
             "f": (1024, 512), "g": (512, 1024)}
    assert [tile_count(*size, 512) for size in sizes.values()] == [1, 1, 3, 25, 1, 3, 3]  # tiles overlap
    paths = []
    for name, size in sizes.items():
        paths.append(tmp_path / f"{name}.png")
        Image.new("RGB", size).save(paths[-1])
    slide = tmp_path / "s.tif"
    tifffile.imwrite(slide, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb")
    calls = image_files.plan_calls(paths[:5] + [slide] + paths[5:], 512, batch_size=2)
    assert [[p.path.stem for p in call] for call in calls] == [["a", "b", "c"], ["d"], ["e"], ["s"], ["f", "g"]]
    assert [p.slide for call in calls for p in call] == [False] * 5 + [True, False, False]
