"""A Cloud Pak for Data volume through its REST API."""
from __future__ import annotations

import json
import posixpath
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

from .tls import tls_context
from .volume import NotFoundError, StorageError, Volume, clean_relative_path
from deepliif.logs import project_logger

logger = project_logger("engine")


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
        return urllib.request.build_opener(urllib.request.HTTPSHandler(context=tls_context(verify_tls)))

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
