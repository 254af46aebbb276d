"""PNG encoders side by side on seven 4096² outputs of real DeepLIIF images (a mosaic of the replay tiles):
Pillow at its default level and at level 1, libpng through imagecodecs at level 1 with the Sub filter
(what `encode_png` used before), and `deepliif.png_bands` (Sub filter, ISA-L deflate level 1, 512-row
bands: whole files per thread, and every band a task of its own as `infer` runs it), on one thread and on
`--threads`. Every encoding is decoded back and compared: the pixels must be identical.

    .venv/bin/python benchmarks/png_encoding.py --replay ../shared/fixtures/deepliif/replay --threads 2
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from deepliif.png_bands import band_edges, compress_band, encode_png, png_chunks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from postprocess_vs_deepliif import mosaic  # noqa: E402 - the same mosaic as the postprocessing comparison


def pillow(level: int | None):
    def encode(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", **({} if level is None else {"compress_level": level}))
        return buffer.getvalue()
    return encode


def libpng(image: np.ndarray) -> bytes:
    return bytes(imagecodecs.png_encode(image, level=1, filter=16))


def banded(images: list[np.ndarray], pool: ThreadPoolExecutor) -> list[bytes]:
    """Every band of every image a task of its own, then each file assembled."""
    def band(job: tuple[int, int, int]):
        index, top, bottom = job
        return compress_band(images[index][top:bottom], top, bottom == len(images[index]))

    jobs = [(index, top, bottom) for index, image in enumerate(images) for top, bottom in band_edges(len(image))]
    bands = list(pool.map(band, jobs))
    return [b"".join(png_chunks(image.shape[1], len(image), 3, [b for b, job in zip(bands, jobs) if job[0] == index]))
            for index, image in enumerate(images)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay", type=Path, default=Path("../shared/fixtures/deepliif/replay"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    names = ("IHC", "Hema", "DAPI", "Lap2", "Marker", "Seg", "IHC")  # seven outputs' worth of real pixels
    images = [mosaic(args.replay, name, args.size) for name in names]
    images[-1] = np.ascontiguousarray(images[-1][::-1])
    report = {}
    for label, encode in (("pillow default level", pillow(None)), ("pillow level 1", pillow(1)),
                          ("libpng level 1 sub", libpng), ("png_bands, a file per task", encode_png),
                          ("png_bands, a band per task", None)):
        for threads in sorted({1, args.threads}):
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                encoded = banded(images, pool) if encode is None else list(pool.map(encode, images))
            seconds = time.perf_counter() - start
            assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), image)
                       for data, image in zip(encoded, images)), label
            report[f"{label}, {threads} thread(s)"] = {"seconds": round(seconds, 2),
                                                      "megabytes": round(sum(map(len, encoded)) / 1e6, 1)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
