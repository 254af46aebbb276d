"""The cohort client against real HTTP servers on loopback: a flaky stand-in, and `serve --kernels 2`."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepliif.imageio import write_png
from engine.edi.tools.client import EdiClient, EndpointRefusedError
from engine.edi.tools.cohort import Cohort, CohortInput, CohortOptions, Journal
from engine.edi.standin.kernel_pool import free_port
from engine.edi.kernel.model_store import upload_model
from engine.edi.kernel.storage import MountedVolume
from engine.samples import synthetic_ihc

from ..conftest import ROOT


class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs from a list of (HTTP status, JSON) in turn, the last one forever; records bodies."""
    answers: list[tuple[int, dict]] = []
    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status, answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted():
    Scripted.answers, Scripted.bodies = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dlim/v1/inference/deepliif"
    server.shutdown()
    server.server_close()


def test_the_client_retries_429_and_5xx_with_backoff_then_answers(scripted: str) -> None:
    Scripted.answers = [(503, {}), (429, {}), (504, {}), (200, {"status": "finished"})]
    client = EdiClient(scripted, token="t0k", first_backoff_s=0.01)
    assert client.post({"request_id": "a"}) == {"status": "finished"}
    assert len(Scripted.bodies) == 4


def test_a_refused_token_stops_at_once_and_a_dead_endpoint_leaves_inputs_pending(scripted: str, tmp_path: Path) -> None:
    Scripted.answers = [(401, {"error": "invalid token"})]
    with pytest.raises(EndpointRefusedError, match="401"):
        EdiClient(scripted).post({})
    assert len(Scripted.bodies) == 1
    dead = f"http://127.0.0.1:{free_port()}/dlim/v1/inference/deepliif"
    image = tmp_path / "a.png"
    write_png(image, synthetic_ihc(64, 64, seed=1))
    cohort = Cohort([CohortInput.parse(str(image)), CohortInput.parse("volume:slides/b.svs")], tmp_path / "out",
                    EdiClient(dead, retry_for_s=0.2, first_backoff_s=0.05), CohortOptions(poll_s=0.05))
    assert cohort.run() == {"finished": 0, "failed": 0, "pending": 2}
    rows = list(csv.DictReader((tmp_path / "out" / "cohort.csv").open()))
    assert [r["state"] for r in rows] == ["pending", "pending"] and "pending (run the same command" in cohort.summary()


def test_busy_is_sent_again_and_a_real_error_is_kept_with_its_message(scripted: str, tmp_path: Path) -> None:
    Scripted.answers = [(200, {"status": "error", "msg": "busy: retry later", "retry": True}),
                        (200, {"status": "submitted"}), (200, {"status": "running"}),
                        (200, {"status": "error", "msg": "image is 0 x 0 pixels"})]
    image = tmp_path / "a.png"
    write_png(image, synthetic_ihc(64, 64, seed=1))
    cohort = Cohort([CohortInput.parse(str(image))], tmp_path / "out", EdiClient(scripted, first_backoff_s=0.01),
                    CohortOptions(poll_s=0.01, tile_size=256))
    assert cohort.run() == {"finished": 0, "failed": 1, "pending": 0}
    first, again = Scripted.bodies[:2]
    assert first == again and first["async"] is True and first["tile_size"] == 256  # the same request, same id
    assert [b.get("type") for b in Scripted.bodies[2:]] == ["status", "status"]
    (row,) = csv.DictReader((tmp_path / "out" / "cohort.csv").open())
    assert row["state"] == "failed" and row["msg"] == "image is 0 x 0 pixels"


def test_the_journal_keeps_the_last_state_and_skips_a_torn_line(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    journal.record({"input": "a", "request_id": "a-1", "state": "submitted"})
    journal.record({"input": "a", "request_id": "a-1", "state": "finished"})
    with (tmp_path / "journal.jsonl").open("a") as handle:
        handle.write('{"input": "b", "sta')  # a crash in the middle of a line
    again = Journal(tmp_path / "journal.jsonl")
    assert again.state("a").value == "finished" and again.state("b") is None


def _start_server(env: dict, port: int, log: Path) -> subprocess.Popen:
    with log.open("ab") as handle:
        server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--kernels", "2", "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/dlim/v1/inference/deepliif", timeout=5):
                return server
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"serve --kernels 2 did not come up:\n{log.read_text()[-3000:]}")


def _finished_lines(volume: Path) -> Counter:
    runs: Counter = Counter()
    for log in (volume / "edi_deployments" / "deepliif" / "edi_logs").glob("*_inference.log"):
        for line in log.read_text().splitlines():
            parts = line.split(" ", 4)
            if len(parts) > 3 and parts[3].startswith("finished"):
                runs[parts[2]] += 1
    return runs


@pytest.mark.slow
def test_a_cohort_through_two_kernels_survives_a_server_restart(edi_model: Path, edi_cache: Path,
                                                                tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    (volume / "slides").mkdir(parents=True)
    upload_model(edi_model, MountedVolume(volume), "models/deepliif")
    inputs = []
    for i in range(20):
        image = synthetic_ihc(96, 128, seed=100 + i)
        if i % 5 == 4:  # every fifth input on the volume, the rest sent inline
            write_png(volume / "slides" / f"img-{i}.png", image)
            inputs.append(f"volume:slides/img-{i}.png")
        else:
            write_png(tmp_path / f"img-{i}.png", image)
            inputs.append(str(tmp_path / f"img-{i}.png"))
    redhare = tmp_path / "redhare"  # empty: the two kernels fetch the model between them
    env = {**os.environ, "DEEPLIIF_VOLUME_ROOT": str(volume), "REDHARE_MODEL_PATH": str(redhare),
           "DEEPLIIF_MODEL_SOURCE": "volume:models/deepliif", "DEEPLIIF_CACHE_DIR": str(edi_cache),
           "DEEPLIIF_BACKEND": "onnxruntime", "DEEPLIIF_DEVICE": "cpu", "MSD_POD_NAME": "pod-t",
           "CUDA_VISIBLE_DEVICES": "", "DEEPLIIF_SHUTDOWN_GRACE_S": "2"}
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}/dlim/v1/inference/deepliif"
    out = tmp_path / "cohort"
    submit = [sys.executable, "-m", "engine.cli", "submit", "--endpoint", url, "--out", str(out), "--concurrency",
              "4", "--poll-s", "0.2", "--retry-for-s", "60", "--tile-size", "256", "--no-progress", *inputs]
    server = _start_server(env, port, log)
    # a test run started in the background inherits SIGINT ignored (POSIX, for asynchronous lists); Ctrl-C
    # in a terminal is what this stands for, so the client gets SIGINT's default disposition back
    client = subprocess.Popen(submit, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and sum('"finished"' in line for line in (
            (out / "journal.jsonl").read_text().splitlines() if (out / "journal.jsonl").is_file() else [])) < 6:
        assert client.poll() is None, client.communicate()[0][-3000:]
        time.sleep(0.2)
    server.send_signal(signal.SIGKILL)  # the whole server, mid-cohort; its kernels die with it
    server.wait()
    client.send_signal(signal.SIGINT)  # and the client, as Ctrl-C
    first_output = client.communicate(timeout=120)[0]
    assert client.returncode == 130, first_output[-3000:]
    finished_before = {e["request_id"] for e in Journal(out / "journal.jsonl").entries.values()
                       if e["state"] == "finished"}
    assert 6 <= len(finished_before) < 20, first_output[-2000:]

    server = _start_server(env, port, log)
    try:
        rerun = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    assert [r["input"] for r in rows] == [i if i.startswith("volume:") else str(Path(i).resolve()) for i in inputs]
    assert all(r["state"] == "finished" and int(r["num_total"]) >= 0 and r["percent_pos"] != "" for r in rows)
    assert "20 inputs: 20 finished, 0 failed, 0 pending" in rerun.stdout
    inline = [r for r in rows if not r["input"].startswith("volume:")]
    assert all((Path(r["outputs"]) / "local_Seg.png").is_file() for r in inline)
    assert all(r["outputs"].startswith("volume:edi_deployments/deepliif/") for r in rows if r not in inline)
    runs = _finished_lines(volume)
    assert all(runs[request_id] == 1 for request_id in finished_before), runs  # nothing finished ran twice
    assert {r["request_id"] for r in rows} <= set(runs)
    assert len(list((volume / "edi_deployments" / "deepliif" / "edi_logs").glob("pod-t-k*_inference.log"))) == 2
    kernel_logs = "".join(p.read_text() for p in redhare.glob("kernel-logs/*/kernel-*.log"))
    fetches = [line for line in kernel_logs.splitlines() if "fetched model from volume:" in line]
    assert len(fetches) == 1 and "already fetched" in kernel_logs, kernel_logs[-3000:]  # kernels started together
