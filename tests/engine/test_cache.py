from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cache import MANIFEST, ArtifactCache, cache_key, default_cache_dir

ROOT = Path(__file__).resolve().parents[2]

# A builder process: slow build, records each build in builds.log, prints the entry it got.
BUILDER = """
import sys, time, os
from pathlib import Path
from engine.cache import ArtifactCache
root, mode = Path(sys.argv[1]), sys.argv[2]
def build(staging):
    with open(root.parent / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\\n")
    (staging / "artifact.bin").write_bytes(b"half")
    if mode == "hang":
        (root.parent / "started").write_text("yes")
        time.sleep(60)
    time.sleep(1.0)
    (staging / "artifact.bin").write_bytes(b"complete artifact")
entry = ArtifactCache(root).get({"model": "m", "settings": 1}, build)
print(entry, (entry / "artifact.bin").read_bytes().decode())
"""


def _spawn(root: Path, mode: str = "normal") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(root), mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_four_processes_on_an_empty_cache_build_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    processes = [_spawn(root) for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [o[1] for o in outputs]
    lines = {o[0].strip() for o in outputs}
    assert len(lines) == 1 and lines.pop().endswith("complete artifact")
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert not list(root.glob(".build-*"))


def test_a_build_killed_midway_leaves_nothing_that_loads(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    victim = _spawn(root, "hang")
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    key = cache_key({"model": "m", "settings": 1})
    assert not (root / key).exists() and list(root.glob(f".build-{key}-*"))  # only private staging
    survivor = _spawn(root)
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err
    assert out.strip().endswith("complete artifact")
    assert len((tmp_path / "builds.log").read_text().split()) == 2
    assert not list(root.glob(".build-*"))  # the dead builder's staging was cleaned up


def test_corrupt_or_unloadable_entries_are_rebuilt(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    builds = []

    def build(staging: Path) -> None:
        builds.append(staging)
        (staging / "a.bin").write_bytes(b"good")

    entry = cache.get({"k": 1}, build)
    assert cache.get({"k": 1}, build) == entry and len(builds) == 1
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["parts"] == {"k": 1} and set(manifest["files"]) == {"a.bin"}
    (entry / "a.bin").write_bytes(b"flipped bits")
    assert (cache.get({"k": 1}, build) / "a.bin").read_bytes() == b"good" and len(builds) == 2

    def refuse(path: Path) -> None:  # the entry from build 2 fails to load, e.g. a plan TensorRT rejects
        if len(builds) == 2:
            raise RuntimeError("loader says no")

    cache.get({"k": 1}, build, check=refuse)
    assert len(builds) == 3
    assert cache.get({"k": 2}, build) != entry  # other settings, other entry


def test_failed_build_publishes_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)

    def broken(staging: Path) -> None:
        (staging / "x").write_bytes(b"partial")
        raise ValueError("exporter crashed")

    with pytest.raises(ValueError, match="crashed"):
        cache.get({"k": 1}, broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """From the environment it is given, never the process's own (entry points pass theirs)."""
    assert default_cache_dir({"REDHARE_MODEL_PATH": str(tmp_path)}) == tmp_path / ".engine-cache"
    assert default_cache_dir({"REDHARE_MODEL_PATH": str(tmp_path), "DEEPLIIF_CACHE_DIR": str(tmp_path / "x")}) \
        == tmp_path / "x"
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "deepliif-engine"
    monkeypatch.setenv("DEEPLIIF_CACHE_DIR", str(tmp_path / "from-process"))
    assert default_cache_dir({}) == Path.home() / ".cache" / "deepliif-engine"