"""Storage volumes a request can read its image from and the kernel writes results, logs and status to.

Two kinds behind one interface: a mounted directory (default, and what local runs use) and Cloud Pak
for Data's volumes REST API. Every path a request names is relative to the volume root and checked
before use: no absolute paths, no `..`, no way out through a symlink. Writes are whole-file and atomic
on a mounted volume (temporary name, then rename), so a reader never sees half a file.
"""
from __future__ import annotations

from .cpd import CpdSettings, CpdVolume
from .mounted import MountedVolume
from .volume import PARTIAL, NotFoundError, StorageError, Volume, clean_relative_path, volume_errors

__all__ = ["PARTIAL", "CpdSettings", "CpdVolume", "MountedVolume", "NotFoundError", "StorageError", "Volume",
           "clean_relative_path", "open_volume", "volume_errors"]


def open_volume(root: str | None, cpd: CpdSettings | None) -> Volume | None:
    """The configured volume: CPD when its settings are given, else the mounted root, else none."""
    if cpd is not None:
        return CpdVolume(cpd)
    return MountedVolume(root) if root else None
