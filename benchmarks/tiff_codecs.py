"""Slide pyramid codecs side by side on 4096² mosaics of real DeepLIIF outputs (the replay tiles), written
as 256² TIFF tiles by tifffile on one thread, as a slide run writes each output: the time to write, the
time to read back, the size, and for the lossless ones a check that every pixel comes back. The codecs
are the project's own (`deepliif.pyramid`: DEFLATE, ZSTD, JPEG) and the alternatives they were chosen
against (zstd with the horizontal predictor, zstd at level 3). Each figure is the median of `--repeats`.

    .venv/bin/python benchmarks/tiff_codecs.py --replay ../shared/fixtures/deepliif/replay
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from deepliif.pyramid import DEFLATE, JPEG, TIFF_TILE, ZSTD, Codec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from postprocess_vs_deepliif import mosaic  # noqa: E402 - the same mosaic as the postprocessing comparison

CODECS = {"deflate (DEFLATE)": DEFLATE, "zstd (ZSTD)": ZSTD, "zstd + predictor": Codec("zstd", 1, 2, (50000,)),
          "zstd level 3": Codec("zstd", 3, None, (50000,)), "jpeg q90 4:4:4 (JPEG)": JPEG}


def measure(image: np.ndarray, codec: Codec, path: Path, repeats: int) -> dict:
    writes, reads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tifffile.imwrite(path, image, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", maxworkers=1,
                         **codec.arguments())
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        back = tifffile.imread(path, maxworkers=1)
        reads.append(time.perf_counter() - start)
    lossless = bool(np.array_equal(back, image))
    if codec.compression != "jpeg" and not lossless:
        raise AssertionError(f"{codec} did not give the pixels back")
    return {"write_s": round(statistics.median(writes), 3), "read_s": round(statistics.median(reads), 3),
            "megabytes": round(path.stat().st_size / 1e6, 1), "lossless": lossless,
            "mean_error": round(float(np.abs(back.astype(int) - image).mean()), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay", type=Path, default=Path("../shared/fixtures/deepliif/replay"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--outputs", default="Hema,DAPI,Lap2,Marker,Seg")
    args = parser.parse_args()
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.outputs.split(","):
            image = mosaic(args.replay, name, args.size)
            report[name] = {label: measure(image, codec, Path(folder) / "codec.tif", args.repeats)
                            for label, codec in CODECS.items()}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
