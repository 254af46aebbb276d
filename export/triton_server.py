"""A real `tritonserver` on loopback, from the binary the `nvidia-pytriton` wheel ships: for tests and
benchmarks of the generated repositories on a machine without the official Triton container.

The wheel carries the server, its libraries (`nvidia_pytriton.libs/`) and the Python backend with one stub
per Python version; it carries no ONNX Runtime or TensorRT backend, so those repositories load only as far
as the backend lookup (which is what proves their configs parse). The stub embeds the Python it was built
for and finds this environment's interpreter on PATH, so the served `model.py` imports this project.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from deepliif.errors import DeepLIIFError
from engine.errors import BackendUnavailableError

from . import logger


class TritonServerError(DeepLIIFError):
    """The local Triton server did not start, or stopped answering."""


def distribution() -> Path:
    """The wheel's `tritonserver` folder; BackendUnavailableError when nvidia-pytriton is not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError("tritonserver needs the nvidia-pytriton wheel (pip install -e '.[triton]')")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise BackendUnavailableError(f"{root}: no bin/tritonserver in this nvidia-pytriton install")
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalTritonServer:
    """`with LocalTritonServer(repo, workdir, environ) as server:` starts the server, waits until it is
    live, and stops it on leaving however the block ends. `environment` is the caller's process
    environment; the server gets it with the wheel's libraries and this interpreter put first."""

    def __init__(self, repository: Path, workdir: Path, environment: Mapping[str, str],
                 start_timeout_s: float = 180.0) -> None:
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.environment = dict(environment)
        self.start_timeout_s = start_timeout_s
        self.http_port = _free_port()
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _prepare(self) -> Path:
        """The server tree with this Python's stub in its Python backend (as pytriton arranges it)."""
        source = distribution()
        tree = self.workdir / "tritonserver"
        if not tree.exists():
            shutil.copytree(source, tree, ignore=shutil.ignore_patterns("python_backend_stubs"))
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise BackendUnavailableError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
        shutil.copy2(stub, tree / "backends" / "python" / stub.name)
        return tree

    def _server_environment(self) -> dict[str, str]:
        libs = [str(distribution().parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        environment = dict(self.environment)
        environment["LD_LIBRARY_PATH"] = ":".join(libs + [environment.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        environment["PATH"] = f"{Path(sys.executable).parent}:{environment.get('PATH', '')}"
        return environment

    def start(self) -> LocalTritonServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tree = self._prepare()
        command = [str(tree / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                   f"--backend-directory={tree / 'backends'}", f"--cache-directory={tree / 'caches'}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--allow-grpc=false", "--allow-metrics=false", "--exit-on-error=false",
                   "--strict-readiness=false"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self._server_environment(), cwd=self.workdir)
        try:
            self._wait_live()
        except BaseException:
            self.stop()
            raise
        logger.info("tritonserver live on %s (repository %s)", self.url, self.repository)
        return self

    def _wait_live(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(f"tritonserver exited with {self.process.returncode}: {self.log_tail()}")
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver not ready after {self.start_timeout_s:.0f} s: {self.log_tail()}")

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=5) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def model_ready(self, name: str) -> bool:
        return self._get(f"/v2/models/{name}/ready") == 200

    def repository_index(self) -> list[dict]:
        """Every model in the repository with its `state` and, when it failed to load, its `reason`."""
        request = urllib.request.Request(f"http://{self.url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Ask the server to stop, then kill it if it has not within 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
