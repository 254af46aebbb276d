"""A real EDI round trip for `deepliif-engine demo --edi`: kernel.py behind the local endpoint on a free
loopback port, one base64 request and one volume-path request, and what came back."""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ...checkout import checkout_file
from ...settings import process_environment
from .runtime import load_kernel
from .server import serve_kernel


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


def _summary(label: str, response: dict) -> str:
    timings = response.get("timings", {})
    where = (f"{len(response['images'])} images inline" if "images" in response
             else f"outputs in {response.get('output_location')}")
    return (f"  {label}: HTTP 200, status {response['status']}, request_id {response['request_id']}, {where}, "
            f"scoring {json.dumps(response.get('scoring'))}, engine {timings.get('engine_seconds')} s "
            f"(network {timings.get('network_seconds')} s), "
            f"overhead (read+decode+encode+write) {timings.get('overhead_seconds')} s")


@contextlib.contextmanager
def local_endpoint(model_dir: Path, volume: Path, cache_dir: Path | None, backend: str, device: str
                   ) -> Iterator[str]:
    """kernel.py behind the local endpoint on a free loopback port, for the duration of the block."""
    settings = {"DEEPLIIF_MODEL_DIR": str(Path(model_dir).resolve()), "DEEPLIIF_VOLUME_ROOT": str(volume),
                "DEEPLIIF_BACKEND": backend, "DEEPLIIF_DEVICE": device}
    if cache_dir:
        settings["DEEPLIIF_CACHE_DIR"] = str(cache_dir)
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_kernel, daemon=True, kwargs=dict(
        kernel=load_kernel(checkout_file("kernel.py")), model_description=checkout_file("model.json").read_text(),
        host="127.0.0.1", port=0, ready=ready, stop=stop, environment={**process_environment(), **settings}))
    try:
        thread.start()
        if not ready.wait(3600):
            raise RuntimeError("the local EDI endpoint did not start")
        yield ready.server.url
    finally:
        stop.set()
        thread.join(600)


def volume_with(root: str | Path, images: list[Path]) -> Path:
    volume = Path(root) / "volume"
    if volume.exists():
        shutil.rmtree(volume)
    (volume / "slides").mkdir(parents=True)
    for image in images:
        shutil.copy(image, volume / "slides" / image.name)
    return volume


def round_trip(model_dir: Path, image: Path, out: Path, cache_dir: Path | None, backend: str, device: str
               ) -> list[str]:
    """Two good requests and a bad one; the volume (inputs, outputs, status, logs) is kept under `out`."""
    with local_endpoint(model_dir, volume_with(out, [image]), cache_dir, backend, device) as url:
        local = _post(url, {"local_input_image": base64.b64encode(image.read_bytes()).decode(),
                            "request_id": "demo-local"})
        path = _post(url, {"img_path_on_pvc": f"slides/{image.name}", "request_id": "demo-path",
                           "images_to_return": "seg_masks"})
        bad = _post(url, {"img_path_on_pvc": "../outside.png"})
    return [f"EDI round trip on {url}:", _summary("base64 request", local), _summary("path request", path),
            f"  bad request: HTTP 200, status {bad['status']}, msg {bad['msg']!r}"]


def measure_overhead(model_dir: Path, images: list[Path], cache_dir: Path | None, backend: str, device: str,
                     repeats: int = 3) -> list[dict]:
    """Per synchronous request: inference, the kernel's overhead (read + decode + encode + write) and the
    client's round trip beyond the kernel (HTTP, JSON, base64), for both input modes."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="deepliif-edi-bench-") as scratch:
        with local_endpoint(model_dir, volume_with(scratch, images), cache_dir, backend, device) as url:
            for repeat in range(repeats):
                for image in images:
                    encoded = base64.b64encode(image.read_bytes()).decode()
                    for mode, payload in (("base64", {"local_input_image": encoded}),
                                          ("path", {"img_path_on_pvc": f"slides/{image.name}"})):
                        start = time.perf_counter()
                        response = _post(url, {**payload, "async": False})
                        client = time.perf_counter() - start
                        timings = response["timings"]
                        rows.append({"image": image.name, "mode": mode, "repeat": repeat, **timings,
                                     "client_seconds": round(client, 4),
                                     "transport_seconds": round(client - timings["total_seconds"], 4)})
    return rows
