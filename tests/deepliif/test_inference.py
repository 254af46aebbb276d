from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from deepliif.errors import ArgumentError
from deepliif.imageio import read_image
from deepliif.inference import InferenceOptions, OutputSet, infer_image, infer_images, tile_count
from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from deepliif.tiling import EMPTY_TILE_COLOURS
from engine.samples import synthetic_ihc


def _cases(fixtures: Path) -> list[Path]:
    return sorted(p for p in (fixtures / "outputs").glob("*/*") if p.is_dir())


@pytest.mark.slow
def test_parity_with_every_fixture_case(deepliif_fixtures: Path, reference_image) -> None:
    cases = _cases(deepliif_fixtures)
    assert len(cases) >= 5
    for case in cases:
        reference = json.loads((case / "reference.json").read_text())
        runner = TileRunner(FusedPipeline(load_model_dir(deepliif_fixtures / "models" / case.parent.name)))
        image = read_image(case / "input.png")
        assert list(image.shape[1::-1]) == reference["image_size"]
        result = infer_image(runner, image, InferenceOptions(tile_size=reference["tile_size"], batch_size=4))
        for name in OUTPUT_NAMES:
            diff = np.abs(result.images[name].astype(int) - read_image(reference_image(case, name)))
            assert diff.max() <= 1 and diff.mean() <= 0.01, (case, name, diff.max(), diff.mean())
        assert result.scoring == reference["scoring"], case


@pytest.fixture(scope="module")
def runner(generated_models: dict[Layout, Path]) -> TileRunner:
    return TileRunner(FusedPipeline(load_model_dir(generated_models[Layout.CHECKPOINT])))


def test_results_do_not_depend_on_batch_size(runner: TileRunner) -> None:
    """Per-sample normalisation makes batching exact in arithmetic; oneDNN may still pick another
    convolution algorithm per batch size (float differences ~1e-7), so a truncated uint8 value can move
    by one grey level at a rare pixel. Nothing more is allowed."""
    image = synthetic_ihc(700, 1100, seed=5)
    results = [infer_image(runner, image, InferenceOptions(batch_size=b)) for b in (1, 3, 8)]
    for other in results[1:]:
        for name in results[0].images:
            if name in ("SegOverlaid", "SegRefined"):
                continue
            diff = np.abs(results[0].images[name].astype(int) - other.images[name])
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())


def test_empty_tiles_are_not_run_and_get_deepliifs_colours(generated_models: dict[Layout, Path]) -> None:
    """Every output, the per-generator segmentations included, gets DeepLIIF's colour on empty tiles."""
    runner = TileRunner(FusedPipeline(load_model_dir(generated_models[Layout.CHECKPOINT]), seg_intermediate=True))
    image = np.full((512, 1200, 3), 235, np.uint8)  # glass only on the right
    image[:, :400] = synthetic_ihc(512, 400, seed=1)
    result = infer_image(runner, image, InferenceOptions(batch_size=2, seg_intermediate=True))
    assert set(result.images) >= set(EMPTY_TILE_COLOURS)
    assert result.tiles == 3 and result.empty_tiles == 2  # tiles at x=448 and x=688 hold only glass
    for name, colour in EMPTY_TILE_COLOURS.items():
        assert (result.images[name][:, -100:] == colour).all(), name


def test_output_sets_and_non_512_tiles(runner: TileRunner) -> None:
    image = synthetic_ihc(300, 420, seed=2)
    masks = infer_image(runner, image, InferenceOptions(tile_size=256, outputs=OutputSet.SEG_MASKS))
    assert list(masks.images) == ["Seg", "SegOverlaid", "SegRefined"]
    assert all(im.shape == (300, 420, 3) for im in masks.images.values())
    assert masks.tiles == tile_count(420, 300, 256) == 4
    modalities = infer_image(runner, image, InferenceOptions(outputs=OutputSet.MODALITIES))
    assert list(modalities.images) == ["Hema", "DAPI", "Lap2", "Marker"]
    assert set(modalities.timings) == {"tiling_seconds", "inference_seconds", "stitching_seconds",
                                      "postprocess_seconds", "total_seconds"}  # one loop, one set of stages


@pytest.mark.parametrize("options", [{"batch_size": 0}, {"batch_size": 2.5}, {"tile_size": 10}])
def test_bad_options(options: dict) -> None:
    with pytest.raises(ArgumentError, match=next(iter(options))):
        InferenceOptions(**options)


def test_bad_image_arrays(runner: TileRunner) -> None:
    for image in (np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.int32)):
        with pytest.raises(ArgumentError, match="RGB uint8 image"):
            infer_image(runner, image)
    with pytest.raises(ArgumentError, match="outputs must be one of"):
        OutputSet.parse("everything")


def test_the_cells_are_found_while_the_network_runs_the_later_tiles_and_score_as_postprocess(
        deepliif_fixtures: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tile loop hands each image's Seg rows over as they become final; they are labelled band after
    band on a thread of their own while the network runs the later tiles (the last batch waits until the
    first band is labelled, so labelling only after the loop fails), and the result is postprocess's on
    the stitched outputs."""
    from deepliif import postprocessing, seg_rows
    from engine.replay import ReplaySession
    replay = deepliif_fixtures / "replay"
    tiles = ([read_image(folder / "IHC.png") for folder in sorted(replay.iterdir())] * 4)[:4]
    image = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:4])])  # 1024², two tile rows
    labelled_on: list[tuple[str, int]] = []
    first_band = threading.Event()
    four_connected = seg_rows.four_connected

    def recorded(mask: np.ndarray, *args, **kwargs):
        labelled_on.append((threading.current_thread().name, len(mask)))
        first_band.set()
        return four_connected(mask, *args, **kwargs)

    session, batches = ReplaySession(replay), []

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        batches.append(len(batch))
        if sum(batches) == 9:  # the last of the 1024² image's 3 x 3 tiles
            assert first_band.wait(20), "no band was labelled before the last batch"
        return session.run(batch)

    monkeypatch.setattr(seg_rows, "four_connected", recorded)
    (result,) = infer_images(run, [image], InferenceOptions(batch_size=2))
    assert sum(batches) == 9 and len(labelled_on) >= 2, (batches, labelled_on)
    assert all(name.startswith("seg-rows") for name, _ in labelled_on), labelled_on
    assert sum(rows for _, rows in labelled_on) == len(image), "every row labelled once"
    assert not [t.name for t in threading.enumerate() if t.name.startswith("seg-")]
    expected = postprocessing.postprocess(image, result.images["Seg"], result.images["Marker"], 512)
    assert result.scoring == expected.scoring and result.cells == expected.cells
    assert np.array_equal(result.images["SegRefined"], expected.refined)


@pytest.mark.parametrize("step", ["components", "trace_mask"])
def test_a_band_that_fails_stops_the_call_and_leaves_no_thread(deepliif_fixtures: Path, step: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A band that fails to be labelled (on the measuring thread) or traced (on the tracing thread)."""
    from deepliif import seg_rows
    from engine.replay import ReplaySession

    def broken(mask: np.ndarray, *args, **kwargs):
        raise MemoryError("no memory for the band's labels")

    monkeypatch.setattr(seg_rows, step, broken)
    image = read_image(sorted((deepliif_fixtures / "replay").iterdir())[0] / "IHC.png")
    with pytest.raises(MemoryError, match="band's labels"):
        infer_images(ReplaySession(deepliif_fixtures / "replay").run, [np.vstack([image, image])],
                     InferenceOptions(batch_size=1))
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("seg-", "tile-"))]
