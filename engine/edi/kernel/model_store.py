"""A model kept on the storage volume and fetched once per deployment when kernels start.

WMLA limits the size of a submission and its guide says to fetch large weights from inside the kernel, so
the submission carries code only and the 1.5 GB of generators live on the volume beside a manifest of
sha256s (`upload_model`). A starting kernel fetches them into `$REDHARE_MODEL_PATH/<weight_path>` under
the same discipline as the artifact cache: an exclusive `flock`, a private staging folder, every file
checked against the manifest, one atomic rename. Kernels that start together fetch once; the others
wait on the lock and find the model in place. A fetch killed midway leaves only a staging folder, which
nothing loads and the next fetcher removes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256, write_json
from deepliif.logs import project_logger
from engine.errors import ArtifactError
from engine.file_hashes import HashMemo

from ...cache import exclusive_lock
from .volume import StorageError, Volume, clean_relative_path

logger = project_logger("engine")

MANIFEST = "model-manifest.json"   # on the volume, beside the model's files; written last by an upload
FETCHED = ".fetched-from.json"     # in a fetched model folder: the manifest it was checked against
VOLUME_PREFIX = "volume:"
MAX_FILE_BYTES = 8 << 30


@dataclass(frozen=True)
class ModelSource:
    """Where a kernel takes its model from: a folder on the storage volume, or a local folder."""
    volume_path: str | None = None
    local_path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSource:
        """`volume:<path relative to the volume root>` or an absolute local path."""
        if text.startswith(VOLUME_PREFIX):
            return cls(volume_path=clean_relative_path(text[len(VOLUME_PREFIX):], "DEEPLIIF_MODEL_SOURCE"))
        if not os.path.isabs(text):
            raise ArgumentError(f"DEEPLIIF_MODEL_SOURCE must be volume:<path on the storage volume> or an absolute "
                                f"local path; got {text!r}")
        return cls(local_path=Path(text))

    def describe(self) -> str:
        return f"{VOLUME_PREFIX}{self.volume_path}" if self.volume_path is not None else str(self.local_path)


def model_files(model_dir: Path) -> list[str]:
    """Every regular file under the model folder, as sorted relative POSIX paths (dot-files left out)."""
    root = Path(model_dir)
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(n for n in names if not any(part.startswith(".") for part in n.split("/")))


def model_manifest(model_dir: Path) -> dict:
    files = {name: {"sha256": file_sha256(Path(model_dir) / name), "size": (Path(model_dir) / name).stat().st_size}
             for name in model_files(model_dir)}
    if not files:
        raise ArgumentError(f"{model_dir} holds no files to upload")
    return {"format": 1, "files": files, "total_bytes": sum(f["size"] for f in files.values())}


def upload_model(model_dir: Path, volume: Volume, destination: str) -> dict:
    """Put a model folder and its manifest on the volume. The manifest goes last, so a folder whose upload
    was cut short has none and no kernel fetches it; re-uploading replaces file by file."""
    from deepliif.model_dir import load_model_dir  # torch: refuse a broken model before it is shipped
    load_model_dir(model_dir)
    destination = clean_relative_path(destination, "--to")
    manifest = model_manifest(model_dir)
    for name in manifest["files"]:
        volume.write_bytes(f"{destination}/{name}", (Path(model_dir) / name).read_bytes())
    volume.write_bytes(f"{destination}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    logger.info("uploaded %d files (%.1f MB) to %s", len(manifest["files"]), manifest["total_bytes"] / 1e6,
                volume.describe(destination))
    return manifest


class ModelFetcher:
    """Fetches a model from its source into `target` once, however many kernels start at once."""

    def __init__(self, source: ModelSource, target: Path, volume: Volume | None) -> None:
        if source.volume_path is not None and volume is None:
            raise ArgumentError(f"DEEPLIIF_MODEL_SOURCE {source.describe()} names the storage volume, but no "
                                "volume is configured (DEEPLIIF_VOLUME_ROOT or the DEEPLIIF_CPD_* settings)")
        self.source, self.target, self.volume = source, Path(target), volume
        self.hashes = HashMemo(self.target.parent / f".{self.target.name}.hashes.json")

    def fetch(self) -> Path:
        """The model folder, fetched if it is missing or was fetched from another manifest."""
        self.target.parent.mkdir(parents=True, exist_ok=True)
        manifest = self._source_manifest()
        if self._in_place(manifest):
            logger.info("model already fetched from %s into %s", self.source.describe(), self.target)
            return self.target
        lock = self.target.parent / f".{self.target.name}.fetch.lock"
        with exclusive_lock(lock, "another kernel fetching the model"):
            if self._in_place(manifest):
                logger.info("model fetched by another kernel from %s into %s", self.source.describe(), self.target)
                return self.target
            self._replace_with_fetch(manifest)
        return self.target

    def _source_manifest(self) -> dict:
        try:
            manifest = json.loads(self._read(MANIFEST, 1 << 20))
            files = manifest["files"]
            if not files or not all({"sha256", "size"} <= set(v) for v in files.values()):
                raise ValueError("no files, or a file without sha256 and size")
            for name in files:
                clean_relative_path(name, "a manifest entry")
        except (ValueError, KeyError, TypeError, AttributeError, StorageError) as exc:
            raise ArtifactError(f"{self.source.describe()} has no usable {MANIFEST} ({exc}); upload the model "
                                "with `deepliif-engine upload-model`") from exc
        return manifest

    def _in_place(self, manifest: dict) -> bool:
        """The target holds this manifest's files: its record agrees and each file's hash matches (the
        hashes are remembered by size, mtime and inode, so a warm start does not reread gigabytes)."""
        marker = self.target / FETCHED
        if not marker.is_file():
            if self.target.exists() and any(self.target.iterdir()):
                raise ArgumentError(f"{self.target} holds a model that was not fetched (shipped in the submission?) "
                                    f"and DEEPLIIF_MODEL_SOURCE is {self.source.describe()}: keep one of the two")
            return False
        try:
            if json.loads(marker.read_text())["files"] != manifest["files"]:
                return False
            return all(file_sha256(self.target / name, self.hashes) == entry["sha256"]
                       for name, entry in manifest["files"].items())
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("the fetched model in %s is damaged (%s); fetching it again", self.target, exc)
            return False

    def _replace_with_fetch(self, manifest: dict) -> None:
        for leftover in self.target.parent.glob(f".{self.target.name}.fetch-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # from fetchers that died
        staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.fetch-", dir=self.target.parent))
        start = time.perf_counter()
        try:
            for name, entry in manifest["files"].items():
                self._fetch_file(name, entry, staging / name)
            write_json(staging / FETCHED, {**manifest, "source": self.source.describe()})
            os.chmod(staging, 0o755)
            retired = None
            if self.target.exists():  # a model fetched from an older manifest
                retired = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.fetch-old-", dir=self.target.parent))
                os.replace(self.target, retired / "model")
            os.replace(staging, self.target)
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
            for name, entry in manifest["files"].items():  # a rename keeps size, mtime and inode
                self.hashes.record(self.target / name, entry["sha256"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("fetched model from %s into %s: %d files, %.1f MB in %.1f s", self.source.describe(), self.target,
                    len(manifest["files"]), sum(e["size"] for e in manifest["files"].values()) / 1e6,
                    time.perf_counter() - start)

    def _fetch_file(self, name: str, entry: dict, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        if self.source.volume_path is not None:
            self.volume.fetch_file(f"{self.source.volume_path}/{name}", local, MAX_FILE_BYTES)
        else:
            try:
                shutil.copyfile(self.source.local_path / name, local)
            except OSError as exc:
                raise ArtifactError(f"cannot copy {name} from {self.source.describe()}: {exc}") from exc
        size, digest = local.stat().st_size, file_sha256(local)
        if size != entry["size"] or digest != entry["sha256"]:
            raise ArtifactError(f"{name} from {self.source.describe()} does not match {MANIFEST} (size {size} vs "
                                f"{entry['size']}, sha256 {digest[:12]} vs {entry['sha256'][:12]}); upload it again")

    def _read(self, name: str, max_bytes: int) -> bytes:
        if self.source.volume_path is not None:
            return self.volume.read_bytes(f"{self.source.volume_path}/{name}", max_bytes)
        try:
            return (self.source.local_path / name).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {self.source.local_path / name}: {exc.strerror}") from exc
