"""Several images through one `infer_many` call against the replay stand-in, paced like a GPU or not.

What it answers: while one image is postprocessed, do the next images' tiles keep the network busy? (The EDI
kernel hands a request's images to one call; `bench --pipeline` takes one image, whose postprocessing can only
follow its own last tile.) Run it from the checkout whose code is measured; it prints the wall of each run,
the stand-in's busy seconds and their share of the last run's wall.

    .venv/bin/python benchmarks/several_images_paced.py --image /tmp/pp/ihc4096.png \\
        --replay ../shared/fixtures/deepliif/replay --images 3 --network-tiles-per-s 120 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

from deepliif.imageio import read_image  # noqa: E402
from deepliif.inference import InferenceOptions  # noqa: E402
from deepliif.workers import keep_freed_memory  # noqa: E402
from engine.pipeline_bench import cpus_limited_to  # noqa: E402
from engine.replay import ReplaySession  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--replay", type=Path, required=True)
    parser.add_argument("--images", type=int, default=3, help="copies of the image in the one call")
    parser.add_argument("--network-tiles-per-s", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    keep_freed_memory()
    image = read_image(args.image)
    walls, session = [], None
    with cpus_limited_to(args.threads):
        for _ in range(args.repeats):
            session = ReplaySession(args.replay, args.network_tiles_per_s, args.batch_size)
            start = time.perf_counter()
            session.infer_many([image] * args.images, InferenceOptions(batch_size=args.batch_size,
                                                                      threads=args.threads))
            walls.append(time.perf_counter() - start)
    print(f"images {args.images}, pace {args.network_tiles_per_s or 'unpaced'}, threads {args.threads}: "
          f"walls {' / '.join(f'{w:.2f}' for w in walls)} s; network busy {session.busy_seconds:.2f} s "
          f"({session.busy_seconds / walls[-1]:.0%} of the last run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
