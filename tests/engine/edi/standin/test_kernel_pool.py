"""The kernel pool's own logic, with stand-in kernel processes (a few lines of http.server each)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from deepliif.errors import DeepLIIFError
from engine.edi.standin.kernel_pool import KernelPool, KernelStartError, visible_gpus

STAND_IN = '''
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
if os.environ.get("FAIL_TO_START"):
    sys.exit("cannot open the model")
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("die"):
            os._exit(9)  # a crash in the middle of a request
        data = json.dumps({"status": "finished", "pod": os.environ["MSD_POD_NAME"],
                           "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    script = tmp_path / "kernel_stand_in.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script)]


def post(pool: KernelPool, body: dict) -> dict:
    return json.loads(pool.submit(json.dumps(body).encode()).result(timeout=30))


def test_requests_spread_over_kernels_each_on_its_own_gpu_and_a_crashed_kernel_comes_back(
        stand_in: list[str], tmp_path: Path) -> None:
    env = {"PATH": "", "MSD_POD_NAME": "pod-x", "CUDA_VISIBLE_DEVICES": "0,1,2"}
    pool = KernelPool(2, stand_in, env, "deepliif", tmp_path / "logs", tmp_path)
    pool.start(timeout_s=60)
    try:
        answers = [post(pool, {"request_id": str(i)}) for i in range(4)]
        assert {(a["pod"], a["gpu"]) for a in answers} == {("pod-x-k0", "0"), ("pod-x-k1", "1")}
        crashed = post(pool, {"request_id": "boom", "die": True})
        assert crashed["status"] == "error" and crashed["retry"] is True and crashed["request_id"] == "boom"
        assert post(pool, {"request_id": "next"})["status"] == "finished"  # the other kernel took it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (all(k.ready.is_set() for k in pool.kernels)
                                                   and sum(k.restarts for k in pool.kernels) == 1):
            time.sleep(0.2)
        assert all(k.ready.is_set() for k in pool.kernels) and sum(k.restarts for k in pool.kernels) == 1
    finally:
        pool.close()
    assert all(k.process.poll() is not None for k in pool.kernels)


def test_a_kernel_that_cannot_start_is_reported_with_its_output(stand_in: list[str], tmp_path: Path) -> None:
    pool = KernelPool(2, stand_in, {"PATH": "", "FAIL_TO_START": "1"}, "deepliif", tmp_path / "logs", tmp_path)
    with pytest.raises(KernelStartError, match="cannot open the model"):
        pool.start(timeout_s=30)
    assert all(k.process.poll() is not None for k in pool.kernels)
    with pytest.raises(DeepLIIFError, match="at least 1"):
        KernelPool(0, stand_in, {}, "deepliif", tmp_path / "logs", tmp_path)


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == [] and visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
