from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepliif.errors import ImageError
from deepliif.imageio import read_image, write_atomically


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_rgb_round_trip() -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(read_image(_png(Image.fromarray(pixels))), pixels)


def test_greyscale_becomes_rgb() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = read_image(_png(Image.fromarray(grey)))
    assert rgb.shape == (3, 4, 3) and np.array_equal(rgb[:, :, 1], grey)


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[1, 1] = (10, 20, 30, 0)  # transparent: white glass
    rgb = read_image(_png(Image.fromarray(rgba, "RGBA")))
    assert tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[1, 1]) == (255, 255, 255)


def test_sixteen_bit_is_scaled_to_eight() -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    rgb = read_image(_png(image))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_float_images_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "float.tiff"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(ImageError, match="mode F"):
        read_image(path)


def test_non_image_and_truncated_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a readable image"):
        read_image(b"%PDF-1.4 definitely not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        read_image(_png(Image.new("RGB", (64, 64), "red"))[:60])
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "absent.png")


def test_zero_sized_image() -> None:
    with pytest.raises(ImageError, match="zero size|not a readable image"):
        read_image(_png_header_only(0, 10))


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(ImageError, match=r"100x100 = 10000 pixels, over the limit of 9999"):
        read_image(_png(Image.new("RGB", (100, 100))), max_pixels=9999)
    with pytest.raises(ImageError, match="over the limit"):
        read_image(_png_header_only(100_000, 100_000))  # a bomb: header only, never decoded


def test_atomic_write_leaves_nothing_half_written(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"

    write_atomically(target, b"complete")
    with pytest.raises(TypeError):
        write_atomically(target, object())  # type: ignore[arg-type]  # fails mid-write
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
