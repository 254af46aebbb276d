"""A large tiled OME-TIFF for slide benchmarks: real IHC tiles as tissue, near-white glass.

The tissue is DeepLIIF's sample IHC tiles (the replay folders' `IHC.png`), repeated with rotations; each
512-pixel cell of the slide is tissue or glass so that about `--tissue` of the slide is tissue. Written
in tiles from a generator, so memory stays at a row of tiles whatever the size.

    .venv/bin/python benchmarks/make_slide.py --replay ../shared/fixtures/deepliif/replay \\
        --size 16384 --tissue 0.5 --out /tmp/slide16k.ome.tif
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

CELL, TILE = 512, 256


def tissue_map(cells: int, share: float, seed: int) -> np.ndarray:
    """Which 512-pixel cells hold tissue: compact islands (a smoothed random field, thresholded)."""
    rng = np.random.default_rng(seed)
    field = rng.random((cells, cells))
    for _ in range(3):
        field = (field + np.roll(field, 1, 0) + np.roll(field, -1, 0) + np.roll(field, 1, 1) + np.roll(field, -1, 1)) / 5
    return field >= np.quantile(field, 1 - share)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay", type=Path, required=True)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--tissue", type=float, default=0.5)
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tiles = [np.asarray(Image.open(p / "IHC.png").convert("RGB")) for p in sorted(args.replay.iterdir())]
    cells = args.size // CELL
    tissue = tissue_map(cells, args.tissue, args.seed)
    glass = np.random.default_rng(1).normal(240, 2, (CELL, CELL, 3)).clip(0, 255).astype(np.uint8)

    def cell(j: int, i: int) -> np.ndarray:
        return np.rot90(tiles[(i + j) % len(tiles)], (i * 7 + j * 3) % 4) if tissue[j, i] else glass

    def tiles_of_row(j: int):
        row = np.concatenate([cell(j, i) for i in range(cells)], axis=1)
        for y in range(0, CELL, TILE):
            for x in range(0, args.size, TILE):
                yield np.ascontiguousarray(row[y: y + TILE, x: x + TILE])

    def all_tiles():
        for j in range(cells):
            yield from tiles_of_row(j)

    with tifffile.TiffWriter(args.out, bigtiff=True, ome=True) as tiff:  # level 0 only: infer reads no other
        tiff.write(all_tiles(), shape=(args.size, args.size, 3), dtype=np.uint8, tile=(TILE, TILE),
                   photometric="rgb", compression="zlib",
                   metadata={"axes": "YXS", "PhysicalSizeX": args.mpp, "PhysicalSizeY": args.mpp})
    print(f"{args.out}: {args.size}x{args.size}, {tissue.mean():.0%} of 512-pixel cells tissue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
