"""The artifact cache: build an exported ONNX or TensorRT plan once, however many kernels start at once.

An entry is a directory named by the hash of everything the artifact depends on (model weights, export
and build settings, device, library versions). It is built in a private staging directory under an
exclusive `flock` on `<key>.lock`, given a manifest with the sha256 of each file, and published by one
atomic rename. Other processes block on the lock, then find the published entry. A process killed
mid-build leaves only a staging directory (never loaded; removed by the next builder) and its lock is
released by the kernel. A published entry whose files no longer match the manifest, or that fails to
load, is rebuilt. File hashes are remembered by size, mtime and inode (`HashMemo`), so a warm start
does not reread a 1.5 GB ONNX; any change of those and the file is hashed in full again.
"""
from __future__ import annotations


import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256, write_json
from deepliif.logs import project_logger
from engine.errors import ArtifactError
from engine.file_hashes import HashMemo

logger = project_logger("engine")


MANIFEST = "artifact.json"
HASH_MEMO = "file-hashes.json"
MODEL_PATH_ENV = "REDHARE_MODEL_PATH"
CACHE_DIR_ENV = "DEEPLIIF_CACHE_DIR"


def default_cache_dir(environment: Mapping[str, str]) -> Path:
    """`DEEPLIIF_CACHE_DIR`; inside WMLA `REDHARE_MODEL_PATH/.engine-cache`; else the user cache dir, as the
    given environment says. Entry points (the CLI, the kernel's settings, Triton's model) pass theirs."""
    if environment.get(CACHE_DIR_ENV):
        return Path(environment[CACHE_DIR_ENV])
    if environment.get(MODEL_PATH_ENV):
        return Path(environment[MODEL_PATH_ENV]) / ".engine-cache"
    base = environment.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepliif-engine"


def cpu_signature() -> str:
    """The machine and its CPU's instruction-set flags, hashed: artifacts optimised for one CPU (ONNX
    Runtime's saved graphs) are reused only on CPUs that offer the same instructions."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def exclusive_lock(path: Path, holder: str) -> Iterator[None]:
    """An exclusive `flock` on `path` for the block: one builder at a time across processes, released by
    the OS if its holder dies. `holder` says in the log who was waited for."""
    with open(path, "a+") as handle:
        start = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        if time.perf_counter() - start > 1:
            logger.info("waited %.1f s for %s", time.perf_counter() - start, holder)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ArtifactCache:
    """`root` None: the user cache dir (entry points resolve DEEPLIIF_CACHE_DIR and WMLA's model path
    with `default_cache_dir` and pass the result)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir({})
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArgumentError(f"cannot create the artifact cache {self.root}: {exc}") from exc
        self.hashes = HashMemo(self.root / HASH_MEMO)  # entries are verified without rereading gigabytes

    def get(self, parts: dict, build: Callable[[Path], None],
            check: Callable[[Path], None] = lambda entry: None, rebuild: bool = False) -> Path:
        """The entry directory for `parts`, building it with `build(staging_dir)` if needed.

        `check(entry)` raises when the published files cannot be used, which makes the entry count as
        corrupt and be rebuilt. `rebuild` replaces the entry whatever it holds (its user failed to load it).
        """
        key = cache_key(parts)
        entry = self.root / key
        if not rebuild and self._usable(entry, check):
            logger.info("artifact cache hit %s", entry)
            return entry
        with self._lock(key):
            if not rebuild and self._usable(entry, check):  # built by another process while this one waited
                logger.info("artifact %s was built by another process", entry)
                return entry
            self._discard(entry, key)
            self._build(entry, key, parts, build)
        check(entry)
        return entry

    def _usable(self, entry: Path, check: Callable[[Path], None]) -> bool:
        manifest = entry / MANIFEST
        if not manifest.is_file():
            return False
        try:
            recorded = json.loads(manifest.read_text())["files"]
            for name, digest in recorded.items():
                if file_sha256(entry / name, self.hashes) != digest:
                    raise ArtifactError(f"{entry / name}: sha256 differs from the manifest")
            check(entry)
        except (OSError, ValueError, KeyError, ArtifactError) as exc:
            logger.warning("artifact %s is stale or corrupt (%s); rebuilding", entry, exc)
            return False
        except Exception as exc:  # a loader's own error type: still a corrupt artifact
            logger.warning("artifact %s fails to load (%s); rebuilding", entry, exc)
            return False
        return True

    def _lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.root / f"{key}.lock", f"another process building artifact {key}")

    def _discard(self, entry: Path, key: str) -> None:
        """Under the lock: remove a bad entry and staging left by builders that died."""
        if entry.exists():
            shutil.rmtree(entry)
        for leftover in self.root.glob(f".build-{key}-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _build(self, entry: Path, key: str, parts: dict, build: Callable[[Path], None]) -> None:
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.root))
        start = time.perf_counter()
        try:
            build(staging)
            files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
            manifest = {"key": key, "parts": parts, "files": files,
                        "build_seconds": round(time.perf_counter() - start, 2), "built_by_pid": os.getpid()}
            write_json(staging / MANIFEST, manifest)
            os.chmod(staging, 0o755)
            os.replace(staging, entry)
            for name, digest in files.items():  # a rename keeps size, mtime and inode: still valid
                self.hashes.record(entry / name, digest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        logger.info("built artifact %s in %.1f s", entry, time.perf_counter() - start)
