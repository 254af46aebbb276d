"""pytest-benchmark micro-benchmarks (`make bench`; not part of `make test`)."""
from __future__ import annotations

import numpy as np
import pytest

from deepliif.inference import InferenceOptions
from deepliif.model_dir import Layout
from deepliif.postprocessing import postprocess
from engine.samples import synthetic_ihc
from engine.session import Session

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def session(generated_models, tmp_path_factory):
    with Session(generated_models[Layout.CHECKPOINT], backend="torch", device="cpu",
                 cache_dir=tmp_path_factory.mktemp("cache")) as opened:
        yield opened


def test_tile_pipeline_2048_image(benchmark, session) -> None:
    """Tiling, batching, stitching and postprocessing around a tiny (ngf 2) network."""
    image = synthetic_ihc(2048, 2048, seed=1)
    result = benchmark(session.infer, image, InferenceOptions(batch_size=4))
    assert result.tiles == 16


def test_postprocess_2048(benchmark) -> None:
    image = synthetic_ihc(2048, 2048, seed=2)
    seg = np.zeros_like(image)
    seg[..., 0] = np.where(image[..., 0] < 170, 255, 0)
    seg[..., 2] = np.where(image[..., 2] > 150, 255, 0)
    result = benchmark(postprocess, image, seg, 255 - image, 512)
    assert result.scoring["num_total"] > 0
