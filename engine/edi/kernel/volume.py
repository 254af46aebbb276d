"""What every storage volume is: files addressed by relative POSIX paths, checked before use (no absolute
paths, no `..`), and errors in the volume's own terms."""
from __future__ import annotations

import abc
import contextlib
import errno
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path

from deepliif.errors import DeepLIIFError

PARTIAL = ".partial-"  # in the name of a folder being written; never read as a result


class StorageError(DeepLIIFError):
    """A volume path is unsafe or missing, or the volume cannot be read or written."""


class NotFoundError(StorageError):
    """The path names no file on the volume."""


def clean_relative_path(path: object, what: str = "path") -> str:
    """A request's path as a normalised relative POSIX path, or StorageError saying what is wrong."""
    if not isinstance(path, str) or not path.strip():
        raise StorageError(f"{what} must be a non-empty string relative to the volume root; got {path!r}")
    if "\x00" in path or "\\" in path:
        raise StorageError(f"{what} contains a NUL or backslash: {path!r}")
    if path.startswith("/") or re.match(r"[A-Za-z]:/", path):  # POSIX root or a Windows drive (a:b.png is a name)
        raise StorageError(f"{what} must be relative to the volume root, not absolute: {path!r}")
    parts = path.split("/")
    if ".." in parts:
        raise StorageError(f"{what} must not contain '..': {path!r}")
    return posixpath.normpath(path)


_ERRNO_MEANING = {errno.ENOSPC: "the volume is full", errno.EDQUOT: "the volume's quota is used up",
                  errno.EROFS: "the volume is read-only", errno.EACCES: "permission denied on the volume",
                  errno.EPERM: "permission denied on the volume"}


@contextlib.contextmanager
def volume_errors(action: str, path: str) -> Iterator[None]:
    """An OSError as a StorageError that says what failed in the volume's terms (no server paths)."""
    try:
        yield
    except OSError as exc:
        meaning = _ERRNO_MEANING.get(exc.errno, exc.strerror or type(exc).__name__)
        raise StorageError(f"cannot {action} {path!r}: {meaning}") from exc


class Volume(abc.ABC):
    """Files addressed by relative POSIX paths."""

    @abc.abstractmethod
    def read_bytes(self, path: str, max_bytes: int) -> bytes: ...

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def list(self, directory: str) -> list[str]: ...

    @abc.abstractmethod
    def append_text(self, path: str, text: str) -> None: ...

    def describe(self, path: str) -> str:
        return path

    def begin_dir(self, final: str) -> str:
        """Where to write a set of files that must appear together under `final`."""
        return final

    def publish_dir(self, staging: str, final: str) -> None:
        """Make the set written under `staging` appear as `final` (replacing an older one)."""

    def local_file(self, path: str) -> contextlib.AbstractContextManager[Path]:
        """A context giving a local path to read `path` through (whole slides are read region by region,
        not downloaded); only a mounted volume has one."""
        raise StorageError(f"{path!r}: whole slides need a mounted volume (DEEPLIIF_VOLUME_ROOT); this volume is "
                           "read over REST")

    def fetch_file(self, path: str, target: Path, max_bytes: int) -> None:
        """Copy a file of the volume to a local path (a model's weights at kernel start)."""
        Path(target).write_bytes(self.read_bytes(path, max_bytes))

    def local_dir(self, path: str) -> Path:
        """A local directory to write the files of a staging folder into."""
        raise StorageError(f"{path!r}: writing whole-slide outputs needs a mounted volume (DEEPLIIF_VOLUME_ROOT)")

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write `path` only if it does not exist; False if it did. Atomic where the volume offers an
        exclusive create (a mounted volume); elsewhere a check, then a write."""
        if self.exists(path):
            return False
        self.write_bytes(path, data)
        return True

    def remove_leftovers(self, directory: str) -> list[str]:
        """Remove what interrupted writers left in `directory`; the names removed."""
        return []
