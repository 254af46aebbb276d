"""A folder of small images through `infer`'s own file path against the replay stand-in, paced or not.

What it answers: with a folder of DeepLIIF-sized tiles (one network tile each), how busy is the network,
and how large are its batches? Run it from the checkout whose code is measured; it prints the wall of each
run, the stand-in's busy seconds, their share of the last run's wall, and the batch sizes it was handed.

    .venv/bin/python benchmarks/folder_of_tiles.py --replay ../shared/fixtures/deepliif/replay \\
        --images 64 --network-tiles-per-s 120 --threads 2
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

from deepliif.inference import InferenceOptions  # noqa: E402
from engine.image_files import infer_image_files  # noqa: E402
from engine.pipeline_bench import cpus_limited_to  # noqa: E402
from engine.replay import ReplaySession  # noqa: E402


class _Recorded(ReplaySession):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def run(self, batch):
        self.batch_sizes[len(batch)] += 1
        return super().run(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replay", type=Path, required=True)
    parser.add_argument("--images", type=int, default=64, help="tiles in the folder (the replay IHC, cycled)")
    parser.add_argument("--network-tiles-per-s", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.replay.iterdir() if p.is_dir())
    walls, session = [], None
    with tempfile.TemporaryDirectory() as scratch, cpus_limited_to(args.threads):
        inputs = []
        for number in range(args.images):
            inputs.append(Path(scratch) / "in" / f"tile{number:04d}.png")
            inputs[-1].parent.mkdir(exist_ok=True)
            inputs[-1].write_bytes((folders[number % len(folders)] / "IHC.png").read_bytes())
        for run in range(args.repeats):
            session = _Recorded(args.replay, args.network_tiles_per_s, args.batch_size)
            start = time.perf_counter()
            infer_image_files(session, inputs, Path(scratch) / f"out{run}",
                              InferenceOptions(batch_size=args.batch_size, threads=args.threads), {})
            walls.append(time.perf_counter() - start)
    print(f"images {args.images}, pace {args.network_tiles_per_s or 'unpaced'}, threads {args.threads}: "
          f"walls {' / '.join(f'{w:.2f}' for w in walls)} s; network busy {session.busy_seconds:.2f} s "
          f"({session.busy_seconds / walls[-1]:.0%} of the last run); "
          f"batches (tiles: count) {dict(sorted(session.batch_sizes.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
