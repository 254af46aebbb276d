"""A storage volume mounted into the pod (a PVC) or any local directory."""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from .beneath import OutsideVolumeError, open_beneath, parent_dir
from .volume import PARTIAL, NotFoundError, StorageError, Volume, clean_relative_path, volume_errors


class MountedVolume(Volume):
    """A directory mounted into the pod (a PVC), or any local directory. Every file is opened beneath the
    root component by component without following links it has not checked (`beneath`), so a folder
    swapped for a symlink mid-request cannot lead outside."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise StorageError(f"volume root {root} is not a directory")
        self._append_lock = threading.Lock()

    def resolve(self, path: str) -> Path:
        """Where `path` is on this machine (for logs and tests; I/O goes through `_open`)."""
        return self.root / clean_relative_path(path)

    @contextlib.contextmanager
    def _errors(self, action: str, path: str) -> Iterator[None]:
        try:
            with volume_errors(action, path):
                yield
        except OutsideVolumeError:
            raise StorageError(f"{path!r} leads outside the volume (through a symlink)") from None

    def _open(self, path: str, flags: int, create_dirs: bool = False) -> int:
        return open_beneath(str(self.root), clean_relative_path(path), flags, create_dirs=create_dirs)

    def _open_existing(self, path: str) -> int:
        """A read descriptor for a file that must exist (NotFoundError names the path otherwise)."""
        with self._errors("read", path):
            try:
                return self._open(path, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise NotFoundError(f"{path!r}: no such file on the volume") from None

    def read_bytes(self, path: str, max_bytes: int) -> bytes:
        fd = self._open_existing(path)
        with self._errors("read", path):
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                raise NotFoundError(f"{path!r}: no such file on the volume")
            with os.fdopen(fd, "rb") as handle:
                if info.st_size > max_bytes:
                    raise StorageError(f"{path!r} is {info.st_size} bytes, over the limit of {max_bytes}")
                return handle.read(max_bytes + 1)

    @contextlib.contextmanager
    def local_file(self, path: str) -> Iterator[Path]:
        """The file opened beneath the root, named through its descriptor (`/proc/self/fd/N`), so a reader
        that opens by name gets exactly the file that was checked."""
        fd = self._open_existing(path)
        try:
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    def fetch_file(self, path: str, target: Path, max_bytes: int) -> None:
        """Streamed through the race-free open, not held in memory (generators are hundreds of MB)."""
        with self.local_file(path) as local, self._errors("read", path):
            shutil.copyfile(local, target)

    def local_dir(self, path: str) -> Path:
        """A staging folder this kernel made (`begin_dir`), as a local directory."""
        return self.resolve(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """A temporary name in the same folder, then one rename (which replaces a link, never follows it)."""
        with self._errors("write", path), parent_dir(str(self.root), clean_relative_path(path), True) as (fd, name):
            temporary = f".{name}.{uuid.uuid4().hex[:12]}.tmp"
            try:
                _write_new(fd, temporary, data)
                os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=fd)
                raise

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Written whole under a temporary name, then hard-linked to `path`: the link fails if `path`
        exists, and a reader never sees the file empty or half-written."""
        with self._errors("write", path), parent_dir(str(self.root), clean_relative_path(path), True) as (fd, name):
            temporary = f".{name}.{uuid.uuid4().hex[:12]}.tmp"
            _write_new(fd, temporary, data)
            try:
                os.link(temporary, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary, dir_fd=fd)
            return True

    def exists(self, path: str) -> bool:
        with self._errors("read", path):
            try:
                os.close(self._open(path, os.O_RDONLY))
            except (FileNotFoundError, NotADirectoryError):
                return False
            return True

    def list(self, directory: str) -> list[str]:
        with self._errors("read", directory):
            try:
                fd = self._open(directory, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                return []
            try:
                return sorted(os.listdir(fd))
            finally:
                os.close(fd)

    def append_text(self, path: str, text: str) -> None:
        with self._errors("write", path), self._append_lock:  # O_APPEND: whole lines
            fd = self._open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, create_dirs=True)
            with os.fdopen(fd, "a", encoding="utf-8") as handle:
                handle.write(text)

    def describe(self, path: str) -> str:
        """Volume-relative: the server's own directory layout is nobody's business."""
        return f"volume:{clean_relative_path(path)}"

    def begin_dir(self, final: str) -> str:
        parent, name = posixpath.split(clean_relative_path(final))
        staging = posixpath.join(parent, f".{name}{PARTIAL}{uuid.uuid4().hex[:12]}")
        with self._errors("write", final), parent_dir(str(self.root), staging, True) as (fd, staging_name):
            os.mkdir(staging_name, 0o755, dir_fd=fd)
        return staging

    def publish_dir(self, staging: str, final: str) -> None:
        """One rename: the whole set appears at once. An older set is moved aside first, then removed."""
        staging_name = posixpath.basename(clean_relative_path(staging))
        with self._errors("write", final), parent_dir(str(self.root), clean_relative_path(final)) as (fd, name):
            old = None
            with contextlib.suppress(FileNotFoundError):
                old = f".{name}.old-{uuid.uuid4().hex[:12]}"
                os.replace(name, old, src_dir_fd=fd, dst_dir_fd=fd)
            os.replace(staging_name, name, src_dir_fd=fd, dst_dir_fd=fd)
            if old is not None:
                shutil.rmtree(old, dir_fd=fd, ignore_errors=True)

    def remove_leftovers(self, directory: str) -> list[str]:
        """Staging and replaced folders a killed or failed writer left in `directory` (never published)."""
        removed = []
        with self._errors("write", directory):
            for name in self.list(directory):
                if PARTIAL in name or ".old-" in name:
                    with parent_dir(str(self.root), f"{clean_relative_path(directory)}/{name}") as (fd, leaf):
                        shutil.rmtree(leaf, dir_fd=fd, ignore_errors=True)
                    removed.append(name)
        return removed


def _write_new(directory: int, name: str, data: bytes) -> None:
    """A new file `name` in the open `directory` (never through a link), holding `data`."""
    handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=directory)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
