"""Request records: every request's status on the volume (read by any kernel of the deployment), the
per-pod request log, and errors as the contract answers them."""
from __future__ import annotations

import datetime
import json
import logging
import time
import traceback
import uuid

from deepliif.errors import DeepLIIFError

from .layout import DeploymentLayout, StatusStore, now
from .requests import InferenceRequest, RequestError, RequestInUseError, check_request_id
from .storage import StorageError, Volume

logger = logging.getLogger("engine")

UNFINISHED = ("submitted", "running")
STALE_AFTER_S = 900.0  # an unfinished record not updated for this long (or 3x its estimate) is lost


class RequestRecords:
    def __init__(self, volume: Volume, layout: DeploymentLayout, deployment: str, pod: str) -> None:
        self.volume, self.layout, self.deployment, self.pod = volume, layout, deployment, pod
        self.status = StatusStore(volume, layout)

    def current(self, request_id: str) -> dict | None:
        """The status record, with an unfinished one whose kernel evidently died reported as an error."""
        record = self.status.read(request_id)
        if record and record.get("status") in UNFINISHED:
            age = time.time() - datetime.datetime.fromisoformat(record["updated_at"]).timestamp()
            if age > max(STALE_AFTER_S, 3 * record.get("estimated_seconds", 0)):
                record.update(status="error", msg=f"lost: {record['status']} for {age:.0f} s without an update; "
                              "the kernel running it stopped; submit it again")
        return record

    def known(self, request_id: str) -> dict:
        record = self.current(request_id)
        if record is None:
            raise RequestError(f"no request {request_id} is known to deployment {self.deployment}")
        return record

    def refuse_if_unfinished(self, request_id: str) -> None:
        record = self.current(request_id)
        if record and record.get("status") in UNFINISHED:
            raise RequestInUseError(f"request {request_id} is still {record['status']}; ask for its status or use "
                                    "another request_id")

    def keep_sync_status(self, request: InferenceRequest, response: dict) -> None:
        """Every request has a status record, so a status request for a finished sync request answers
        `finished` (its scoring and output_dir; inline images are not kept). Failing to write it only logs."""
        record = {key: value for key, value in response.items() if key != "images"}
        record.update(local_input=request.image_path is None, finished_at=now())
        try:
            self.status.write(request.request_id, record)
        except Exception as exc:  # noqa: BLE001 - the answer is already made; the record is a courtesy
            logger.warning("cannot record the status of %s: %s", request.request_id, exc)

    def settle(self, request_id: str, msg: str) -> None:
        """An open record closed as an error (the kernel stopped before finishing it)."""
        try:
            base = self.status.read(request_id) or {}
            self.status.write(request_id, {**base, "status": "error", "msg": msg, "finished_at": now()})
            self.log(request_id, "error", msg, kernel_fault=True)
        except Exception as exc:  # noqa: BLE001 - shutting down: record what can be recorded
            logger.warning("cannot settle %s: %s", request_id, exc)

    def error(self, request_id: str | None, exc: Exception) -> dict:
        """The contract's error answer. A request the kernel refuses (bad input, volume problem) is the
        caller's to fix, logged as information; anything else is the kernel's fault, logged as an error."""
        if isinstance(exc, (DeepLIIFError, StorageError)):
            msg = str(exc)
            detail = [msg]
        else:
            msg = f"internal error ({type(exc).__name__}: {exc}); the kernel keeps serving"
            detail = traceback.format_exception_only(type(exc), exc)
            logger.exception("request %s failed unexpectedly", request_id)
        self.log(request_id, "error", msg, kernel_fault=not isinstance(exc, DeepLIIFError))
        return {"request_id": request_id, "status": "error", "msg": msg, "log": detail}

    def error_for_body(self, body: str | bytes, exc: Exception) -> dict:
        return self.error(request_id_of(body) or str(uuid.uuid4()), exc)

    def log(self, request_id: str | None, status: str, msg: str, kernel_fault: bool = False) -> None:
        text = msg if msg.startswith(status) else f"{status}: {msg}"  # not "finished: finished: ..."
        line = f"{now()} {self.pod} {request_id} {text}"
        logger.log(logging.ERROR if kernel_fault else logging.INFO, "%s", line)
        try:
            self.volume.append_text(self.layout.log_file, line + "\n")
        except Exception as exc:  # noqa: BLE001 - a log that cannot be written must not fail the request
            logger.warning("cannot append to %s: %s", self.layout.log_file, exc)


def request_id_of(body: str | bytes) -> str | None:
    """The request's own id for an error response, when it has a valid one."""
    try:
        record = json.loads(body)
        return check_request_id(record["request_id"]) if isinstance(record, dict) else None
    except Exception:  # noqa: BLE001 - an unparsable body simply has no id to echo
        return None
