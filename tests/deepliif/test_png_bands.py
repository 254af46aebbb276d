from __future__ import annotations

import io
import random
import threading
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from deepliif.errors import ArgumentError
from deepliif.png_bands import BandedPng, combine_adler, compress_band, encode_png, png_chunks


def _decoded(data: bytes) -> np.ndarray:
    pillow = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(pillow, imagecodecs.png_decode(data))  # libpng reads the same pixels as Pillow
    return pillow


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 700, 3), (1500, 3, 3), (1100, 517, 3), (300, 200, 4), (513, 64)])
def test_pixels_come_back_identical(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(_decoded(encode_png(image)), image)


def test_views_with_any_strides_encode_their_own_pixels() -> None:
    image = np.random.default_rng(3).integers(0, 256, (900, 800, 3), dtype=np.uint8)
    view = image[100:700:2, 50:650]
    assert np.array_equal(_decoded(encode_png(view)), view)


def test_bands_added_in_any_order_from_threads_publish_one_file_once(tmp_path: Path) -> None:
    image = np.random.default_rng(4).integers(0, 256, (1000, 300, 3), dtype=np.uint8)
    edges = [(0, 137), (137, 500), (500, 501), (501, 1000)]
    random.Random(5).shuffle(edges)
    published = []

    def publish(path: Path, pieces) -> None:
        published.append((path, b"".join(pieces), threading.current_thread().name))

    png = BandedPng(tmp_path / "x.png", 300, 1000, 3, publish)
    threads = [threading.Thread(target=png.add, args=(image[top:bottom], top), name=f"band{top}")
               for top, bottom in edges]
    for thread in threads[:-1]:
        thread.start()
        thread.join()
    assert published == []  # nothing before the last band
    threads[-1].start()
    threads[-1].join()
    ((path, data, by),) = published
    assert path == tmp_path / "x.png" and by == threads[-1].name
    assert np.array_equal(_decoded(data), image)


def test_adler_of_concatenation_from_the_parts() -> None:
    rng = np.random.default_rng(6)
    for first_length, second_length in [(0, 0), (1, 0), (0, 7), (65521, 3), (200_000, 131_073)]:
        first, second = rng.bytes(first_length), rng.bytes(second_length)
        assert combine_adler(zlib.adler32(first), zlib.adler32(second), second_length) == zlib.adler32(first + second)
    ones = b"\xff" * 70_000  # sums that wrap the modulus
    assert combine_adler(zlib.adler32(ones), zlib.adler32(ones), len(ones)) == zlib.adler32(ones + ones)


def test_bands_that_miss_or_repeat_rows_are_refused() -> None:
    image = np.zeros((20, 4, 3), np.uint8)
    top, bottom = compress_band(image[:10], 0, False), compress_band(image[10:], 10, True)
    with pytest.raises(ArgumentError, match="expected 10"):
        list(png_chunks(4, 20, 3, [top, top, bottom]))
    with pytest.raises(ArgumentError, match="cover 10 rows of 20"):
        list(png_chunks(4, 20, 3, [top]))


@pytest.mark.parametrize("image", [np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4, 2), np.uint8),
                                   np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)])
def test_what_png_cannot_hold_is_named(image: np.ndarray) -> None:
    with pytest.raises(ArgumentError, match=r"uint8 \[H, W\]"):
        encode_png(image)
