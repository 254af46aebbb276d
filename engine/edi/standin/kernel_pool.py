"""`serve --kernels N`: N kernel processes behind one local endpoint, as EDI runs several kernels.

Each kernel is its own `serve` process on a loopback port, pinned to its own GPU when there are several
(`CUDA_VISIBLE_DEVICES`), with its own pod name; all of them share the volume, the async status records,
the artifact cache and `$REDHARE_MODEL_PATH` (so they fetch the model and build the engine once between
them). The endpoint hands each request to the kernel with the fewest requests in flight; a status request
can go to any of them. A kernel that dies is started again; its requests in flight are answered
`retry: true`, and what it had accepted is settled by its successor. Kernels die with this process
(`PR_SET_PDEATHSIG`), so a killed server leaves none behind.
"""
from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deepliif.errors import DeepLIIFError
from deepliif.logs import project_logger

from ..kernel.answers import error_json, request_id_in

logger = project_logger("engine")

START_TIMEOUT_S = 900.0
FORWARD_TIMEOUT_S = 3600.0
PR_SET_PDEATHSIG = 1  # prctl(2)


class KernelStartError(DeepLIIFError):
    """A kernel process exited or did not answer before it was ready."""


def visible_gpus(environ: dict[str, str]) -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the pool's process dies, however it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick); the kernel binds it a moment later."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class KernelProcess:
    index: int
    argv: list[str]
    environment: dict[str, str]
    cwd: Path
    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen | None = None
    in_flight: int = 0
    last_picked: int = 0
    restarts: int = 0
    log_path: Path | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def start(self, log_dir: Path) -> None:
        self.port = free_port(self.host)
        self.ready.clear()
        self.log_path = log_dir / f"kernel-{self.index}.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([*self.argv, "--host", self.host, "--port", str(self.port)],
                                            env=self.environment, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=_die_with_parent)
        logger.info("kernel %d starting: pid %d, port %d, %s", self.index, self.process.pid, self.port,
                    ", ".join(f"{k}={self.environment[k]}" for k in ("MSD_POD_NAME", "CUDA_VISIBLE_DEVICES")
                              if k in self.environment))

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise KernelStartError(f"kernel {self.index} exited with code {self.process.returncode} while "
                                       f"starting:\n{self.log_tail()}")
            connection = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                connection.request("GET", path)
                if connection.getresponse().status == 200:
                    self.ready.set()
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.3)
        raise KernelStartError(f"kernel {self.index} was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return "(no log)"

    def forward(self, path: str, body: bytes) -> str:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=FORWARD_TIMEOUT_S)
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait_or_kill(self, grace_s: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class KernelPool:
    """What the endpoint hands request bodies to (`submit`), like the single-kernel dispatcher."""

    def __init__(self, count: int, argv: list[str], environment: dict[str, str], name: str, log_dir: Path,
                 cwd: Path, grace_s: float = 30.0) -> None:
        if count < 1:
            raise DeepLIIFError(f"--kernels must be at least 1; got {count}")
        self.path = f"/dlim/v1/inference/{name}"
        self.grace_s, self.log_dir = grace_s, Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        gpus = visible_gpus(environment)
        pod = environment.get("MSD_POD_NAME") or socket.gethostname()
        self.kernels = []
        for index in range(count):
            env = {**environment, "MSD_POD_NAME": f"{pod}-k{index}"}
            if len(gpus) > 1:
                env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
            self.kernels.append(KernelProcess(index, argv, env, cwd))
        if len(gpus) > 1 and count > len(gpus):
            logger.warning("%d kernels share %d GPUs: some GPUs hold two kernels", count, len(gpus))
        self._lock = threading.Lock()
        self._picks = 0
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="edi-forward")
        self._watcher = threading.Thread(target=self._watch, name="edi-kernel-watch", daemon=True)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Every kernel started together (they share the model fetch and the artifact build), then awaited."""
        for kernel in self.kernels:
            kernel.start(self.log_dir)
        try:
            for kernel in self.kernels:
                kernel.wait_ready(self.path, timeout_s)
        except BaseException:
            self.close()
            raise
        logger.info("%d kernels ready", len(self.kernels))
        self._watcher.start()

    def submit(self, body: bytes) -> Future:
        return self._executor.submit(self._forward, body)

    def _forward(self, body: bytes) -> str:
        tried: set[int] = set()
        while True:
            kernel = self._least_busy(tried)
            if kernel is None:
                return _retry_later("no kernel is ready (they are starting or restarting)", body)
            tried.add(kernel.index)
            try:
                return kernel.forward(self.path, body)
            except ConnectionRefusedError:
                continue  # it never saw the request: another kernel can take it
            except (OSError, http.client.HTTPException) as exc:
                return _retry_later(f"kernel {kernel.index} stopped while handling the request ({exc})", body)
            finally:
                with self._lock:
                    kernel.in_flight -= 1

    def _least_busy(self, tried: set[int]) -> KernelProcess | None:
        with self._lock:
            ready = [k for k in self.kernels if k.ready.is_set() and k.index not in tried]
            if not ready:
                return None
            kernel = min(ready, key=lambda k: (k.in_flight, k.last_picked))  # ties: the one idle longest
            kernel.in_flight += 1
            self._picks += 1
            kernel.last_picked = self._picks
            return kernel

    def _watch(self) -> None:
        """Start again a kernel that exited on its own (a crash, the OOM killer)."""
        while not self._closing.wait(1.0):
            for kernel in self.kernels:
                if kernel.process.poll() is None or self._closing.is_set():
                    continue
                kernel.ready.clear()
                kernel.restarts += 1
                logger.error("kernel %d exited with code %s; starting it again (restart %d):\n%s", kernel.index,
                             kernel.process.returncode, kernel.restarts, kernel.log_tail(5))
                try:
                    kernel.start(self.log_dir)
                    kernel.wait_ready(self.path, START_TIMEOUT_S)
                except KernelStartError as exc:
                    logger.error("%s", exc)

    def close(self) -> None:
        """SIGTERM to every kernel (each finishes its queued work within its grace period), then wait."""
        self._closing.set()
        for kernel in self.kernels:  # all at once: they finish their work in parallel
            kernel.terminate()
        for kernel in self.kernels:
            kernel.wait_or_kill(self.grace_s)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _retry_later(msg: str, body: bytes) -> str:
    return error_json(f"{msg}; send it again", request_id_in(body), retry=True)


def kernel_argv(kernel_file: Path, model_json: Path, name: str | None, task_batch_size: int,
                max_body_mb: int) -> list[str]:
    """One kernel: this project's `serve` in a child Python, with the pool's options."""
    argv = [sys.executable, "-m", "engine.cli", "serve", "--kernel", str(kernel_file), "--model-json",
            str(model_json), "--task-batch-size", str(task_batch_size), "--max-body-mb", str(max_body_mb)]
    return argv + (["--name", name] if name else [])


def default_log_dir(environment: dict[str, str]) -> Path:
    base = environment.get("REDHARE_MODEL_PATH") or environment.get("DEEPLIIF_CACHE_DIR") or "."
    return Path(base) / "kernel-logs" / str(os.getpid())
