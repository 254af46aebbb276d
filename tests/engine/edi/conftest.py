from __future__ import annotations

import base64
import json
import os
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from deepliif.imageio import encode_png, write_png
from deepliif.model_dir import Layout
from engine.edi.standin.runtime import load_kernel
from engine.edi.standin.server import serve_kernel
from engine.edi.kernel.service import EdiService
from engine.edi.kernel.settings import KernelSettings
from engine.samples import synthetic_ihc

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def edi_model(generated_models: dict[Layout, Path]) -> Path:
    return generated_models[Layout.TORCHSCRIPT]


@pytest.fixture(scope="session")
def edi_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for every kernel of these tests (as one REDHARE_MODEL_PATH would be)."""
    return tmp_path_factory.mktemp("edi-cache")


@pytest.fixture(scope="session")
def tile_png() -> bytes:
    return encode_png(synthetic_ihc(seed=11))


def make_volume(root: Path) -> Path:
    (root / "slides").mkdir(parents=True)
    write_png(root / "slides" / "tile.png", synthetic_ihc(seed=11))
    write_png(root / "slides" / "wide.png", synthetic_ihc(600, 900, seed=12))
    return root


def settings_for(model: Path, volume: Path | None, cache: Path, state: Path, **changes) -> KernelSettings:
    base = KernelSettings(model_dir=model, deployment="deepliif", pod="pod-a", backend="onnxruntime",
                          device="cpu", cache_dir=cache, volume_root=volume, state_root=state,
                          max_pixels=4_000_000, max_request_bytes=8 << 20)
    return replace(base, **changes)


@pytest.fixture(scope="module")
def service(edi_model: Path, edi_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    volume = make_volume(tmp_path_factory.mktemp("volume"))
    with_service = EdiService(settings_for(edi_model, volume, edi_cache, tmp_path_factory.mktemp("state")))
    yield with_service
    with_service.close()


class Endpoint:
    def __init__(self, url: str, volume: Path) -> None:
        self.url = url
        self.volume = volume

    def post(self, payload: dict | bytes | str) -> tuple[int, dict]:
        data = payload if isinstance(payload, bytes) else (
            payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
        request = urllib.request.Request(self.url, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def endpoint(edi_model: Path, edi_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """kernel.py behind the real local EDI endpoint on a free loopback port."""
    volume = make_volume(tmp_path_factory.mktemp("volume"))
    env = {"DEEPLIIF_MODEL_DIR": str(edi_model), "DEEPLIIF_VOLUME_ROOT": str(volume),
           "DEEPLIIF_CACHE_DIR": str(edi_cache), "DEEPLIIF_BACKEND": "onnxruntime", "DEEPLIIF_DEVICE": "cpu",
           "DEEPLIIF_MAX_PIXELS": "4000000", "DEEPLIIF_MAX_REQUEST_MB": "8", "MSD_POD_NAME": "pod-http",
           "REDHARE_MODEL_NAME": "deepliif"}
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_kernel, kwargs=dict(
        kernel=load_kernel(ROOT / "kernel.py"), model_description=(ROOT / "model.json").read_text(),
        host="127.0.0.1", port=0, max_body=8 << 20, ready=ready, stop=stop,
        environment={**os.environ, **env}), daemon=True)  # settings as a mapping: os.environ is left alone
    thread.start()
    assert ready.wait(120), "the endpoint did not come up"
    yield Endpoint(ready.server.url, volume)
    stop.set()
    thread.join(60)


@pytest.fixture
def engine_passes(service: EdiService, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many images each engine pass of the module's service took during the test, in order."""
    passes: list[int] = []
    original = service.session.infer_many

    def counted(images, options, **loop):
        passes.append(len(images))
        return original(images, options, **loop)

    monkeypatch.setattr(service.session, "infer_many", counted)
    return passes


def call(service: EdiService, *payloads: dict) -> list[dict]:
    """The service's answers to these request bodies, in one EDI call."""
    return [json.loads(r) for r in service.handle([json.dumps(p) for p in payloads])]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
