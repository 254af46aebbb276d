"""Postprocessing side by side with DeepLIIF 1.2.7's own `compute_final_results`, on the same arrays.

DeepLIIF is never a dependency of this project: install the published package in a scratch venv
(`pip install --no-deps deepliif==1.2.7` plus numpy, numba, scipy, scikit-image, opencv-python-headless,
pillow) and pass its interpreter. Each side runs in its own process: one warm-up call (DeepLIIF's numba
JIT compiles there), then `--repeats` timed calls; the two processes alternate `--rounds` times so that
machine noise falls on both. Scoring must be identical; image differences are counted.

    .venv/bin/python benchmarks/postprocess_vs_deepliif.py --deepliif-python /tmp/dlvenv/bin/python \\
        --replay ../shared/fixtures/deepliif/replay --size 4096 --json .bench/postprocess.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("IHC", "Seg", "Marker")


def mosaic(replay: Path, name: str, size: int) -> np.ndarray:
    """A size² image of the replay tiles, alternating tiles and rotations so neighbours differ."""
    tiles = [np.asarray(Image.open(folder / f"{name}.png").convert("RGB")) for folder in sorted(replay.iterdir())]
    side = tiles[0].shape[0]
    rows = []
    for j in range(size // side):
        row = [tiles[(i + j) % len(tiles)] for i in range(size // side)]
        rows.append(np.concatenate([np.rot90(t, (i * 7 + j * 3) % 4) for i, t in enumerate(row)], axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def worker(kind: str, folder: Path, repeats: int, threads: int | None) -> None:
    ihc, seg, marker = (np.load(folder / f"{name}.npy") for name in NAMES)
    if kind == "deepliif":
        from deepliif.postprocessing import compute_final_results

        def call():
            overlaid, refined, scoring = compute_final_results(ihc, seg, marker, "40x")
            return overlaid, refined, scoring
    else:
        from deepliif.postprocessing import postprocess
        from deepliif.workers import keep_freed_memory
        keep_freed_memory()  # as the CLI and the EDI kernel do at start

        def call():
            result = postprocess(ihc, seg, marker, 512, threads=threads)
            return result.overlaid, result.refined, result.scoring
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        overlaid, refined, scoring = call()
        seconds.append(time.perf_counter() - start)
    np.save(folder / f"{kind}_SegOverlaid.npy", overlaid)
    np.save(folder / f"{kind}_SegRefined.npy", refined)
    print(json.dumps({"first_call_s": first, "seconds": seconds, "scoring": scoring}))


def run_side(python: str, kind: str, folder: Path, repeats: int, threads: int | None) -> dict:
    command = [python, __file__, "--worker", kind, "--folder", str(folder), "--repeats", str(repeats)]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepliif-python", help="the scratch venv's interpreter, with deepliif==1.2.7")
    parser.add_argument("--replay", type=Path, default=Path("../shared/fixtures/deepliif/replay"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=("deepliif", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folder, args.repeats, args.threads)
        return 0
    if not args.deepliif_python:
        parser.error("--deepliif-python is required")
    with tempfile.TemporaryDirectory(prefix="postprocess-bench-") as scratch:
        folder = Path(scratch)
        for name in NAMES:
            np.save(folder / f"{name}.npy", mosaic(args.replay, name, args.size))
        runs: dict[str, list[dict]] = {"engine": [], "deepliif": []}
        for _ in range(args.rounds):
            runs["engine"].append(run_side(sys.executable, "engine", folder, args.repeats, args.threads))
            runs["deepliif"].append(run_side(args.deepliif_python, "deepliif", folder, args.repeats, None))
        report = {"size": args.size, "threads": args.threads, "repeats": args.repeats, "rounds": args.rounds}
        for kind, results in runs.items():
            warm = [s for result in results for s in result["seconds"]]
            report[kind] = {"warm_median_s": statistics.median(warm), "warm_min_s": min(warm),
                            "first_call_s": [round(r["first_call_s"], 3) for r in results],
                            "scoring": results[-1]["scoring"]}
        report["ratio_engine_to_deepliif"] = report["engine"]["warm_median_s"] / report["deepliif"]["warm_median_s"]
        report["scoring_identical"] = report["engine"]["scoring"] == report["deepliif"]["scoring"]
        for image in ("SegOverlaid", "SegRefined"):
            ours, theirs = (np.load(folder / f"{kind}_{image}.npy") for kind in ("engine", "deepliif"))
            report[f"{image}_pixels_differing"] = int(np.any(ours != theirs, axis=2).sum())
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
