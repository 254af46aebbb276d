"""Request records: every request's status on the volume (read by any kernel of the deployment), who owns
a request_id, which kernel runs it and whether that kernel is alive, the per-pod request log, and errors
as the contract answers them.

Ownership: the first request under an id writes `claim.json` (its content fingerprint) with an exclusive
create, so of two kernels only one wins. A repeat with the same content is a retry, answered with that
request's status or result and never run twice (a failed one may run again); other content under a used
id is refused. Liveness: each kernel rewrites `edi_kernels/<kernel>.json` every HEARTBEAT_S and stamps
the records it writes with its id and pod. A record whose kernel's heartbeat is older than STALE_AFTER_S
is reported lost. A starting kernel settles such records, and every open record of an earlier kernel of
its own pod, and removes the partial output folders they left.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
import traceback
import uuid

from deepliif.errors import DeepLIIFError
from deepliif.logs import project_logger

from .answers import error_answer
from .layout import KERNELS_DIR, RESERVED_NAMES, DeploymentLayout, StatusStore, now
from .requests import (InferenceRequest, RequestError, RequestIdTakenError, RequestInUseError, RetryLaterError,
                       check_request_id)
from .storage import NotFoundError, StorageError, Volume

logger = project_logger("engine")

UNFINISHED = ("submitted", "running")
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0  # a kernel silent this long is gone (six missed heartbeats)
LEGACY_STALE_AFTER_S = 900.0  # a record without a kernel stamp: not updated this long (or 3x its estimate)
CLAIM_FILE = "claim.json"
NEVER = "1970-01-01T00:00:00+00:00"


class RequestRecords:
    def __init__(self, volume: Volume, layout: DeploymentLayout, deployment: str, pod: str) -> None:
        self.volume, self.layout, self.deployment, self.pod = volume, layout, deployment, pod
        self.status = StatusStore(volume, layout)
        self.kernel = f"{pod}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._beat()
        threading.Thread(target=self._beating, name="edi-heartbeat", daemon=True).start()

    # ---- kernels -----------------------------------------------------------------------------------
    def _kernel_file(self, kernel: str) -> str:
        return f"{self.layout.base}/{KERNELS_DIR}/{kernel}.json"

    def _beat(self, at: str | None = None) -> None:
        record = {"kernel": self.kernel, "pod": self.pod, "pid": os.getpid(), "heartbeat_at": at or now()}
        try:
            self.volume.write_bytes(self._kernel_file(self.kernel), json.dumps(record).encode())
        except Exception as exc:  # noqa: BLE001 - a missed beat is retried; requests go on
            logger.warning("cannot write this kernel's heartbeat: %s", exc)

    def _beating(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def kernel_age(self, kernel: str) -> float | None:
        """Seconds since `kernel` last beat; None when it left no heartbeat."""
        if kernel == self.kernel:
            return 0.0
        try:
            record = json.loads(self.volume.read_bytes(self._kernel_file(kernel), 1 << 16))
            return time.time() - datetime.datetime.fromisoformat(record["heartbeat_at"]).timestamp()
        except (NotFoundError, ValueError, KeyError):
            return None

    def close(self) -> None:
        """Stop beating, and leave a heartbeat that says at once that this kernel is gone."""
        self._stop.set()
        self._beat(NEVER)

    # ---- ownership and liveness --------------------------------------------------------------------
    def write(self, request_id: str, record: dict) -> None:
        self.status.write(request_id, {**record, "kernel": self.kernel, "pod": self.pod})

    def lost_reason(self, record: dict) -> str | None:
        """Why an unfinished record's kernel is gone, or None while it may still be working on it."""
        if record.get("status") not in UNFINISHED:
            return None
        kernel = record.get("kernel")
        if kernel is None:  # written before records carried their kernel
            age = time.time() - datetime.datetime.fromisoformat(record["updated_at"]).timestamp()
            if age > max(LEGACY_STALE_AFTER_S, 3 * record.get("estimated_seconds", 0)):
                return f"no update for {age:.0f} s"
            return None
        age = self.kernel_age(kernel)
        if age is None or age > STALE_AFTER_S:
            return f"kernel {kernel} stopped" + ("" if age is None else f" (no heartbeat for {age:.0f} s)")
        return None

    def current(self, request_id: str) -> dict | None:
        """The status record, with an unfinished one whose kernel is gone reported as an error."""
        record = self.status.read(request_id)
        reason = record and self.lost_reason(record)
        if reason:
            record.update(status="error", msg=f"lost: {reason} while it was {record['status']}; submit it again",
                          retry=True)
        return record

    def known(self, request_id: str) -> dict:
        record = self.current(request_id)
        if record is None:
            raise RequestError(f"no request {request_id} is known to deployment {self.deployment}")
        return record

    def claim(self, request_id: str, content: str) -> dict | None:
        """None: this request owns `request_id` and runs. Otherwise the answer to a retry (the earlier
        request's record). RequestIdTakenError for other content under a used id."""
        record = self.current(request_id)
        path = f"{self.layout.request_dir(request_id)}/{CLAIM_FILE}"
        mine = json.dumps({"fingerprint": content, "kernel": self.kernel, "claimed_at": now()}).encode()
        claim = self._read_claim(path)
        if claim is None:
            if record and record.get("status") in UNFINISHED:  # a record from before ids were claimed
                raise RequestInUseError(f"request {request_id} is still {record['status']}; ask for its status "
                                        "or use another request_id")
            if self.volume.create_exclusive(path, mine):
                return None
            claim = self._read_claim(path) or {}  # another kernel claimed it first
        if claim.get("fingerprint") != content:
            raise RequestIdTakenError(f"request_id {request_id} is already used by another request (different "
                                      "content); use a new request_id for a new request")
        if record is None:
            return {"request_id": request_id, "status": "running", "log": [],
                    "msg": "the same request is being run now; ask for its status"}
        if record.get("status") == "error":  # nothing was produced: the retry runs
            self.volume.write_bytes(path, mine)
            return None
        return record

    def _read_claim(self, path: str) -> dict | None:
        try:
            return json.loads(self.volume.read_bytes(path, 1 << 16))
        except NotFoundError:
            return None
        except ValueError:
            return {}

    def settle_orphans(self) -> int:
        """At start: close every open record of an earlier kernel of this pod or of a kernel that stopped
        beating, and remove the partial output folders of requests no live kernel is writing."""
        settled = 0
        for request_id in self.volume.list(self.layout.base):
            if request_id in RESERVED_NAMES or request_id.startswith("."):
                continue
            try:
                record = self.status.read(request_id)
            except StorageError:
                continue
            open_here = bool(record) and record.get("status") in UNFINISHED and record.get("pod") == self.pod \
                and not _pid_alive(record.get("kernel", ""))  # a sibling kernel of this pod may be alive
            reason = record and (self.lost_reason(record) or ("the kernel restarted" if open_here else None))
            if reason:
                self.settle(request_id, f"lost: {reason} while it was {record['status']}; submit it again")
                settled += 1
            if not record or record.get("status") not in UNFINISHED or reason:
                self.volume.remove_leftovers(self.layout.request_dir(request_id))
        return settled

    # ---- answers -----------------------------------------------------------------------------------
    def keep_sync_status(self, request: InferenceRequest, response: dict) -> None:
        """Every request has a status record, so a status request for a finished sync request answers
        `finished` (its scoring and output_dir; inline images are not kept). Failing to write it only logs."""
        record = {key: value for key, value in response.items() if key != "images"}
        record.update(local_input=request.image_path is None, finished_at=now())
        try:
            self.write(request.request_id, record)
        except Exception as exc:  # noqa: BLE001 - the answer is already made; the record is a courtesy
            logger.warning("cannot record the status of %s: %s", request.request_id, exc)

    def settle(self, request_id: str, msg: str) -> None:
        """An open record closed as an error (the kernel stopped before finishing it)."""
        try:
            base = self.status.read(request_id) or {}
            self.write(request_id, {**base, "status": "error", "msg": msg, "retry": True, "finished_at": now()})
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
        return error_answer(msg, request_id, detail, retry=isinstance(exc, RetryLaterError))

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


def _pid_alive(kernel: str) -> bool:
    """Whether the process named in a kernel id (pod.pid.nonce) of this pod still runs."""
    try:
        os.kill(int(kernel.rsplit(".", 2)[1]), 0)
    except (IndexError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def request_id_of(body: str | bytes) -> str | None:
    """The request's own id for an error response, when it has a valid one."""
    try:
        record = json.loads(body)
        return check_request_id(record["request_id"]) if isinstance(record, dict) else None
    except Exception:  # noqa: BLE001 - an unparsable body simply has no id to echo
        return None
