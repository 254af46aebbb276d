"""Where a deployment keeps things on its volume, and the status of async requests.

    edi_deployments/<deployment>/<request_id>/input_dir/<input file>
    edi_deployments/<deployment>/<request_id>/output_dir/<stem>_<Name>.png, <stem>_scoring.json
    edi_deployments/<deployment>/<request_id>/status.json
    edi_deployments/<deployment>/edi_logs/<pod>_inference.log

Status files are whole-file writes (atomic on a mounted volume), so any kernel of the deployment reads
a complete record; reading a status never writes one.
"""
from __future__ import annotations

import datetime
import json
import re

from deepliif.errors import ArgumentError

from .storage import NotFoundError, StorageError, Volume

ROOT = "edi_deployments"
STATUS_FILE = "status.json"
LOGS_DIR = "edi_logs"  # the pods' inference logs
KERNELS_DIR = "edi_kernels"  # the kernels' heartbeats
RESERVED_NAMES = (LOGS_DIR, KERNELS_DIR)  # folders of the deployment's own, beside its requests' folders
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class DeploymentLayout:
    def __init__(self, deployment: str, pod: str) -> None:
        for what, value in (("deployment name", deployment), ("pod name", pod)):
            if not SAFE_NAME.match(value) or ".." in value:
                raise ArgumentError(f"{what} {value!r} is not a safe directory name")
        self.base = f"{ROOT}/{deployment}"
        self.pod = pod

    def request_dir(self, request_id: str) -> str:
        return f"{self.base}/{request_id}"

    def input_dir(self, request_id: str) -> str:
        return f"{self.request_dir(request_id)}/input_dir"

    def output_dir(self, request_id: str) -> str:
        return f"{self.request_dir(request_id)}/output_dir"

    def status_file(self, request_id: str) -> str:
        return f"{self.request_dir(request_id)}/{STATUS_FILE}"

    @property
    def log_file(self) -> str:
        return f"{self.base}/{LOGS_DIR}/{self.pod}_inference.log"


class StatusStore:
    """Async request records on the shared volume: submitted → running → finished | error."""

    def __init__(self, volume: Volume, layout: DeploymentLayout) -> None:
        self.volume = volume
        self.layout = layout

    def read(self, request_id: str) -> dict | None:
        try:  # one read, not an existence check and then a read (two requests on a CPD volume)
            return json.loads(self.volume.read_bytes(self.layout.status_file(request_id), 16 << 20))
        except NotFoundError:
            return None
        except ValueError as exc:
            raise StorageError(f"status of {request_id} is unreadable ({exc})") from exc

    def write(self, request_id: str, record: dict) -> None:
        record = {**record, "request_id": request_id, "updated_at": now()}
        self.volume.write_bytes(self.layout.status_file(request_id), json.dumps(record, indent=1).encode())
