"""One image the way DeepLIIF runs it, as a whole process: the baseline of `bench --whole-process`.

`python -m engine.deepliif_way --model-dir M --out OUT IMAGE` loads the nine generators, runs them one
after another on one tile at a time (fp32 eager, `DeepLIIFWayRunner`), stitches and postprocesses with
the same code as the engine, writes the PNGs and `OUT/<stem>.json` with its timings. Only the tile
loop's arithmetic differs from `deepliif-engine infer`, so the two processes compare start-up, loading
and per-tile speed, nothing else.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from deepliif.imageio import prepare_out_dir, read_image, write_json, write_png
from deepliif.inference import InferenceOptions, infer_image


class _OneTileAtATime:
    def __init__(self, runner) -> None:
        self.runner = runner

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        results = [self.runner.run_tile(tile) for tile in batch]
        return {name: np.stack([r[name] for r in results]) for name in results[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.deepliif_way", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="DeepLIIF model directory")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (default cpu)")
    parser.add_argument("image", type=Path, help="IHC image")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    from deepliif.model_dir import load_model_dir
    from deepliif.pipeline import DeepLIIFWayRunner
    runner = _OneTileAtATime(DeepLIIFWayRunner(load_model_dir(args.model_dir), device=args.device))
    loaded = time.perf_counter()
    result = infer_image(runner, read_image(args.image), InferenceOptions(batch_size=1))
    out = prepare_out_dir(args.out)
    for name, array in result.images.items():
        write_png(out / f"{args.image.stem}_{name}.png", array)
    write_json(out / f"{args.image.stem}.json", {"image": str(args.image), "scoring": result.scoring,
                                                 "load_seconds": loaded - start, "timings": result.timings})
    return 0


if __name__ == "__main__":
    sys.exit(main())
