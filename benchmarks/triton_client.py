"""Tiles per second through a real Triton server (the Python-backend repository of `export triton`, on the
nvidia-pytriton tritonserver, loopback HTTP, tritonclient) beside the same session called directly, at
batch 1 and 4, rounds alternating so both see the same machine state. Outputs are compared every call.

    .venv/bin/python benchmarks/triton_client.py --model-dir ../shared/fixtures/deepliif/models/mini \
        --requests 8 --rounds 3 --json /tmp/triton.json

Batch 1 and 4 mean tiles per request; requests are sent one after another (one client), so the figure is
the latency-bound throughput of one caller, with Triton's HTTP and the stub's shared memory on top.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepliif.contract import FUSED_GRAPH  # noqa: E402
from engine.session import Session  # noqa: E402
from export.triton import TritonConfig, write_python_repository  # noqa: E402
from export.triton_server import LocalTritonServer  # noqa: E402


def triton_call(url: str):
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(url)
    wanted = [httpclient.InferRequestedOutput(n, binary_data=True) for n in FUSED_GRAPH.onnx_output_names]

    def call(tiles: np.ndarray) -> dict[str, np.ndarray]:
        given = httpclient.InferInput(FUSED_GRAPH.input_name, list(tiles.shape), "UINT8")
        given.set_data_from_numpy(tiles, binary_data=True)
        answer = client.infer("deepliif", [given], outputs=wanted)
        return {name: answer.as_numpy(onnx) for name, onnx in zip(FUSED_GRAPH.output_names,
                                                                  FUSED_GRAPH.onnx_output_names)}
    return call


def tiles_per_s(call, tiles: np.ndarray, requests: int, expected: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    for _ in range(requests):
        outputs = call(tiles)
    seconds = time.perf_counter() - start
    worst = max(int(np.abs(outputs[n].astype(np.int16) - expected[n]).max()) for n in FUSED_GRAPH.output_names)
    if worst > 1:
        raise SystemExit(f"outputs differ by {worst} grey levels")
    return requests * len(tiles) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--requests", type=int, default=8, help="requests per batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="triton-bench-"))
    write_python_repository(work / "repo", TritonConfig(instance_kind="cpu", max_batch_size=max(sizes)),
                            args.model_dir, backend="onnxruntime", cache_dir=work / "cache")
    rng = np.random.default_rng(0)
    results: dict[str, dict[int, list[float]]] = {"session": {}, "triton": {}}
    with Session(args.model_dir, backend="onnxruntime", device="cpu", cache_dir=work / "cache") as session, \
            LocalTritonServer(work / "repo", work / "server", os.environ) as server:
        calls = {"session": session.run, "triton": triton_call(server.url)}
        for size in sizes:
            tiles = rng.integers(0, 256, (size, 512, 512, 3), dtype=np.uint8)
            expected = session.run(tiles)
            for name, call in calls.items():
                call(tiles)  # warm-up
            for _ in range(args.rounds):
                for name, call in calls.items():
                    results[name].setdefault(size, []).append(tiles_per_s(call, tiles, args.requests, expected))
    print("| path | batch | tiles/s (median of rounds) | rounds |")
    print("| --- | ---: | ---: | --- |")
    for name, by_size in results.items():
        for size, rates in by_size.items():
            print(f"| {name} | {size} | {statistics.median(rates):.2f} | {', '.join(f'{r:.2f}' for r in rates)} |")
    if args.json:
        args.json.write_text(json.dumps({name: {str(k): v for k, v in by.items()} for name, by in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
