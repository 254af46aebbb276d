"""Opening files beneath a volume root without a check-then-open race.

Checking a resolved path and then opening it by name lets a folder be swapped for a symlink in between
(a file outside the volume was copied that way). Here every component is opened relative to its parent's
file descriptor with `O_NOFOLLOW`, so what is opened is what was checked. A symlink met on the way is read
(`readlink` on the parent descriptor), its target is resolved *as a path* against the volume root and
refused if it leaves it, and the walk starts again from the root: what Linux's `openat2(RESOLVE_BENEATH)`
does, which Python does not expose. Links that stay inside the volume keep working.
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
from collections.abc import Iterator

MAX_LINKS = 40  # as the kernel's own limit on symlinks in one lookup
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OutsideVolumeError(Exception):
    """The path (through a symlink) leads outside the volume root."""


class _Restart(Exception):
    def __init__(self, parts: list[str]) -> None:
        self.parts = parts


def split(path: str) -> list[str]:
    return [] if path in ("", ".") else path.split("/")


@contextlib.contextmanager
def parent_dir(root: str, path: str, create: bool = False) -> Iterator[tuple[int, str]]:
    """(descriptor of the directory that holds `path`'s last component, that component's name). With
    `create`, missing directories on the way are made."""
    parts = split(path)
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "the volume root itself", path)
    for _ in range(MAX_LINKS):
        fd = os.open(root, _DIR_FLAGS)
        try:
            fd = _walk_dirs(root, fd, parts[:-1], create)
        except _Restart as restart:
            parts = restart.parts + parts[-1:]  # the link's target, then the rest of the path
            continue
        try:
            yield fd, parts[-1]
            return
        finally:
            os.close(fd)
    raise OSError(errno.ELOOP, "too many symbolic links", path)


def open_beneath(root: str, path: str, flags: int, mode: int = 0o644, create_dirs: bool = False) -> int:
    """A descriptor for `path` opened with `flags` (never following a link it has not checked)."""
    parts = split(path)
    if not parts:
        return os.open(root, flags | os.O_CLOEXEC)
    for _ in range(MAX_LINKS):
        with parent_dir(root, "/".join(parts), create_dirs) as (fd, name):
            try:
                return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
            except OSError as exc:
                if not _is_link(exc, fd, name):
                    raise
                parts = _target(root, fd, name)
    raise OSError(errno.ELOOP, "too many symbolic links", path)


def _walk_dirs(root: str, fd: int, parts: list[str], create: bool) -> int:
    """Descend `parts` from `fd`; the descriptor of the last one (the others closed). A symlink on the
    way raises `_Restart` with the path it stands for (the caller's fd is closed)."""
    for index, part in enumerate(parts):
        try:
            child = _open_dir(fd, part, create)
        except OSError as exc:
            if _is_link(exc, fd, part):
                target = _target(root, fd, part)
                os.close(fd)
                raise _Restart(target + parts[index + 1:]) from None
            os.close(fd)
            raise
        os.close(fd)
        fd = child
    return fd


def _open_dir(fd: int, name: str, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=fd)
        return os.open(name, _DIR_FLAGS, dir_fd=fd)


def _is_link(exc: OSError, fd: int, name: str) -> bool:
    if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return False
    try:
        os.readlink(name, dir_fd=fd)
    except OSError:
        return False
    return True


def _target(root: str, fd: int, name: str) -> list[str]:
    """What the link `name` in directory `fd` stands for, as parts relative to the root; refused when it
    leaves the root. Relative targets are resolved against the link's own directory."""
    target = os.readlink(name, dir_fd=fd)
    here = os.readlink(f"/proc/self/fd/{fd}")  # the directory the link is in, as the kernel sees it now
    joined = posixpath.normpath(posixpath.join(here, target))
    relative = posixpath.relpath(joined, root)
    if relative == ".." or relative.startswith("../") or os.path.isabs(relative):
        raise OutsideVolumeError(name)
    return split(relative)
