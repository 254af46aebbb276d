"""CUDA-graph replay logic and the TF32 switches, exercised on the CPU through the capture seam."""
from __future__ import annotations

import numpy as np
import torch

from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from engine.backends.torch_backend import CapturedGraph, GraphReplayer, captured_size, tf32_for
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


def _tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_tf32_is_off_for_fp32_inside_the_call_only() -> None:
    before = _tf32()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with tf32_for(Precision.FP32):
            assert _tf32() == (False, False)
            with tf32_for(Precision.FP16):
                assert _tf32() == (True, True)
            assert _tf32() == (False, False)
        assert _tf32() == (True, True)  # restored: another session's setting is not changed
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_an_fp32_session_runs_without_tf32_whatever_another_session_set(generated_models) -> None:
    """bench opens a torch fp16 session after an fp32 one: TF32 must be off in the fp32 one's calls."""
    from deepliif.model_dir import Layout, load_model_dir
    from engine.backends.torch_backend import TorchBackend
    backend = TorchBackend(load_model_dir(generated_models[Layout.TORCHSCRIPT]), "cpu", Precision.FP32)
    seen = []
    run = backend.runner.run
    backend.runner.run = lambda batch: (seen.append(_tf32()), run(batch))[1]
    before = _tf32()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as an fp16 session left it
        backend.run(np.zeros((1, 512, 512, 3), np.uint8))
        assert seen == [(False, False)] and _tf32() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
