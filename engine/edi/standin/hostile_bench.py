"""`deepliif-engine edi-hostile-bench`: the kernel behind its local endpoint under a bounded, loopback-only
campaign of malformed requests, a connection burst, and synchronous requests with and without a large
async job beside them. Reports what was answered, sync latency percentiles and the process's peak RSS.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import statistics
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from deepliif.imageio import encode_png, write_png

from ...samples import synthetic_ihc
from .demo import volume_with, local_endpoint


def _png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def malformed_bodies(tile_b64: str) -> dict[str, bytes]:
    """Bodies that break the contract in every way the campaign found; each must get a JSON error."""
    eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n").decode()
    cases: dict[str, object] = {
        "not JSON": b"{nope", "JSON array": [1, 2], "empty object": {}, "null body": None,
        "number as image": {"local_input_image": 42}, "not base64": {"local_input_image": "%%%"},
        "base64 of text": {"local_input_image": base64.b64encode(b"hello").decode()},
        "EPS image": {"local_input_image": eps}, "absolute path": {"img_path_on_pvc": "/etc/passwd"},
        "traversal": {"img_path_on_pvc": "slides/../../secret.png"}, "NUL in path": {"img_path_on_pvc": "a\x00b"},
        "missing file": {"img_path_on_pvc": "slides/none.png"}, "folder as image": {"img_path_on_pvc": "slides"},
        "id with slash": {"local_input_image": tile_b64, "request_id": "a/b"},
        "id with newline": {"local_input_image": tile_b64, "request_id": "ok\n"},
        "reserved id": {"local_input_image": tile_b64, "request_id": "edi_logs"},
        "tile too small": {"local_input_image": tile_b64, "tile_size": 8},
        "tile as text": {"local_input_image": tile_b64, "tile_size": "big"},
        "bad output set": {"local_input_image": tile_b64, "images_to_return": "everything"},
        "async as text": {"local_input_image": tile_b64, "async": "yes"},
        "bad seg weights": {"local_input_image": tile_b64, "seg_weights": [1, 2]},
        "status without id": {"type": "status"}, "unknown status id": {"type": "status", "request_id": "nope"},
        "unknown type": {"type": "delete", "request_id": "x"},
        "1 x 2,000,000 strip": {"local_input_image": _png_b64(np.full((1, 2_000_000, 3), 200, np.uint8))},
    }
    return {name: body if isinstance(body, bytes) else json.dumps(body).encode() for name, body in cases.items()}


def raw_exchange(url: str, request: bytes, wait: float = 10.0) -> bytes:
    """Send bytes as they are (no HTTP client tidying them up); everything the server answered."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def raw_requests(url: str) -> dict[str, bytes]:
    path = urllib.parse.urlsplit(url).path
    return {f"{method} method": f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
            for method in ("PUT", "DELETE", "PATCH", "OPTIONS")} | {
        "bad Content-Length": f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".encode(),
        "no Content-Length": f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "garbage request line": b"HELLO\r\n\r\n"}


def _answered_json(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    try:
        return head.startswith(b"HTTP/") and isinstance(json.loads(body), dict)
    except ValueError:
        return False


def _post(url: str, body: bytes, timeout: float = 600) -> tuple[dict, float]:
    start = time.perf_counter()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read()), time.perf_counter() - start


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"n": len(ordered), "p50_seconds": round(statistics.median(ordered), 3),
            "p95_seconds": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return round(int(line.split()[1]) / 2**20, 2)
    return float("nan")


def run_hostile_bench(model_dir: Path, cache_dir: Path | None, backend: str, device: str, burst: int = 64,
                      sync_requests: int = 12, big_side: int = 4096) -> dict:
    tile = synthetic_ihc(seed=11)
    tile_b64 = base64.b64encode(encode_png(tile)).decode()
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="deepliif-hostile-") as scratch:
        volume = volume_with(scratch, [])
        write_png(volume / "slides" / "big.png", synthetic_ihc(big_side, big_side, seed=5))
        with local_endpoint(model_dir, volume, cache_dir, backend, device) as url:
            bodies = malformed_bodies(tile_b64)
            answered = sum(_post(url, body)[0].get("status") == "error" for body in bodies.values())
            raw = raw_requests(url)
            raw_answered = sum(_answered_json(raw_exchange(url, request)) for request in raw.values())
            report["malformed"] = {"tried": len(bodies) + len(raw), "answered_with_json_error": answered + raw_answered}
            status = json.dumps({"type": "status", "request_id": "burst-unknown"}).encode()
            with ThreadPoolExecutor(burst) as pool:
                replies = list(pool.map(lambda _: _post(url, status, 60)[0].get("status"), range(burst)))
            report["burst"] = {"connections": burst, "answered": sum(r == "error" for r in replies)}
            quiet = [_post(url, json.dumps({"local_input_image": tile_b64, "request_id": f"quiet-{i}"}).encode())[1]
                     for i in range(sync_requests)]
            report["sync_alone"] = _percentiles(quiet)
            job, _ = _post(url, json.dumps({"img_path_on_pvc": "slides/big.png", "async": True,
                                            "request_id": "big-async"}).encode())
            busy = [_post(url, json.dumps({"local_input_image": tile_b64, "request_id": f"busy-{i}"}).encode())[1]
                    for i in range(sync_requests)]
            report["sync_beside_async"] = _percentiles(busy)
            report["async_status_after_sync"] = _post(url, json.dumps(
                {"type": "status", "request_id": "big-async"}).encode())[0]["status"]
            report["async_job"] = {"side": big_side, "submitted": job["status"]}
    report["peak_rss_gib"] = _peak_rss_gib()
    return report
