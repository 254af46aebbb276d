from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepliif.errors import ArgumentError
from deepliif.imageio import read_image
from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, DeepLIIFWayRunner, FusedPipeline, TileRunner, check_seg_weights
from engine.samples import synthetic_ihc


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.stack([synthetic_ihc(seed=s) for s in range(3)])


def test_batched_equals_one_tile_at_a_time(generated_models: dict[Layout, Path], tiles: np.ndarray) -> None:
    model = load_model_dir(generated_models[Layout.CHECKPOINT])
    runner = TileRunner(FusedPipeline(model))
    batched = runner.run(tiles)
    reference = DeepLIIFWayRunner(model)
    for i, tile in enumerate(tiles):
        single = runner.run(tile[None])
        original = reference.run_tile(tile)
        for name in OUTPUT_NAMES:
            assert batched[name].shape == (3, 512, 512, 3) and batched[name].dtype == np.uint8
            assert np.abs(batched[name][i].astype(int) - single[name][0]).max() <= 1, name
            assert np.abs(batched[name][i].astype(int) - original[name]).max() <= 1, name


def test_original_batchnorm_semantics_would_leak_across_a_batch(generated_models: dict[Layout, Path],
                                                                 tiles: np.ndarray) -> None:
    """Why per-sample normalisation matters: the original modules change results when batched."""
    model = load_model_dir(generated_models[Layout.CHECKPOINT])
    reference = DeepLIIFWayRunner(model)
    import torch
    from deepliif.pipeline import to_network_input, to_uint8_image
    with torch.no_grad():
        leaked = to_uint8_image(reference.translators[0](to_network_input(torch.from_numpy(tiles))))
    assert np.abs(leaked[0].numpy().astype(int) - reference.run_tile(tiles[0])["Hema"]).max() > 1


def test_fixture_tiles_reproduced(deepliif_fixtures: Path) -> None:
    for model_name, case in (("tiny-v1", "22_2"), ("tiny-v2", "34_3")):
        case_dir = deepliif_fixtures / "outputs" / model_name / case
        runner = TileRunner(FusedPipeline(load_model_dir(deepliif_fixtures / "models" / model_name)))
        outputs = runner.run(read_image(case_dir / "input.png")[None])
        for name in OUTPUT_NAMES:
            diff = np.abs(outputs[name][0].astype(int) - read_image(case_dir / f"{name}.png"))
            assert diff.max() <= 1 and diff.mean() <= 0.01, (model_name, name, diff.max(), diff.mean())


def test_seg_weights_select_segmentations(generated_models: dict[Layout, Path], tiles: np.ndarray) -> None:
    model = load_model_dir(generated_models[Layout.TORCHSCRIPT])
    default = TileRunner(FusedPipeline(model)).run(tiles[:1])["Seg"]
    only_ihc = TileRunner(FusedPipeline(model, seg_weights=[1, 0, 0, 0, 0])).run(tiles[:1])["Seg"]
    only_marker = TileRunner(FusedPipeline(model, seg_weights=[0, 0, 0, 0, 1])).run(tiles[:1])["Seg"]
    assert not np.array_equal(only_ihc, only_marker)
    assert not np.array_equal(default, only_ihc)


@pytest.mark.parametrize("weights", [[1, 1], [0.2] * 4 + [-1], [0.2] * 4 + [float("nan")]])
def test_bad_seg_weights(weights: list[float]) -> None:
    with pytest.raises(ArgumentError, match="seg_weights must be 5"):
        check_seg_weights(weights)


@pytest.mark.parametrize("batch", [np.zeros((1, 256, 256, 3), np.uint8), np.zeros((1, 512, 512, 3), np.float32),
                                   np.zeros((0, 512, 512, 3), np.uint8), np.zeros((512, 512, 3), np.uint8)])
def test_bad_batches_are_refused(generated_models: dict[Layout, Path], batch: np.ndarray) -> None:
    runner = TileRunner(FusedPipeline(load_model_dir(generated_models[Layout.CHECKPOINT])))
    with pytest.raises(ArgumentError, match=r"expected a uint8 batch of shape \[B, 512, 512, 3\]"):
        runner.run(batch)
