"""CUDA-graph replay logic and the TF32 switches, exercised on the CPU through the capture seam."""
from __future__ import annotations

import numpy as np
import torch

from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from engine.backends.torch_backend import CapturedGraph, GraphReplayer, captured_size, configure_tf32
from engine.samples import synthetic_ihc
from engine.backends.precision import Precision


def test_batches_are_padded_to_few_captured_sizes(generated_models) -> None:
    """Regression: a graph per distinct batch size grew device memory with every new remainder batch."""
    pipeline = FusedPipeline(load_model_dir(generated_models[Layout.CHECKPOINT])).eval()
    captured = []

    def capture(size: int) -> CapturedGraph:  # what torch.cuda.graph records, replayed eagerly on the CPU
        captured.append(size)
        static_in = torch.zeros((size, 512, 512, 3), dtype=torch.uint8)
        static_out = {name: torch.zeros((size, 512, 512, 3), dtype=torch.uint8) for name in OUTPUT_NAMES}

        def replay() -> None:
            with torch.inference_mode():
                for name, out in zip(OUTPUT_NAMES, pipeline(static_in)):
                    static_out[name].copy_(out)
        return CapturedGraph(static_in, static_out, replay)

    replayer = GraphReplayer(capture)
    tiles = np.stack([synthetic_ihc(seed=s) for s in range(5)])
    reference = TileRunner(pipeline).run(tiles)
    for size in (3, 4, 1, 5, 2):
        result = replayer.run(tiles[:size])
        for name in OUTPUT_NAMES:
            assert result[name].shape[0] == size
            assert np.abs(result[name].astype(int) - reference[name][:size].astype(int)).max() <= 1
    assert captured == [4, 1, 8, 2] and [captured_size(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_tf32_is_off_for_fp32_only() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_tf32(Precision.FP32)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure_tf32(Precision.FP16)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
