from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from deepliif.errors import ArgumentError
from deepliif.inference import InferenceOptions, OutputSet, infer_image, infer_images
from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from deepliif.tile_loop import STITCH_BACKLOG, run_tile_loop
from engine.samples import synthetic_ihc


@pytest.fixture(scope="module")
def runner(generated_models: dict[Layout, Path]) -> TileRunner:
    return TileRunner(FusedPipeline(load_model_dir(generated_models[Layout.TORCHSCRIPT])))


def test_batches_across_images_and_equals_the_one_image_path(runner: TileRunner) -> None:
    glass = np.full((512, 900, 3), 236, np.uint8)
    glass[:, :300] = synthetic_ihc(512, 300, seed=9)
    images = [synthetic_ihc(600, 530, seed=1), glass, synthetic_ihc(100, 80, seed=2)]
    calls = []

    def counting_run(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        return runner.run(batch)

    options = InferenceOptions(batch_size=3, outputs=OutputSet.ALL)
    results = infer_images(counting_run, images, options)
    expected = [infer_image(runner, image, options) for image in images]
    non_empty = sum(r.tiles - r.empty_tiles for r in expected)
    assert sum(calls) == non_empty and max(calls) == 3 and len(calls) == -(-non_empty // 3)  # mixed batches
    for got, want in zip(results, expected):
        assert (got.tiles, got.empty_tiles, got.scoring) == (want.tiles, want.empty_tiles, want.scoring)
        for name, array in want.images.items():
            assert np.array_equal(got.images[name], array), name
        assert {"tiling_seconds", "inference_seconds", "stitching_seconds", "postprocess_seconds"} <= set(got.timings)


def test_a_backend_error_reaches_the_caller(runner: TileRunner) -> None:
    def broken(batch: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        infer_images(broken, [synthetic_ihc(1100, 1100, seed=3)], InferenceOptions(batch_size=1))


@pytest.mark.parametrize("image", [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 5), np.uint8),
                                   np.zeros((5, 5, 3), np.float32), "not an array"])
def test_bad_images_are_named(runner: TileRunner, image) -> None:
    with pytest.raises(ArgumentError, match="RGB uint8 image"):
        infer_images(runner.run, [synthetic_ihc(seed=1), image], InferenceOptions())


def _loop_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("tile-split", "tile-merge", "tile-finish"))]


def _replaying_run(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A network stand-in: every output is the input tile (no model needed to exercise the loop)."""
    return {name: batch.copy() for name in OUTPUT_NAMES}


@pytest.mark.parametrize("fail_in", ["network", "stitching"])
def test_a_failure_stops_every_stage_and_frees_the_images(fail_in: str) -> None:
    image = synthetic_ihc(2048, 2048, seed=4)  # 25 tiles: the splitter is ahead when the failure comes
    held = weakref.ref(image)
    calls = []

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        if fail_in == "network" and len(calls) == 2:
            raise RuntimeError("device lost")
        return _replaying_run(batch)

    def progress(_: int) -> None:
        if fail_in == "stitching":
            raise OSError("disk full")

    with pytest.raises(RuntimeError if fail_in == "network" else OSError):
        run_tile_loop(run, [image], 512, 1, lambda done: done.images, progress=progress)
    del image
    gc.collect()
    assert _loop_threads() == [] and held() is None  # no thread blocked on a queue, holding the image
    assert len(calls) <= 2 + STITCH_BACKLOG + 1


def test_network_outputs_wait_for_stitching_in_a_bounded_queue() -> None:
    """A stitcher slower than the network: the network runs at most the backlog (plus the batch in its
    hands) ahead of what has been stitched, so outputs do not pile up in memory."""
    calls, stitched, ahead = [], [], []

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        ahead.append(len(calls) - len(stitched))
        return _replaying_run(batch)

    def slow_progress(count: int) -> None:
        time.sleep(0.01)
        stitched.append(count)

    image = synthetic_ihc(2048, 2048, seed=5)
    results, _ = run_tile_loop(run, [image], 512, 1, lambda done: done.images, progress=slow_progress)
    assert len(calls) == len(stitched) == 25 and max(ahead) <= STITCH_BACKLOG + 2
    assert np.array_equal(results[0]["Hema"], image)  # every tile pasted back in place


def test_images_that_share_a_tile_spec_share_batches_whatever_they_ask_back(runner: TileRunner) -> None:
    from deepliif.scoring_rules import PostprocessOptions
    images = [synthetic_ihc(600, 530, seed=1), synthetic_ihc(530, 600, seed=2)]
    calls = []

    def counting_run(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        return runner.run(batch)

    asks = [InferenceOptions(batch_size=3, outputs=OutputSet.MODALITIES),
            InferenceOptions(batch_size=3, outputs=OutputSet.SEG_MASKS, postprocess=PostprocessOptions(size_thresh=0))]
    results = infer_images(counting_run, images, asks)
    alone = [infer_image(runner, image, ask) for image, ask in zip(images, asks)]
    assert sum(calls) == 8 and len(calls) == 3  # 4 + 4 tiles in batches of 3: one batch mixes the two images
    for got, want, ask in zip(results, alone, asks):
        assert tuple(got.images) == ask.outputs.names and got.scoring == want.scoring
        for name in ask.outputs.names:
            np.testing.assert_array_equal(got.images[name], want.images[name])
    with pytest.raises(ArgumentError, match="share one tile spec"):
        infer_images(counting_run, images, [asks[0], InferenceOptions(tile_size=256, batch_size=3)])


def test_rows_become_final_tile_row_by_tile_row_before_the_image_is_finished() -> None:
    image = synthetic_ihc(1400, 1000, seed=8)
    heard, finished = [], []

    def rows_final(index: int, outputs: dict[str, np.ndarray], final: int) -> None:
        assert not finished and sorted(outputs) == sorted(OUTPUT_NAMES)
        heard.append((index, final, outputs["Hema"][:final].copy()))

    results, _ = run_tile_loop(_replaying_run, [image], 512, 2, lambda done: finished.append(done) or done.images,
                               rows_final=rows_final)
    # tile rows at 0, 448 and 888 (moved back to end at the edge); each pastes from 32 rows below its top
    assert [final for _, final, _ in heard] == [480, 920, 1400] and {index for index, _, _ in heard} == {0}
    for _, final, rows in heard:
        assert np.array_equal(rows, results[0]["Hema"][:final])  # what was final then is what was kept


def test_an_image_is_postprocessed_while_the_next_images_tiles_go_through_the_network() -> None:
    """Finishing image 0 waits until the network has run every tile of image 1: were it done on the
    stitching thread, stitching and then the network (bounded queues) would stall and the wait time out."""
    images = [synthetic_ihc(1400, 1400, seed=11), synthetic_ihc(1400, 1400, seed=12)]  # 9 tiles each
    calls, all_run, waited = [], threading.Event(), []

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        if sum(calls) == 18:
            all_run.set()
        return _replaying_run(batch)

    def finish(done) -> int:
        if done.index == 0:
            waited.append(all_run.wait(10))
        return done.index

    results, _ = run_tile_loop(run, images, 512, 1, finish)
    assert results == [0, 1] and waited == [True]
    assert _loop_threads() == []


def test_stitched_images_wait_for_postprocessing_in_a_bounded_backlog() -> None:
    """A slow postprocessing: at most the backlog of stitched images (and the one being finished, and the
    one just stitched) are held, unfinished, at any time."""
    from deepliif.tile_loop import FINISH_BACKLOG
    images = [synthetic_ihc(400, 400, seed=k) for k in range(6)]  # one tile each
    stitched, finished, most = [], [], []

    def rows_final(index: int, outputs: dict[str, np.ndarray], final: int) -> None:
        if final == 400:
            stitched.append(index)
            most.append(len(stitched) - len(finished))

    def finish(done) -> int:
        time.sleep(0.05)
        finished.append(done.index)
        return done.index

    results, _ = run_tile_loop(_replaying_run, images, 512, 1, finish, rows_final=rows_final)
    assert results == list(range(6)) and finished == list(range(6))
    assert max(most) <= FINISH_BACKLOG + 2 and max(most) >= 2, most


def test_a_failed_postprocessing_stops_the_loop_and_its_threads() -> None:
    images = [synthetic_ihc(1400, 1400, seed=13) for _ in range(3)]

    def finish(done) -> int:
        if done.index == 0:
            raise MemoryError("postprocessing image 0")
        return done.index

    with pytest.raises(MemoryError, match="image 0"):
        run_tile_loop(_replaying_run, images, 512, 1, finish)
    assert _loop_threads() == []
