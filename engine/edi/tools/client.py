"""A client of an EDI endpoint (the local `serve`, or WMLA's `/dlim/v1/inference/<name>`) that rides out
a restarting server: connection errors, 429, 5xx and 504 are retried with exponential backoff for up to
`retry_for_s`; a refused token or a wrong URL stops at once, since no retry can fix it."""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request

from deepliif.errors import DeepLIIFError
from deepliif.logs import project_logger

from ..kernel.tls import tls_context

logger = project_logger("engine")

RETRY_STATUSES = {429, 500, 502, 503, 504}
FATAL_STATUSES = {401, 403, 404, 405}


class EndpointUnavailableError(DeepLIIFError):
    """The endpoint did not answer (or answered only 429/5xx) for the whole retry window."""


class EndpointRefusedError(DeepLIIFError):
    """The endpoint refuses every request (bad token, wrong URL): nothing is worth retrying."""


class EdiClient:
    def __init__(self, url: str, token: str | None = None, verify_tls: bool = True, retry_for_s: float = 300.0,
                 timeout_s: float = 120.0, first_backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise DeepLIIFError(f"the endpoint must be an http(s) URL; got {url!r}")
        self.url, self.token = url, token
        self.retry_for_s, self.timeout_s = retry_for_s, timeout_s
        self.first_backoff_s, self.max_backoff_s = first_backoff_s, max_backoff_s
        self.stop = threading.Event()  # set: waiting between retries ends at once (Ctrl-C)
        self.context = tls_context(verify_tls)

    def status(self, request_id: str) -> dict:
        return self.post({"type": "status", "request_id": request_id})

    def post(self, body: dict) -> dict:
        """The endpoint's JSON answer, after as many retries as the window allows."""
        data = json.dumps(body).encode()
        deadline, delay = time.monotonic() + self.retry_for_s, self.first_backoff_s
        while True:
            problem = self._attempt(data)
            if isinstance(problem, dict):
                return problem
            if time.monotonic() + delay > deadline:
                raise EndpointUnavailableError(f"{self.url} did not answer for {self.retry_for_s:g} s: {problem}")
            logger.info("%s: %s; retrying in %.1f s", self.url, problem, delay)
            if self.stop.wait(delay * random.uniform(0.8, 1.2)):  # jitter: clients of a restart do not align
                raise EndpointUnavailableError(f"stopped while waiting for {self.url}: {problem}")
            delay = min(2 * delay, self.max_backoff_s)

    def _attempt(self, data: bytes) -> dict | str:
        """The answer, or what went wrong in a way worth retrying."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in RETRY_STATUSES:
                return f"HTTP {exc.code}"
            detail = exc.read()[:500].decode(errors="replace")
            if exc.code in FATAL_STATUSES:
                raise EndpointRefusedError(f"{self.url} answered HTTP {exc.code}: {detail}") from exc
            return _json(detail) if detail.startswith("{") else {"status": "error", "msg": f"HTTP {exc.code}: {detail}"}
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        return _json(text)


def _json(text: bytes | str) -> dict:
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return {"status": "error", "msg": f"the endpoint answered something other than a JSON object: {text[:200]!r}"}
    return answer
