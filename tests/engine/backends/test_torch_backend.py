"""CUDA-graph replay logic and the TF32 switches, exercised on the CPU through the capture seam."""
from __future__ import annotations

import contextlib

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


def test_graphs_are_captured_largest_first_after_a_release() -> None:
    """A batch larger than every captured graph drops them and captures again from it; the cache is
    released before each first capture, so the shared pool grows from the largest graph down."""
    events = []

    def capture(size: int) -> CapturedGraph:
        events.append(size)
        static = torch.zeros((size, 1, 1, 3), dtype=torch.uint8)
        return CapturedGraph(static, {name: static for name in OUTPUT_NAMES}, lambda: None)

    replayer = GraphReplayer(capture, lambda: events.append("release"))
    for size in (4, 2, 4, 1, 7, 3, 8):
        replayer.run(np.zeros((size, 1, 1, 3), np.uint8))
    assert events == ["release", 4, 2, 1, "release", 8, 4]
    assert sorted(replayer.graphs) == [4, 8]


def test_every_capture_uses_the_backends_one_side_stream(monkeypatch) -> None:
    """Graphs sharing a memory pool must be captured on the same stream; a new stream per capture is not."""
    from engine.backends import torch_backend

    class Stream:
        def wait_stream(self, other) -> None:
            pass

        def synchronize(self) -> None:
            pass

    seen = []

    class FakeCuda:  # the calls `_capture` makes, recorded
        CUDAGraph = staticmethod(lambda: type("Graph", (), {"replay": lambda self: None})())
        Stream = staticmethod(lambda device=None: Stream())
        current_stream = staticmethod(lambda device=None: Stream())

        @staticmethod
        def stream(stream):
            seen.append(("warm-up", stream))
            return contextlib.nullcontext()

        @staticmethod
        def graph(graph, pool=None, stream=None):
            seen.append(("capture", stream))
            return contextlib.nullcontext()

    backend = object.__new__(torch_backend.TorchBackend)
    backend.device = torch.device("cpu")
    backend.runner = type("Runner", (), {"pipeline": staticmethod(lambda x: [x] * len(OUTPUT_NAMES))})()
    backend._pool = None
    backend._capture_stream = Stream()
    monkeypatch.setattr(torch_backend.torch, "cuda", FakeCuda)
    backend._capture(2)
    backend._capture(1)
    assert [stream for _, stream in seen] == [backend._capture_stream] * 4
