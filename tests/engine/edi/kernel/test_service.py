from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deepliif.imageio import read_image, write_png
from engine.edi.kernel.service import EdiService
from engine.samples import synthetic_ihc

from ..conftest import call as _call, ROOT, b64, make_volume, settings_for


def test_tasks_of_one_call_share_one_engine_pass_and_fail_alone(service: EdiService, tile_png: bytes,
                                                                engine_passes: list[int]) -> None:
    calls = engine_passes
    responses = _call(service, {"local_input_image": b64(tile_png), "request_id": "t1"},
                      {"img_path_on_pvc": "slides/missing.png", "request_id": "t2"},
                      {"img_path_on_pvc": "slides/tile.png", "request_id": "t3"},
                      {"img_path_on_pvc": "slides/tile.png", "images_to_return": "seg_masks", "request_id": "t4"})
    assert [r["status"] for r in responses] == ["finished", "error", "finished", "finished"]
    assert [r["request_id"] for r in responses] == ["t1", "t2", "t3", "t4"]
    assert calls == [3]  # t1, t3 and t4 share one tile stream though t4 asks for other outputs
    assert responses[0]["scoring"] == responses[2]["scoring"] == responses[3]["scoring"]
    returned = sorted(p.name for p in (service.volume.root / responses[3]["output_dir"]).iterdir())
    assert [name for name in returned if name.endswith(".png")] == \
        ["tile_Seg.png", "tile_SegOverlaid.png", "tile_SegRefined.png"]  # only what t4 asked for


def test_a_request_over_the_sync_budget_goes_async(edi_model: Path, edi_cache: Path, tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "volume")
    quick = EdiService(settings_for(edi_model, volume, edi_cache, tmp_path / "state", sync_budget_s=1e-6))
    try:
        (submitted,) = _call(quick, {"img_path_on_pvc": "slides/wide.png", "request_id": "long-1"})
        assert submitted["status"] == "submitted" and "estimated" in submitted["msg"]
        (forced_sync,) = _call(quick, {"img_path_on_pvc": "slides/tile.png", "async": False})
        assert forced_sync["status"] == "finished"
    finally:
        quick.close()  # waits for the background job
    record = json.loads((volume / "edi_deployments/deepliif/long-1/status.json").read_text())
    assert record["status"] == "finished" and (volume / record["output_dir"] / "wide_Seg.png").is_file()


def test_a_running_request_id_cannot_be_reused(service: EdiService) -> None:
    service.status.write("busy-1", {"status": "running"})
    (response,) = _call(service, {"img_path_on_pvc": "slides/tile.png", "request_id": "busy-1"})
    assert response["status"] == "error" and "still running" in response["msg"]
    assert service.status.read("busy-1")["status"] == "running"  # asking did not overwrite it


def test_a_request_whose_kernel_died_is_reported_lost_not_running_forever(service: EdiService) -> None:
    path = service.records.layout.status_file("orphan-1")
    service.state.write_bytes(path, json.dumps({"status": "running", "estimated_seconds": 2,
                                                "updated_at": "2026-01-01T00:00:00+00:00"}).encode())
    (response,) = _call(service, {"type": "status", "request_id": "orphan-1"})
    assert response["status"] == "error" and "lost" in response["msg"]
    (again,) = _call(service, {"img_path_on_pvc": "slides/tile.png", "request_id": "orphan-1"})
    assert again["status"] == "finished"  # the id can be used again


@pytest.mark.slow
def test_two_kernels_share_one_volume_and_cache_without_corrupting_each_other(edi_model: Path, edi_cache: Path,
                                                                              tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "volume")
    kernels: list[EdiService] = []
    starters = [threading.Thread(target=lambda pod=pod: kernels.append(EdiService(
        settings_for(edi_model, volume, edi_cache, tmp_path / "state", pod=pod)))) for pod in ("pod-a", "pod-b")]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join()
    assert len(kernels) == 2
    results: dict[str, list[dict]] = {}
    try:
        def serve(kernel: EdiService) -> None:
            results[kernel.settings.pod] = [json.loads(r) for r in kernel.handle(
                [json.dumps({"img_path_on_pvc": "slides/wide.png", "request_id": f"{kernel.settings.pod}-{i}"})
                 for i in range(3)] + [json.dumps({"img_path_on_pvc": "slides/tile.png", "request_id": "shared"})])]
        workers = [threading.Thread(target=serve, args=(k,)) for k in kernels]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        _, submitted = kernels[0], _call(kernels[0], {"img_path_on_pvc": "slides/tile.png", "async": True,
                                                      "request_id": "from-a"})[0]
        assert submitted["status"] == "submitted"
        deadline = time.monotonic() + 60
        while (status := _call(kernels[1], {"type": "status", "request_id": "from-a"})[0])["status"] != "finished":
            assert time.monotonic() < deadline and status["status"] in ("submitted", "running"), status
            time.sleep(0.05)
    finally:
        for kernel in kernels:
            kernel.close()
    for responses in results.values():
        assert [r["status"] for r in responses[:3]] == ["finished"] * 3, responses
    shared_answers = sorted(responses[3]["status"] for responses in results.values())
    assert shared_answers in (["finished", "finished"], ["finished", "running"])  # a retry is answered, not run
    base = volume / "edi_deployments/deepliif"
    logs = "".join((base / f"edi_logs/{pod}_inference.log").read_text() for pod in ("pod-a", "pod-b"))
    assert logs.count("shared finished") == 1  # the same request under one id ran once, on one kernel
    for pod in ("pod-a", "pod-b"):
        for i in range(3):
            output = base / f"{pod}-{i}/output_dir"
            assert len(list(output.glob("*.png"))) == 7
            assert all(read_image(p).shape == (600, 900, 3) for p in output.glob("*.png"))
        assert f"{pod}-0 finished" in (base / f"edi_logs/{pod}_inference.log").read_text()
    shared = base / "shared/output_dir"
    assert len(list(shared.glob("*.png"))) == 7 and not list(base.glob("shared/.*"))  # one complete set
    assert not list(base.glob("*/.output_dir.*"))  # no staging left behind
    assert json.loads((base / "shared/claim.json").read_text())["kernel"].startswith(("pod-a.", "pod-b."))


@pytest.mark.slow
def test_a_kernel_killed_mid_request_leaves_nothing_that_looks_complete(edi_model: Path, edi_cache: Path,
                                                                        tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "volume")
    write_png(volume / "slides" / "big.png", synthetic_ihc(2048, 2048, seed=5))
    env = {**os.environ, "DEEPLIIF_MODEL_DIR": str(edi_model), "DEEPLIIF_VOLUME_ROOT": str(volume),
           "DEEPLIIF_CACHE_DIR": str(edi_cache), "DEEPLIIF_BACKEND": "onnxruntime", "DEEPLIIF_DEVICE": "cpu",
           "PYTHONPATH": str(ROOT), "MSD_POD_NAME": "doomed"}
    script = ("import json, sys, kernel\n"
              "from engine.edi.standin.runtime import start_kernel, TaskContext\n"
              "k = kernel.DeepLIIFKernel(); start_kernel(k, open('model.json').read())\n"
              "print('ready', flush=True)\n"
              "t = TaskContext(json.dumps({'img_path_on_pvc': 'slides/big.png', 'tile_size': 64,\n"
              "                            'request_id': 'doomed', 'async': False}))\n"
              "k.on_task_invoke(t)\nprint('finished', flush=True)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        t0 = time.monotonic()
        assert process.stdout.readline().strip() == "ready"
        print("ready after", time.monotonic() - t0)
        time.sleep(1.5)  # well into the ~1300 tiles of the 64-pixel tiling
        assert process.poll() is None, "the request finished before it could be killed; make it longer"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    request_dir = volume / "edi_deployments/deepliif/doomed"
    assert not (request_dir / "output_dir").exists()
    leftovers = [p for p in request_dir.rglob("*") if p.is_file()] if request_dir.exists() else []
    assert all(p.name.startswith(".") or "partial" in str(p) or p.parent.name == "input_dir"
               or p.name == "claim.json" for p in leftovers)
    partial = request_dir / ".output_dir.partial-killed"  # what a kill in the middle of writing leaves ...
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "big_Seg.png").write_bytes(b"half")
    restarted = EdiService(settings_for(edi_model, volume, edi_cache, tmp_path / "state", pod="doomed"))
    restarted.close()
    assert not list(request_dir.glob(".output_dir.partial-*"))  # ... a starting kernel removes


def test_optical_density_thresholds_reach_postprocessing_of_images_and_slides(service: EdiService) -> None:
    import numpy as np
    import tifffile
    from engine.edi.kernel.requests import parse_request
    request = parse_request(json.dumps({"img_path_on_pvc": "slides/tile.png", "request_id": "od-parse",
                                        "od_thresh_lower": 56, "od_thresh_upper": 73,
                                        "large_noise_thresh": "default"}).encode())
    assert (request.postprocess.od_thresh_lower, request.postprocess.od_thresh_upper,
            request.postprocess.large_noise_thresh) == (56, 73, "default") and not request.warnings
    (image,) = _call(service, {"img_path_on_pvc": "slides/tile.png", "request_id": "od-image",
                               "od_thresh_lower": 56})
    assert image["status"] == "finished", image
    slide = np.full((1100, 1100, 3), 236, np.uint8)
    tifffile.imwrite(service.volume.root / "slides" / "od-slide.tif", slide, tile=(256, 256), photometric="rgb")
    (submitted,) = _call(service, {"img_path_on_pvc": "slides/od-slide.tif", "request_id": "od-slide",
                                   "od_thresh_lower": 56})
    assert submitted["status"] == "submitted", submitted
    deadline = time.monotonic() + 120
    while (status := _call(service, {"type": "status", "request_id": "od-slide"})[0])["status"] != "finished":
        assert time.monotonic() < deadline and status["status"] in ("submitted", "running"), status
        time.sleep(0.1)
    assert status["scoring"]["num_total"] == 0  # glass: no cells, and the IHC was read for their density
