"""Shared fixtures. `../shared` is not part of the project: tests that need it skip where it is absent
(a user's fresh clone) and fail when CI=true (CI always has it)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from deepliif.demo import write_demo_model
from deepliif.model_dir import Layout

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    """Tests never write to the user's artifact cache: sessions without a cache_dir use a temporary one."""
    os.environ["DEEPLIIF_CACHE_DIR"] = tempfile.mkdtemp(prefix="deepliif-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("DEEPLIIF_CACHE_DIR", ""), ignore_errors=True)  # gigabytes over many runs


def _require(path: Path) -> Path:
    if not path.exists():
        message = f"{path} is absent (the project's ../shared fixtures)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def deepliif_fixtures() -> Path:
    return _require(SHARED / "fixtures" / "deepliif")


@pytest.fixture(scope="session")
def slide_fixtures() -> Path:
    """Real scanner files: an Aperio SVS, a DICOM WSI, a damaged SVS (see their README)."""
    return _require(SHARED / "fixtures" / "slides")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return _require(SHARED / "data" / "ihc")


@pytest.fixture(scope="session")
def tiny_models(deepliif_fixtures: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((deepliif_fixtures / "models").iterdir())}


@pytest.fixture(scope="session")
def generated_models(tmp_path_factory: pytest.TempPathFactory) -> dict[Layout, Path]:
    """Small (ngf 2) random-weight models in both layouts, made by the project's own writer."""
    root = tmp_path_factory.mktemp("generated-models")
    return {layout: write_demo_model(root / layout.value, layout, ngf=2, seed=7) for layout in Layout}


@pytest.fixture
def ihc_tile() -> np.ndarray:
    from engine.samples import synthetic_ihc
    return synthetic_ihc(seed=3)


class DeviceStream:
    """The CUDA stream seam of the TensorRT backend, on the CPU: its "device" buffers are host memory the
    `tensorrt` double knows as device allocations, its handle a registered non-zero stream, and
    `synchronize` is what makes a stream's results the host's (the double holds them pending until then)."""

    def __init__(self) -> None:
        import tensorrt
        import torch
        self.device = torch.device("cpu")
        self.handle = 0x5EED0000 + len(tensorrt.STREAMS) + 1
        tensorrt.STREAMS.add(self.handle)
        self._allocations: list = []  # keeps the buffers alive while the double knows their addresses

    def scope(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def device_scope(self):
        """Records that the block ran with the backend's device current (`tensorrt_double.DEVICE["current"]`)."""
        import tensorrt
        tensorrt.DEVICE["current"] = True
        try:
            yield
        finally:
            tensorrt.DEVICE["current"] = False

    def empty(self, shape: tuple[int, ...]):
        import tensorrt
        import torch
        buffer = torch.empty(shape, dtype=torch.uint8)
        self._allocations.append(buffer)
        start, size = buffer.data_ptr(), buffer.numel()
        for old in [a for a, n in tensorrt.DEVICE_MEMORY.items() if a < start + size and start < a + n]:
            del tensorrt.DEVICE_MEMORY[old]  # freed memory the host allocator handed out again
        tensorrt.DEVICE_MEMORY[start] = size
        return buffer

    def synchronize(self) -> None:
        import tensorrt
        tensorrt.PENDING.discard(self.handle)


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch):
    """`tests/tensorrt_double.py` installed as `tensorrt`, its device as the current GPU, host buffers
    in place of CUDA ones: the narrowest seams, so everything else runs as on a GPU."""
    spec = importlib.util.spec_from_file_location("tensorrt", Path(__file__).with_name("tensorrt_double.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    from engine.backends import tensorrt_backend
    from export.tensorrt_build import GpuInfo

    def current(cls, device: int = 0) -> GpuInfo:
        return cls(module.DEVICE["name"], module.DEVICE["compute_capability"])

    monkeypatch.setattr(GpuInfo, "current", classmethod(current))
    monkeypatch.setattr(tensorrt_backend, "open_stream", lambda index: DeviceStream())
    yield module
    assert not module.PENDING, "a TensorRT execution's results were used without synchronising its stream"


def _write_svs_style(path: Path, image: np.ndarray, mpp: float, power: int) -> Path:
    """Aperio's layout as tifffile writes it: a tiled baseline whose description carries AppMag and MPP,
    then a stripped thumbnail (uncompressed, so pixels compare exactly)."""
    import tifffile
    height, width = image.shape[:2]
    description = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] (256x256) RAW"
                   f"|AppMag = {power}|MPP = {mpp}|Filename = fixture")
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(image, tile=(256, 256), photometric="rgb", description=description)
        tiff.write(np.ascontiguousarray(image[::16, ::16]), photometric="rgb",
                   description="Aperio Image Library v12.0.15 thumbnail")
    return path


@pytest.fixture
def write_svs_style():
    """Writes an SVS-style slide: `write_svs_style(path, image, mpp, power)`."""
    return _write_svs_style


def _reference_image(case: Path, name: str) -> Path:
    """A fixture case's `<Name>.png`, or `mod<k>-<Name>.png` as DeepLIIF 1.2.7 names modality outputs
    when it knows the modality names (outputs/mini/)."""
    named = sorted(case.glob(f"mod[0-9]-{name}.png"))
    return named[0] if named else case / f"{name}.png"


@pytest.fixture
def reference_image():
    """`reference_image(case_dir, name)`: the path of one of a fixture case's reference outputs."""
    return _reference_image
