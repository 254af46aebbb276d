"""What kernel.py delegates to: one engine Session for the kernel's life, and the EDI contract around it.

`handle(bodies)` answers every task of one EDI call: status requests from the shared volume, inference
requests decoded and checked first, then the synchronous ones run together (their tiles batched through
one engine) and the long or `"async": true` ones queued to a background worker that records their status
on the volume. Every failure of one request becomes that request's `status: error`; nothing a request
does can stop the kernel.
"""
from __future__ import annotations

import logging

import base64
import datetime
import json
import os
import threading
import queue
import time
import traceback
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from deepliif.errors import DeepLIIFError
from deepliif.imageio import encode_png, read_image
from deepliif.inference import InferenceOptions, InferenceResult, check_working_size, tile_count

from ..session import Session
from .layout import DeploymentLayout, StatusStore, now
from .requests import (InferenceRequest, RequestError, RequestInUseError, StatusRequest, check_request_id,
                       parse_request)
from .settings import KernelSettings
from .storage import MountedVolume, StorageError, Volume, open_volume

logger = logging.getLogger("engine")

LOCAL_STEM = "local"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UNFINISHED = ("submitted", "running")
STALE_AFTER_S = 900.0  # an unfinished record not updated for this long (or 3x its estimate) is lost


@dataclass
class LoadedImage:
    array: np.ndarray | None  # None while queued: decoded when its job starts
    data: bytes   # the file as received (empty while a path request is queued: read again at start)
    name: str     # input file name (for input_dir)
    stem: str     # output names: <stem>_<Name>.png
    decode_seconds: float = 0.0


class EdiService:
    def __init__(self, settings: KernelSettings, log=None) -> None:
        start = time.perf_counter()
        self.settings = settings
        self.log = log
        self.volume: Volume | None = open_volume(settings.volume_root, settings.cpd)
        state = self.volume or MountedVolume(_make_dir(settings.state_root))
        self.layout = DeploymentLayout(settings.deployment, settings.pod)
        self.state = state  # async status, outputs of async requests and the per-pod log live here
        self.status = StatusStore(state, self.layout)
        self.session = Session(settings.model_dir, backend=settings.backend, precision=settings.precision,
                               device=settings.device, cache_dir=settings.cache_dir,
                               batch_size=settings.batch_size, onnx=settings.onnx)
        self.session.warmup()  # the first call pays one-off costs (allocation, kernel selection)
        self.seconds_per_tile = max(self.session.warmup(), 1e-3)
        self._engine = threading.Lock()  # one engine call at a time: the GPU is this kernel's alone
        self._encoders = ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0))), thread_name_prefix="edi-png")
        self._jobs: queue.Queue = queue.Queue()
        self._running: str | None = None  # the async request the worker is on
        self._worker = threading.Thread(target=self._work, name="edi-async", daemon=True)
        self._worker.start()
        self.startup_seconds = time.perf_counter() - start
        self._info(f"kernel ready in {self.startup_seconds:.1f} s: {self.session.info.name} "
                   f"{self.session.precision.value} on {self.session.info.device}, batch {self.session.batch_size}, "
                   f"{self.seconds_per_tile:.3f} s per tile; volume "
                   f"{type(self.volume).__name__ if self.volume else 'none'}; sync budget {settings.sync_budget_s} s")
        for reason in self.session.skipped:
            self._info(f"backend not used: {reason}")

    # ---- the call ----------------------------------------------------------------------------------
    def handle(self, bodies: Sequence[str | bytes]) -> list[str]:
        """One JSON response per body, in order."""
        responses: list[dict | None] = [None] * len(bodies)
        sync: list[tuple[int, InferenceRequest, LoadedImage, float]] = []
        for index, body in enumerate(bodies):
            request = None
            try:
                request = parse_request(body)
                if isinstance(request, StatusRequest):
                    responses[index] = self._status(request.request_id)
                    continue
                started = time.perf_counter()
                image = self._load(request)
                estimate = self._estimate(request, image)
                if request.run_async or (request.run_async is None and estimate > self.settings.sync_budget_s):
                    responses[index] = self._submit(request, image, estimate)
                else:
                    sync.append((index, request, image, started))
            except Exception as exc:  # noqa: BLE001 - every failure is this request's error response
                responses[index] = self._error(body, exc)
                if isinstance(request, InferenceRequest) and not isinstance(exc, RequestInUseError):
                    self._keep_sync_status(request, responses[index])  # a running id's record is not ours
        for index, response in self._run_sync(sync):
            responses[index] = response
        return [json.dumps(response) for response in responses]

    def close(self) -> None:
        """Finish queued work within the shutdown grace period (SIGTERM gives Kubernetes' 30 s); settle
        every record still open then as an error, so no status says `submitted` or `running` forever."""
        self._jobs.put(None)
        self._worker.join(timeout=self.settings.shutdown_grace_s)
        if self._worker.is_alive():
            stopped = "the kernel stopped {} it (shutdown grace period over); submit it again"
            if self._running is not None:
                self._settle(self._running, stopped.format("while running"))
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._settle(job[0].request_id, stopped.format("before running"))
        else:
            self._encoders.shutdown()
            self.session.close()

    def _settle(self, request_id: str, msg: str) -> None:
        try:
            base = self.status.read(request_id) or {}
            self.status.write(request_id, {**base, "status": "error", "msg": msg, "finished_at": now()})
            self._record(request_id, "error", msg, kernel_fault=True)
        except Exception as exc:  # noqa: BLE001 - shutting down: record what can be recorded
            logger.warning("cannot settle %s: %s", request_id, exc)

    # ---- requests ----------------------------------------------------------------------------------
    def _load(self, request: InferenceRequest) -> LoadedImage:
        self._refuse_if_unfinished(request.request_id)
        return self._read_input(request)

    def _read_input(self, request: InferenceRequest) -> LoadedImage:
        start = time.perf_counter()
        limit = self.settings.max_request_bytes
        if request.image_path is not None:
            if self.volume is None:
                raise RequestError("img_path_on_pvc needs a storage volume, and this deployment has none "
                                   "(set DEEPLIIF_VOLUME_ROOT or the DEEPLIIF_CPD_* variables)")
            data = self.volume.read_bytes(request.image_path, limit)
            name = PurePosixPath(request.image_path).name
            stem = PurePosixPath(name).stem or "image"
        else:
            data, name, stem = request.decode_image_bytes(), f"{LOCAL_STEM}.png", LOCAL_STEM
        label = request.image_path or "local_input_image"
        array = read_image(data, max_pixels=self.settings.max_pixels, name=label)
        check_working_size(array.shape[1], array.shape[0], request.tile_size, self.settings.max_pixels, label)
        return LoadedImage(array, data, name, stem, time.perf_counter() - start)

    def _estimate(self, request: InferenceRequest, image: LoadedImage) -> float:
        height, width = image.array.shape[:2]
        return tile_count(width, height, request.tile_size) * self.seconds_per_tile

    def _refuse_if_unfinished(self, request_id: str) -> None:
        record = self._current(request_id)
        if record and record.get("status") in UNFINISHED:
            raise RequestInUseError(f"request {request_id} is still {record['status']}; ask for its status or use "
                               "another request_id")

    def _options(self, request: InferenceRequest) -> InferenceOptions:
        return InferenceOptions(tile_size=request.tile_size, batch_size=self.session.batch_size,
                                outputs=request.outputs, postprocess=request.postprocess)

    def _infer(self, images: list[np.ndarray], options: InferenceOptions) -> list[InferenceResult]:
        with self._engine:
            return self.session.infer_many(images, options)

    def _run_sync(self, jobs: list[tuple[int, InferenceRequest, LoadedImage, float]]):
        """Requests with the same options run as one tile stream (batched across requests)."""
        groups: dict[InferenceOptions, list] = {}
        for job in jobs:
            groups.setdefault(self._options(job[1]), []).append(job)
        for options, group in groups.items():
            try:
                results = self._infer([job[2].array for job in group], options)
            except Exception as exc:  # noqa: BLE001
                for index, request, _, _ in group:
                    response = self._error_for(request.request_id, exc)
                    self._keep_sync_status(request, response)
                    yield index, response
                continue
            for (index, request, image, started), result in zip(group, results):
                try:
                    response = self._finish(request, image, result, started, write_local=False)
                except Exception as exc:  # noqa: BLE001
                    response = self._error_for(request.request_id, exc)
                self._keep_sync_status(request, response)
                yield index, response

    def _finish(self, request: InferenceRequest, image: LoadedImage, result: InferenceResult, started: float,
                write_local: bool) -> dict:
        """The response: images inline (base64 input) or written to the volume (path input, async)."""
        io_start = time.perf_counter()
        response = {"request_id": request.request_id, "status": "finished", "scoring": result.scoring,
                    "log": [*request.warnings, f"{result.tiles} tiles ({result.empty_tiles} empty) on "
                            f"{self.session.info.name} {self.session.precision.value} {self.session.info.device}"]}
        if request.image_path is not None or write_local:
            location = self._write_outputs(request, image, result)
            response.update(output_dir=location, output_location=self.state.describe(location))
        else:
            response["images"] = self._inline_images(image, result)
        total = time.perf_counter() - started
        inference = result.timings.get("total_seconds", 0.0)
        response["timings"] = {"read_decode_seconds": round(image.decode_seconds, 4),
                               "inference_seconds": round(inference, 4),
                               "write_seconds": round(time.perf_counter() - io_start, 4),
                               "total_seconds": round(total, 4), "overhead_seconds": round(total - inference, 4)}
        response["msg"] = (f"finished: {result.scoring['num_total']} cells, {result.scoring['percent_pos']}% "
                           f"positive, {total:.2f} s")
        self._record(request.request_id, "finished", response["msg"])
        return response

    def _encode(self, images: dict[str, np.ndarray]) -> dict[str, bytes]:
        """PNG-encode the outputs on every core (zlib releases the GIL): the bulk of the kernel's overhead."""
        return dict(zip(images, self._encoders.map(encode_png, images.values())))

    def _inline_images(self, image: LoadedImage, result: InferenceResult) -> dict[str, str]:
        original = image.data if image.data.startswith(PNG_MAGIC) else encode_png(image.array)
        images = {f"{LOCAL_STEM}.png": original}
        images.update({f"{LOCAL_STEM}_{name}.png": data for name, data in self._encode(result.images).items()})
        return {name: base64.b64encode(data).decode("ascii") for name, data in images.items()}

    def _write_outputs(self, request: InferenceRequest, image: LoadedImage, result: InferenceResult) -> str:
        """All outputs appear together (one rename on a mounted volume); the input is kept beside them."""
        volume = self.state
        final = self.layout.output_dir(request.request_id)
        staging = volume.begin_dir(final)
        for name, data in self._encode(result.images).items():
            volume.write_bytes(f"{staging}/{image.stem}_{name}.png", data)
        volume.write_bytes(f"{staging}/{image.stem}_scoring.json", json.dumps(result.scoring, indent=1).encode())
        volume.write_bytes(f"{self.layout.input_dir(request.request_id)}/{image.name}", image.data)
        volume.publish_dir(staging, final)
        return final

    def _keep_sync_status(self, request: InferenceRequest, response: dict) -> None:
        """Every request has a status record, so a status request for a finished sync request answers
        `finished` (its scoring and output_dir; inline images are not kept). Failing to write it only logs."""
        record = {key: value for key, value in response.items() if key != "images"}
        record.update(local_input=request.image_path is None, finished_at=now())
        try:
            self.status.write(request.request_id, record)
        except Exception as exc:  # noqa: BLE001 - the answer is already made; the record is a courtesy
            logger.warning("cannot record the status of %s: %s", request.request_id, exc)

    # ---- async -------------------------------------------------------------------------------------
    def _submit(self, request: InferenceRequest, image: LoadedImage, estimate: float) -> dict:
        if self._jobs.qsize() >= self.settings.max_async_queue:
            raise RequestError(f"busy: {self._jobs.qsize()} requests are already queued on this kernel; retry "
                               "later (the request was not accepted)")
        budget = self.settings.sync_budget_s
        reason = "asked for" if request.run_async else f"estimated {estimate:.0f} s > {budget:.0f} s"
        record = {"status": "submitted", "msg": f"submitted ({reason}); ask {{\"type\": \"status\", "
                  f"\"request_id\": \"{request.request_id}\"}}", "log": list(request.warnings),
                  "submitted_at": now(), "estimated_seconds": round(estimate, 1),
                  "local_input": request.image_path is None}
        self.status.write(request.request_id, record)
        # queue a reference, not pixels: a queued 10 000^2 image would otherwise hold 300 MB until its turn
        self._jobs.put((request, replace(image, array=None, data=b"" if request.image_path else image.data)))
        self._record(request.request_id, "submitted", record["msg"])
        return {"request_id": request.request_id, **record}

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            request, image = job
            self._running = request.request_id
            started = time.perf_counter()
            base = self.status.read(request.request_id) or {}
            try:
                self.status.write(request.request_id, {**base, "status": "running", "started_at": now(),
                                                       "msg": "running"})
                image = self._decoded(request, image)
                (result,) = self._infer([image.array], self._options(request))
                response = self._finish(request, image, result, started, write_local=True)
                self.status.write(request.request_id, {**base, **response, "finished_at": now()})
            except Exception as exc:  # noqa: BLE001 - the worker outlives every job
                failure = self._error_for(request.request_id, exc)
                try:
                    self.status.write(request.request_id, {**base, **failure, "finished_at": now()})
                except Exception:  # noqa: BLE001
                    logger.exception("cannot record the failure of %s", request.request_id)

    def _decoded(self, request: InferenceRequest, queued: LoadedImage) -> LoadedImage:
        if request.image_path is not None:
            return self._read_input(request)
        array = read_image(queued.data, max_pixels=self.settings.max_pixels, name="local_input_image")
        return replace(queued, array=array)

    def _current(self, request_id: str) -> dict | None:
        """The status record, with an unfinished one whose kernel evidently died reported as an error."""
        record = self.status.read(request_id)
        if record and record.get("status") in UNFINISHED:
            age = time.time() - datetime.datetime.fromisoformat(record["updated_at"]).timestamp()
            if age > max(STALE_AFTER_S, 3 * record.get("estimated_seconds", 0)):
                record.update(status="error", msg=f"lost: {record['status']} for {age:.0f} s without an update; "
                              "the kernel running it stopped; submit it again")
        return record

    def _status(self, request_id: str) -> dict:
        record = self._current(request_id)
        if record is None:
            raise RequestError(f"no request {request_id} is known to deployment {self.settings.deployment}")
        if record.get("status") == "finished" and record.get("local_input") and record.get("output_dir"):
            record["images"] = self._read_back_images(record["output_dir"])
        return record

    def _read_back_images(self, output_dir: str) -> dict[str, str]:
        volume = self.state
        return {name: base64.b64encode(volume.read_bytes(f"{output_dir}/{name}", 1 << 31)).decode("ascii")
                for name in volume.list(output_dir) if name.endswith(".png")}

    # ---- errors and logs ---------------------------------------------------------------------------
    def _error(self, body: str | bytes, exc: Exception) -> dict:
        return self._error_for(_request_id_of(body) or str(uuid.uuid4()), exc)

    def _error_for(self, request_id: str | None, exc: Exception) -> dict:
        if isinstance(exc, (DeepLIIFError, StorageError)):
            msg = str(exc)
            detail = [msg]
        else:
            msg = f"internal error ({type(exc).__name__}: {exc}); the kernel keeps serving"
            detail = traceback.format_exception_only(type(exc), exc)
            logger.exception("request %s failed unexpectedly", request_id)
        # a request the kernel refuses (bad input, volume problem) is the caller's to fix: not a kernel ERROR
        self._record(request_id, "error", msg, kernel_fault=not isinstance(exc, DeepLIIFError))
        return {"request_id": request_id, "status": "error", "msg": msg, "log": detail}

    def _record(self, request_id: str | None, status: str, msg: str, kernel_fault: bool = False) -> None:
        text = msg if msg.startswith(status) else f"{status}: {msg}"  # not "finished: finished: ..."
        line = f"{now()} {self.settings.pod} {request_id} {text}"
        (self._error_log if kernel_fault else self._info)(line)
        try:
            self.state.append_text(self.layout.log_file, line + "\n")
        except Exception as exc:  # noqa: BLE001 - a log that cannot be written must not fail the request
            logger.warning("cannot append to %s: %s", self.layout.log_file, exc)

    def _info(self, text: str) -> None:
        """To the kernel's log (the WMLA console) when there is one, else to the package logger."""
        if self.log is not None:
            self.log.log_info(text)
        else:
            logger.info("%s", text)

    def _error_log(self, text: str) -> None:
        if self.log is not None:
            self.log.log_error(text)
        else:
            logger.warning("%s", text)


def _request_id_of(body: str | bytes) -> str | None:
    """The request's own id for an error response, when it has a valid one."""
    try:
        record = json.loads(body)
        return check_request_id(record["request_id"]) if isinstance(record, dict) else None
    except Exception:  # noqa: BLE001 - an unparsable body simply has no id to echo
        return None


def _make_dir(path: Path | None) -> Path:
    if path is None:
        raise StorageError("no place for request status: set DEEPLIIF_VOLUME_ROOT or REDHARE_MODEL_PATH")
    path.mkdir(parents=True, exist_ok=True)
    return path
