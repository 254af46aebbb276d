"""A local EDI endpoint: `POST /dlim/v1/inference/<name>` in front of one kernel, as WMLA would put it.

Any number of clients may connect; their requests queue onto the one kernel (EDI's exclusive GPU mode),
and up to `task_batch_size` waiting requests are handed to it as one call, chained through `next()`, so
the kernel can batch their tiles. Every answer is JSON. Requests the kernel sees are answered with HTTP
200 whatever happened (the EDI contract); a body over the size limit is refused without being kept.
"""
from __future__ import annotations


import json
import queue
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..kernel.answers import error_json
from ..kernel.settings import DEFAULT_MAX_REQUEST_MB, DEFAULT_TASK_BATCH_SIZE
from .tasks import KernelCallbacks, chain_tasks, start_kernel
from deepliif.logs import project_logger

logger = project_logger("engine")

API_PREFIX = "/dlim/v1/inference/"
DEFAULT_MAX_BODY = DEFAULT_MAX_REQUEST_MB << 20  # one limit for the endpoint and the kernel's reads
LISTEN_BACKLOG = 256
CLIENT_TIMEOUT_S = 30.0


class KernelDispatcher:
    """Feeds queued request bodies to the kernel, up to `task_batch_size` per call, one call at a time."""

    def __init__(self, kernel: KernelCallbacks, task_batch_size: int = DEFAULT_TASK_BATCH_SIZE) -> None:
        self.kernel = kernel
        self.task_batch_size = max(1, task_batch_size)
        self._pending: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="edi-dispatcher", daemon=True)
        self._thread.start()

    def submit(self, body: bytes) -> Future:
        future: Future = Future()
        self._pending.put((body, future))
        return future

    def close(self) -> None:
        self._pending.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while (first := self._pending.get()) is not None:
            batch = [first]
            while len(batch) < self.task_batch_size:
                try:
                    item = self._pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._pending.put(None)
                    break
                batch.append(item)
            self._invoke(batch)

    def _invoke(self, batch: list[tuple[bytes, Future]]) -> None:
        tasks = chain_tasks([body for body, _ in batch])
        try:
            self.kernel.on_task_invoke(tasks[0])
        except Exception as exc:  # noqa: BLE001 - a kernel bug answers these requests, not the server
            logger.exception("on_task_invoke raised")
            for task in tasks:
                task.output = task.output or error_json(f"kernel failed: {type(exc).__name__}: {exc}")
        for task, (_, future) in zip(tasks, batch):
            future.set_result(task.output if task.output is not None else error_json("kernel set no output"))


class EdiHandler(BaseHTTPRequestHandler):
    server: EdiHttpServer
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT_S  # a client that stops sending (half a request, a short body) is let go

    def setup(self) -> None:
        self.timeout = self.server.client_timeout
        super().setup()

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        if self.path.rstrip("/") != self.server.endpoint:
            return self._reply(HTTPStatus.NOT_FOUND, error_json(f"no such endpoint {self.path}; use "
                                                                 f"POST {self.server.endpoint}"))
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            return self._reply(HTTPStatus.LENGTH_REQUIRED, error_json(
                f"Content-Length must be a non-negative integer; got {length or 'none'}"))
        if int(length) > self.server.max_body:
            self._discard(int(length))  # not kept: read in chunks so the client can hear the answer
            self.close_connection = True
            return self._reply(HTTPStatus.OK, error_json(f"request body is {length} bytes, over the limit of "
                                                          f"{self.server.max_body}; send a path on the volume "
                                                          "(img_path_on_pvc) for large images"))
        body = self._read_body(int(length))
        if len(body) < int(length):
            self.close_connection = True
            return self._reply(HTTPStatus.REQUEST_TIMEOUT, error_json(
                f"the body ended after {len(body)} of {length} bytes (nothing more within "
                f"{self.server.client_timeout:g} s)"))
        self._reply(HTTPStatus.OK, self.server.dispatcher.submit(body).result())

    def _read_body(self, length: int) -> bytes:
        """Up to `length` bytes; fewer when the client stops sending for `client_timeout` seconds."""
        parts, received = [], 0
        try:
            while received < length:
                chunk = self.rfile.read1(min(length - received, 1 << 20))
                if not chunk:
                    break
                parts.append(chunk)
                received += len(chunk)
        except TimeoutError:
            pass
        return b"".join(parts)

    def _discard(self, length: int, chunk: int = 1 << 20) -> None:
        while length > 0:
            read = self.rfile.read(min(chunk, length))
            if not read:
                return
            length -= len(read)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != self.server.endpoint:
            return self._reply(HTTPStatus.NOT_FOUND, error_json(f"no such endpoint {self.path}"))
        self._reply(HTTPStatus.OK, json.dumps({"name": self.server.name, "status": "ready"}))

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, error_json(f"{self.command} is not served; use "
                                                               f"POST {self.server.endpoint}"))

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed  # noqa: N815

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unknown method) as JSON, not HTML."""
        self.close_connection = True
        # a request line http.server cannot parse leaves it on HTTP/0.9, which sends a body with no status
        # line or headers: answer such a client as HTTP/1.1, like every other
        self.request_version = "HTTP/1.1" if self.request_version == "HTTP/0.9" else self.request_version
        try:
            self._reply(HTTPStatus(code), error_json(f"HTTP {code}: {message or HTTPStatus(code).phrase}"))
        except OSError:
            pass  # the client is gone

    def _reply(self, status: HTTPStatus, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the http.server API
        logger.debug("http %s", format % args)


class EdiHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG  # socketserver's default of 5 reset a third of a 60-connection burst

    def __init__(self, address: tuple[str, int], dispatcher: KernelDispatcher, name: str,
                 max_body: int = DEFAULT_MAX_BODY, client_timeout: float = CLIENT_TIMEOUT_S) -> None:
        super().__init__(address, EdiHandler)
        self.client_timeout = client_timeout
        self.dispatcher = dispatcher
        self.name = name
        self.endpoint = API_PREFIX + name
        self.max_body = max_body

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{self.endpoint}"


def serve_kernel(kernel: KernelCallbacks, model_description: str, host: str = "127.0.0.1", port: int = 8000,
                 name: str | None = None, max_body: int = DEFAULT_MAX_BODY,
                 task_batch_size: int = DEFAULT_TASK_BATCH_SIZE,
                 ready: threading.Event | None = None, stop: threading.Event | None = None,
                 environment: Mapping[str, str] | None = None) -> None:
    """Start the kernel with `environment` as its settings (None: the process environment), serve until
    `stop` is set (or Ctrl-C, SIGTERM), then shut the kernel down."""
    record = json.loads(model_description or "{}")
    stop = _stop_on_sigterm(stop)
    start_kernel(kernel, model_description, environment)
    dispatcher = KernelDispatcher(kernel, task_batch_size)
    try:
        serve_dispatcher(dispatcher, name or record.get("name", "deepliif"), host, port, max_body, ready, stop)
    finally:
        kernel.on_kernel_shutdown()


def serve_dispatcher(dispatcher, name: str, host: str, port: int, max_body: int = DEFAULT_MAX_BODY,
                     ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """The endpoint in front of anything with `submit(body) -> Future` and `close()` (one kernel, or a pool
    of kernel processes), until `stop` is set or Ctrl-C; then the dispatcher is closed."""
    stop = _stop_on_sigterm(stop)
    try:
        server = EdiHttpServer((host, port), dispatcher, name, max_body)
    except BaseException:
        dispatcher.close()
        raise
    logger.info("EDI endpoint ready: POST %s", server.url)
    thread = threading.Thread(target=server.serve_forever, name="edi-http", daemon=True)
    thread.start()
    if ready is not None:
        ready.server = server  # type: ignore[attr-defined]
        ready.set()
    try:
        while not stop.wait(0.5):  # a timed wait: signal handlers run promptly in this (main) thread
            pass
    except KeyboardInterrupt:
        logger.info("interrupted")
    finally:
        server.shutdown()
        server.server_close()
        dispatcher.close()


def _stop_on_sigterm(stop: threading.Event | None) -> threading.Event:
    """SIGTERM (Kubernetes, WMLA) takes the same way out as Ctrl-C: stop serving, shut down."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    return stop
