from __future__ import annotations

import base64
import io
import json
import struct
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepliif.imageio import read_image

from ..conftest import Endpoint, b64

MODALITIES = ["DAPI", "Hema", "Lap2", "Marker"]
MASKS = ["Seg", "SegOverlaid", "SegRefined"]
EXPECTED = {"all": MODALITIES + MASKS, "modalities": MODALITIES, "seg_masks": MASKS}


@pytest.mark.parametrize("images_to_return", ["all", "modalities", "seg_masks"])
def test_base64_request_returns_the_named_images_the_input_and_the_scoring(endpoint: Endpoint, tile_png: bytes,
                                                                          images_to_return: str) -> None:
    status, response = endpoint.post({"local_input_image": b64(tile_png), "images_to_return": images_to_return,
                                      "request_id": f"local-{images_to_return}"})
    assert status == 200 and response["status"] == "finished", response
    assert response["request_id"] == f"local-{images_to_return}"
    expected = {"local.png"} | {f"local_{name}.png" for name in EXPECTED[images_to_return]}
    assert set(response["images"]) == expected
    assert base64.b64decode(response["images"]["local.png"]) == tile_png  # the original input, as sent
    for name in expected - {"local.png"}:
        assert read_image(base64.b64decode(response["images"][name])).shape == (512, 512, 3)
    assert set(response["scoring"]) >= {"num_total", "num_pos", "num_neg", "percent_pos", "seg_thresh",
                                        "size_thresh", "size_thresh_upper", "marker_thresh"}
    timings = response["timings"]
    assert timings["total_seconds"] >= timings["engine_seconds"] >= timings["network_seconds"] > 0
    assert timings["overhead_seconds"] >= 0
    assert isinstance(response["msg"], str) and isinstance(response["log"], list)


@pytest.mark.parametrize("images_to_return", ["all", "modalities", "seg_masks"])
def test_path_request_writes_outputs_and_input_on_the_volume(endpoint: Endpoint, images_to_return: str) -> None:
    request_id = f"path-{images_to_return}"
    status, response = endpoint.post({"img_path_on_pvc": "slides/wide.png", "images_to_return": images_to_return,
                                      "request_id": request_id})
    assert status == 200 and response["status"] == "finished", response
    assert "images" not in response and response["request_id"] == request_id
    assert response["output_dir"] == f"edi_deployments/deepliif/{request_id}/output_dir"
    output = endpoint.volume / response["output_dir"]
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [f"wide_{name}.png" for name in EXPECTED[images_to_return]] + ["wide_scoring.json"])
    assert read_image(output / f"wide_{EXPECTED[images_to_return][0]}.png").shape == (600, 900, 3)
    assert json.loads((output / "wide_scoring.json").read_text()) == response["scoring"]
    copied = endpoint.volume / f"edi_deployments/deepliif/{request_id}/input_dir/wide.png"
    assert copied.read_bytes() == (endpoint.volume / "slides/wide.png").read_bytes()
    log = (endpoint.volume / "edi_deployments/deepliif/edi_logs/pod-http_inference.log").read_text()
    assert f" {request_id} finished" in log


def test_the_path_wins_when_both_inputs_are_given(endpoint: Endpoint, tile_png: bytes) -> None:
    _, response = endpoint.post({"img_path_on_pvc": "slides/tile.png", "local_input_image": b64(tile_png)})
    assert response["status"] == "finished" and "images" not in response
    assert any("using img_path_on_pvc" in line for line in response["log"])
    assert len(response["request_id"]) == 36  # a uuid4 when none was given


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims this size (zero included), with valid CRCs and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buffer, "PNG")  # 9 Mpx, a few KB, over the 4 Mpx limit
    return buffer.getvalue()


def _bad_requests(volume: Path, tile_png: bytes) -> dict[str, tuple[object, str]]:
    outside = volume.parent / f"{volume.name}-outside.png"
    outside.write_bytes(tile_png)
    link = volume / "slides" / "escape.png"
    if not link.exists():
        link.symlink_to(outside)
    image = b64(tile_png)
    return {
        "non-JSON body": (b"this is not json", "not valid JSON"),
        "empty body": (b"", "not valid JSON"),
        "non-UTF-8 body": (b"\xff\xfe\x00{", "not UTF-8"),
        "JSON array": ([1, 2], "must be a JSON object; got list"),
        "JSON string": ("\"hello\"", "must be a JSON object; got str"),
        "neither input": ({"tile_size": 512}, "no image"),
        "input not a string": ({"local_input_image": 12345}, "non-empty base64 string"),
        "bad base64": ({"local_input_image": "@@not-base64@@"}, "not valid base64"),
        "base64 of text": ({"local_input_image": b64(b"hello, not an image")}, "not a readable image"),
        "truncated PNG": ({"local_input_image": b64(tile_png[: len(tile_png) // 2])}, "not a readable image"),
        "decompression bomb": ({"local_input_image": b64(_bomb())}, "9000000 pixels, over the limit of 4000000"),
        "zero-sized image": ({"local_input_image": b64(_png_with_size(0, 0))}, "local_input_image"),
        "tile_size a string": ({"local_input_image": image, "tile_size": "512"}, "tile_size must be an integer"),
        "tile_size a float": ({"local_input_image": image, "tile_size": 512.5}, "tile_size must be an integer"),
        "tile_size a boolean": ({"local_input_image": image, "tile_size": True}, "tile_size must be an integer"),
        "tile_size too small": ({"local_input_image": image, "tile_size": 32}, "between 64 and 4096; got 32"),
        "tile_size too large": ({"local_input_image": image, "tile_size": 100000}, "got 100000"),
        "unknown images_to_return": ({"local_input_image": image, "images_to_return": "everything"},
                                     "images_to_return must be one of all, modalities, seg_masks"),
        "request_id with a slash": ({"local_input_image": image, "request_id": "a/b"}, "request_id must be"),
        "request_id with ..": ({"local_input_image": image, "request_id": "a..b"}, "request_id must be"),
        "request_id not a string": ({"local_input_image": image, "request_id": 42}, "request_id must be"),
        "absolute path": ({"img_path_on_pvc": "/etc/passwd"}, "not absolute"),
        "path with ..": ({"img_path_on_pvc": "slides/../../secret.png"}, "must not contain '..'"),
        "path through a symlink out": ({"img_path_on_pvc": "slides/escape.png"}, "outside the volume"),
        "missing file": ({"img_path_on_pvc": "slides/missing.png"}, "no such file"),
        "path is a directory": ({"img_path_on_pvc": "slides"}, "no such file"),
        "empty path": ({"img_path_on_pvc": ""}, "non-empty string"),
        "async as a string": ({"local_input_image": image, "async": "false"}, "async must be true or false"),
        "unknown type": ({"type": "train", "local_input_image": image}, "type must be one of inference, status"),
        "status without request_id": ({"type": "status"}, "needs the request_id"),
        "status for an unknown request_id": ({"type": "status", "request_id": "never-seen"},
                                             "no request never-seen is known"),
        "unequal seg_weights": ({"local_input_image": image, "seg_weights": [1, 0, 0, 0, 0]},
                                "serves equal seg_weights"),
        "seg_weights not numbers": ({"local_input_image": image, "seg_weights": "abc"}, "list of 5 numbers"),
        "seg_thresh out of range": ({"local_input_image": image, "seg_thresh": 9999}, "seg_thresh must be"),
        "size_thresh a word": ({"local_input_image": image, "size_thresh": "big"}, "size_thresh must be"),
    }


@pytest.mark.slow
def test_every_bad_request_is_a_clear_error_and_the_kernel_serves_on(endpoint: Endpoint, tile_png: bytes) -> None:
    cases = _bad_requests(endpoint.volume, tile_png)
    assert len(cases) >= 25
    for label, (payload, expected) in cases.items():
        status, response = endpoint.post(payload if isinstance(payload, (bytes, str)) else json.dumps(payload))
        assert status == 200, label
        assert response["status"] == "error" and expected in response["msg"], (label, response["msg"])
        assert "\n" not in response["msg"] and response["request_id"], label
        _, good = endpoint.post({"img_path_on_pvc": "slides/tile.png"})
        assert good["status"] == "finished", (label, good)


def test_an_oversized_body_is_refused_before_it_is_read(endpoint: Endpoint) -> None:
    status, response = endpoint.post(b"x" * ((8 << 20) + 1))
    assert status == 200 and response["status"] == "error" and "over the limit" in response["msg"]
    assert endpoint.post({"img_path_on_pvc": "slides/tile.png"})[1]["status"] == "finished"


def test_wrong_endpoint_and_health(endpoint: Endpoint) -> None:
    with urllib.request.urlopen(endpoint.url, timeout=10) as response:
        assert json.loads(response.read()) == {"name": "deepliif", "status": "ready"}
    wrong = endpoint.url.replace("deepliif", "other")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(urllib.request.Request(wrong, b"{}"), timeout=10)
    assert caught.value.code == 404 and json.loads(caught.value.read())["status"] == "error"


def test_async_request_is_submitted_at_once_and_its_status_followed(endpoint: Endpoint, tile_png: bytes) -> None:
    _, submitted = endpoint.post({"local_input_image": b64(tile_png), "async": True, "request_id": "bg-1"})
    assert submitted["status"] == "submitted" and submitted["request_id"] == "bg-1"
    deadline, status = time.monotonic() + 60, submitted
    while status["status"] in ("submitted", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        _, status = endpoint.post({"type": "status", "request_id": "bg-1"})
    assert status["status"] == "finished", status
    assert status["output_dir"] == "edi_deployments/deepliif/bg-1/output_dir" and "scoring" in status
    assert "local_Hema.png" in status["images"]  # a base64 request gets its images back in the status
    record = json.loads((endpoint.volume / "edi_deployments/deepliif/bg-1/status.json").read_text())
    assert record["status"] == "finished" and record["submitted_at"] <= record["finished_at"]


def test_async_false_is_false(endpoint: Endpoint, tile_png: bytes) -> None:
    _, response = endpoint.post({"local_input_image": b64(tile_png), "async": False})
    assert response["status"] == "finished"


def test_concurrent_clients_are_queued_onto_the_one_kernel(endpoint: Endpoint) -> None:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: endpoint.post({"img_path_on_pvc": "slides/tile.png",
                                                         "request_id": f"many-{i}"}), range(6)))
    assert [r[1]["status"] for r in results] == ["finished"] * 6
    assert {r[1]["request_id"] for r in results} == {f"many-{i}" for i in range(6)}
    first = results[0][1]["scoring"]
    assert all(r[1]["scoring"] == first for r in results)  # same image, same counts, whatever the batch


def test_16_bit_and_rgba_inputs_are_converted_not_refused(endpoint: Endpoint) -> None:
    for mode, array in (("I;16", (np.arange(512 * 512).reshape(512, 512) % 65535).astype(np.uint16)),
                        ("RGBA", np.full((512, 512, 4), 128, np.uint8))):
        buffer = io.BytesIO()
        image = Image.fromarray(array)
        assert image.mode == mode
        image.save(buffer, "PNG")
        _, response = endpoint.post({"local_input_image": b64(buffer.getvalue())})
        assert response["status"] == "finished", (mode, response["msg"])


def test_the_kernel_takes_its_settings_as_a_mapping_not_from_a_rewritten_environment(endpoint: Endpoint,
                                                                                    tile_png: bytes) -> None:
    import os
    status, body = endpoint.post({"local_input_image": b64(tile_png), "request_id": "settings-1"})
    assert status == 200 and body["status"] == "finished"
    log = (endpoint.volume / "edi_deployments" / "deepliif" / "edi_logs" / "pod-http_inference.log").read_text()
    assert "pod-http settings-1 finished" in log  # MSD_POD_NAME came from the mapping the server was given
    assert os.environ.get("MSD_POD_NAME") != "pod-http"
    assert os.environ.get("DEEPLIIF_VOLUME_ROOT") != str(endpoint.volume)
