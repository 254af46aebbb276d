"""File digests remembered between starts, for the artifact cache, the model store and the accuracy gate."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from deepliif.imageio import file_sha256, write_json


class HashMemo:
    """sha256 of files, remembered by (path, size, mtime, inode) in a JSON file.

    Weights and artifacts reach 1.5 GB: hashing them at every start cost seconds. A file whose size,
    modification time and inode are unchanged is taken to be unchanged (what make and rsync assume);
    any change of those and it is hashed in full again. Writes are atomic; two processes updating it
    at once can lose an entry, which only costs a rehash later.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, list] = self._read()

    def sha256(self, file: Path) -> str:
        file = Path(file).resolve()
        stamp = _stamp(file)
        with self._lock:
            known = self._entries.get(str(file))
        if known is not None and known[:3] == stamp:
            return known[3]
        digest = file_sha256(file)
        self.record(file, digest, stamp)
        return digest

    def record(self, file: Path, digest: str, stamp: list | None = None) -> None:
        """Remember a digest computed elsewhere (e.g. before the file was renamed into place)."""
        file = Path(file).resolve()
        stamp = stamp or _stamp(file)
        with self._lock:
            self._entries.update(self._read())  # keep what other processes recorded meanwhile
            self._entries[str(file)] = [*stamp, digest]
            try:
                write_json(self.path, self._entries)
            except OSError:
                pass  # a read-only cache still works; it only hashes again next time

    def _read(self) -> dict[str, list]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


def _stamp(file: Path) -> list[int]:
    stat = file.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]
