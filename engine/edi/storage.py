"""Storage volumes a request can read its image from and the kernel writes results, logs and status to.

Two kinds behind one interface: a mounted directory (default, and what local runs use) and Cloud Pak
for Data's volumes REST API. Every path a request names is relative to the volume root and checked
before use: no absolute paths, no `..`, no way out through a symlink. Writes are whole-file and atomic
on a mounted volume (temporary name, then rename), so a reader never sees half a file.
"""
from __future__ import annotations

import logging

import abc
import contextlib
import errno
import json
import os
import posixpath
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deepliif.errors import DeepLIIFError
from deepliif.imageio import write_atomically

logger = logging.getLogger("engine")



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


class MountedVolume(Volume):
    """A directory mounted into the pod (a PVC), or any local directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise StorageError(f"volume root {root} is not a directory")
        self._append_lock = threading.Lock()

    def resolve(self, path: str) -> Path:
        """The real file for `path`, refused when it (or a symlink on the way) leads outside the root."""
        candidate = (self.root / clean_relative_path(path)).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise StorageError(f"{path!r} leads outside the volume (through a symlink)")
        return candidate

    def read_bytes(self, path: str, max_bytes: int) -> bytes:
        target = self.resolve(path)
        if not target.is_file():
            raise NotFoundError(f"{path!r}: no such file on the volume")
        size = target.stat().st_size
        if size > max_bytes:
            raise StorageError(f"{path!r} is {size} bytes, over the limit of {max_bytes}")
        with volume_errors("read", path):
            return target.read_bytes()

    def write_bytes(self, path: str, data: bytes) -> None:
        target = self.resolve(path)
        with volume_errors("write", path):
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, data)

    def exists(self, path: str) -> bool:
        return self.resolve(path).exists()

    def list(self, directory: str) -> list[str]:
        target = self.resolve(directory)
        return sorted(p.name for p in target.iterdir()) if target.is_dir() else []

    def append_text(self, path: str, text: str) -> None:
        target = self.resolve(path)
        with volume_errors("write", path):
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._append_lock, open(target, "a", encoding="utf-8") as handle:  # O_APPEND: whole lines
                handle.write(text)

    def describe(self, path: str) -> str:
        """Volume-relative: the server's own directory layout is nobody's business."""
        return f"volume:{clean_relative_path(path)}"

    def begin_dir(self, final: str) -> str:
        parent, name = posixpath.split(clean_relative_path(final))
        staging = posixpath.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
        with volume_errors("write", final):
            self.resolve(staging).mkdir(parents=True)
        return staging

    def publish_dir(self, staging: str, final: str) -> None:
        """One rename: the whole set appears at once. An older set is moved aside first, then removed."""
        source, target = self.resolve(staging), self.resolve(final)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(target, old)
        os.replace(source, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class CpdSettings:
    """Where and as whom to reach a Cloud Pak for Data volume."""

    url: str  # https://cpd-host
    volume: str
    username: str
    api_key: str
    timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.5
    verify_tls: bool = True


class CpdVolume(Volume):
    """Cloud Pak for Data volumes REST API: GET downloads, PUT (multipart field `upFile`) uploads, a
    bearer token from `POST /icp4d-api/v1/authorize`, refreshed once on 401 and before it expires.
    Transient failures (connection errors, 429, 5xx) are retried with exponential backoff."""

    TOKEN_LIFETIME_S = 3600.0

    def __init__(self, settings: CpdSettings, opener: urllib.request.OpenerDirector | None = None) -> None:
        for name in ("url", "volume", "username", "api_key"):
            if not getattr(settings, name):
                raise StorageError(f"Cloud Pak for Data volume setting {name} is empty")
        self.settings = settings
        self._opener = opener or self._default_opener(settings.verify_tls)
        self._token: str | None = None
        self._token_time = 0.0
        self._token_lock = threading.Lock()
        self._append_lock = threading.Lock()
        self._appended: dict[str, bytes] = {}

    @staticmethod
    def _default_opener(verify_tls: bool) -> urllib.request.OpenerDirector:
        import ssl
        context = ssl.create_default_context()
        if not verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))

    def _file_url(self, path: str) -> str:
        quoted = urllib.parse.quote(clean_relative_path(path), safe="")
        return f"{self.settings.url.rstrip('/')}/zen-volumes/{self.settings.volume}/v1/volumes/files/{quoted}"

    def _authorize(self, force: bool = False) -> str:
        with self._token_lock:
            fresh = time.monotonic() - self._token_time < self.TOKEN_LIFETIME_S * 0.9
            if self._token and fresh and not force:
                return self._token
            body = json.dumps({"username": self.settings.username, "api_key": self.settings.api_key}).encode()
            request = urllib.request.Request(f"{self.settings.url.rstrip('/')}/icp4d-api/v1/authorize", body,
                                             {"Content-Type": "application/json"}, method="POST")
            reply = self._send(request, authorize=False)
            try:
                self._token = json.loads(reply)["token"]
            except (ValueError, KeyError, TypeError) as exc:
                raise StorageError(f"Cloud Pak for Data authorize answered without a token ({exc})") from exc
            self._token_time = time.monotonic()
            return self._token

    def _call(self, method: str, url: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        for attempt in (1, 2):
            request = urllib.request.Request(url, data, dict(headers or {}), method=method)
            request.add_header("Authorization", f"Bearer {self._authorize(force=attempt == 2)}")
            try:
                return self._send(request, authorize=True)
            except _Unauthorized:
                if attempt == 2:
                    raise StorageError(f"Cloud Pak for Data refused the credentials for {method} {url}") from None
        raise AssertionError("unreachable")

    def _send(self, request: urllib.request.Request, authorize: bool) -> bytes:
        """One request with retries on transient failures; 401 surfaces as _Unauthorized."""
        delay = self.settings.backoff_s
        for attempt in range(1, self.settings.retries + 1):
            try:
                with self._opener.open(request, timeout=self.settings.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and authorize:
                    raise _Unauthorized() from None
                if exc.code == 404:
                    raise NotFoundError(f"{request.get_method()} {request.full_url}: not found (404)") from None
                transient = exc.code == 429 or exc.code >= 500
                problem = f"HTTP {exc.code} {exc.reason}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                transient, problem = True, str(getattr(exc, "reason", exc))
            if not transient or attempt == self.settings.retries:
                raise StorageError(f"{request.get_method()} {request.full_url} failed after {attempt} "
                                   f"attempt(s): {problem}")
            logger.warning("%s %s: %s; retrying in %.1f s", request.get_method(), request.full_url, problem, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def read_bytes(self, path: str, max_bytes: int) -> bytes:
        data = self._call("GET", self._file_url(path))
        if len(data) > max_bytes:
            raise StorageError(f"{path!r} is {len(data)} bytes, over the limit of {max_bytes}")
        return data

    def write_bytes(self, path: str, data: bytes) -> None:
        boundary = uuid.uuid4().hex
        name = posixpath.basename(clean_relative_path(path))
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"upFile\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        self._call("PUT", self._file_url(path), body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def exists(self, path: str) -> bool:
        try:
            self._call("GET", self._file_url(path))
        except NotFoundError:
            return False
        return True

    def list(self, directory: str) -> list[str]:
        """File names in a directory. The API answers a directory GET with a JSON listing; both a plain
        list and `{"responseObject": {"directoryContents": [...]}}` are understood."""
        try:
            reply = json.loads(self._call("GET", self._file_url(directory)))
        except NotFoundError:
            return []
        except ValueError as exc:
            raise StorageError(f"{directory!r} is not a directory listing ({exc})") from exc
        entries = reply.get("responseObject", {}).get("directoryContents", []) if isinstance(reply, dict) else reply
        return sorted(e if isinstance(e, str) else str(e.get("name", "")) for e in entries)

    def append_text(self, path: str, text: str) -> None:
        """No append in the API: the file is read once, kept, and written back whole with each addition
        (under a lock; each kernel appends only to its own per-pod log, so the kept copy stays current)."""
        with self._append_lock:
            if path not in self._appended:
                try:
                    self._appended[path] = self.read_bytes(path, 1 << 30)
                except NotFoundError:
                    self._appended[path] = b""
            content = self._appended[path] + text.encode()
            self.write_bytes(path, content)
            self._appended[path] = content

    def describe(self, path: str) -> str:
        return f"cpd://{self.settings.volume}/{clean_relative_path(path)}"


class _Unauthorized(Exception):
    pass


def open_volume(root: str | None, cpd: CpdSettings | None) -> Volume | None:
    """The configured volume: CPD when its settings are given, else the mounted root, else none."""
    if cpd is not None:
        return CpdVolume(cpd)
    return MountedVolume(root) if root else None

