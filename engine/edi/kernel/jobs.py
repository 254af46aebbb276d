"""Async jobs: a bounded queue of references, one worker, each job's status on the volume, and a
shutdown that finishes queued work within a grace period and settles what it cannot finish."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from .layout import now
from .reader import LoadedImage
from .records import RequestRecords
from .requests import InferenceRequest, RetryLaterError
from deepliif.logs import project_logger

logger = project_logger("engine")

Job = tuple[InferenceRequest, LoadedImage]


class AsyncJobs:
    """`run(request, queued_image, started)` does one job and returns its response (`finished`)."""

    def __init__(self, records: RequestRecords, run: Callable[[InferenceRequest, LoadedImage, float], dict],
                 max_queue: int, sync_budget_s: float) -> None:
        self.records, self.run = records, run
        self.max_queue, self.sync_budget_s = max_queue, sync_budget_s
        self.queue: queue.Queue = queue.Queue()
        self.running: str | None = None  # the request the worker is on
        self._worker = threading.Thread(target=self._work, name="edi-async", daemon=True)
        self._worker.start()

    def submit(self, request: InferenceRequest, image: LoadedImage, estimate: float) -> dict:
        if self.queue.qsize() >= self.max_queue:
            raise RetryLaterError(f"busy: {self.queue.qsize()} requests are already queued on this kernel; retry "
                               "later (the request was not accepted)")
        reason = "asked for" if request.run_async else f"estimated {estimate:.0f} s > {self.sync_budget_s:.0f} s"
        record = {"status": "submitted", "msg": f"submitted ({reason}); ask {{\"type\": \"status\", "
                  f"\"request_id\": \"{request.request_id}\"}}", "log": list(request.warnings),
                  "submitted_at": now(), "estimated_seconds": round(estimate, 1),
                  "local_input": request.image_path is None}
        self.records.write(request.request_id, record)
        self.queue.put((request, image.queued(from_volume=request.image_path is not None)))
        self.records.log(request.request_id, "submitted", record["msg"])
        return {"request_id": request.request_id, **record}

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            request, image = job
            self.running = request.request_id
            started = time.perf_counter()
            base = self.records.status.read(request.request_id) or {}
            write = self.records.write
            try:
                write(request.request_id, {**base, "status": "running", "started_at": now(), "msg": "running"})
                response = self.run(request, image, started)
                write(request.request_id, {**base, **response, "finished_at": now()})
            except Exception as exc:  # noqa: BLE001 - the worker outlives every job
                failure = self.records.error(request.request_id, exc)
                try:
                    write(request.request_id, {**base, **failure, "finished_at": now()})
                except Exception:  # noqa: BLE001
                    logger.exception("cannot record the failure of %s", request.request_id)
            finally:
                self.running = None

    def close(self, grace_s: float) -> bool:
        """Finish queued work within `grace_s`; settle every record still open then as an error, so no
        status says `submitted` or `running` forever. True when the worker finished everything."""
        self.queue.put(None)
        self._worker.join(timeout=grace_s)
        if not self._worker.is_alive():
            return True
        stopped = "the kernel stopped {} it (shutdown grace period over); submit it again"
        if self.running is not None:
            self.records.settle(self.running, stopped.format("while running"))
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.records.settle(job[0].request_id, stopped.format("before running"))
        return False
