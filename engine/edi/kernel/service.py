"""What kernel.py delegates to: one engine Session for the kernel's life, and the EDI contract around it.

`handle(bodies)` answers every task of one EDI call: status requests from the records on the volume,
inference requests read and checked first (`RequestReader`), then the synchronous ones run together
(their tiles batched through one engine) and the long or `"async": true` ones queued (`AsyncJobs`).
Results become responses through `ResultWriter`. Synchronous work goes before async work at every tile
batch (`EngineTurns`). Every failure of one request becomes that request's `status: error`; nothing a
request does can stop the kernel.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from deepliif.contract import SEG_INTERMEDIATE_NAMES
from deepliif.inference import InferenceOptions, InferenceResult, TileSpec
from deepliif.logs import project_logger
from deepliif.slide_checkpoint import CheckpointBusyError

from ...session import Session
from ...slide_inference import infer_slide
from .jobs import AsyncJobs
from .layout import DeploymentLayout
from .model_store import ModelFetcher
from .reader import LoadedImage, RequestReader
from .records import RequestRecords
from .requests import (InferenceRequest, RequestError, RequestInUseError, StatusRequest, fingerprint,
                       parse_request)
from .settings import KernelSettings
from .storage import MountedVolume, StorageError, Volume, open_volume
from .turns import EngineTurns
from .writer import ResultWriter

logger = project_logger("engine")

SyncJob = tuple[int, InferenceRequest, LoadedImage, float]  # response index, request, image, start time


class EdiService:
    def __init__(self, settings: KernelSettings) -> None:
        start = time.perf_counter()
        self.settings = settings
        self.volume: Volume | None = open_volume(settings.volume_root, settings.cpd)
        self.state = self.volume or MountedVolume(_make_dir(settings.state_root))  # status, async outputs, log
        layout = DeploymentLayout(settings.deployment, settings.pod)
        self.records = RequestRecords(self.state, layout, settings.deployment, settings.pod)
        if settings.model_source is not None:
            ModelFetcher(settings.model_source, settings.model_dir, self.volume).fetch()
        # a torch kernel can answer seg_intermediate too; exported graphs carry the five outputs alone
        torch_only = {"seg_intermediate": True} if settings.backend == "torch" else {}
        self.session = Session(settings.model_dir, backend=settings.backend, precision=settings.precision,
                               device=settings.device, cache_dir=settings.cache_dir,
                               batch_size=settings.batch_size, onnx=settings.onnx, **torch_only)
        self.session.warmup()  # the first call pays one-off costs (allocation, kernel selection)
        # one tile alone, so the async estimate errs long
        self.seconds_per_tile_at_batch_1 = max(self.session.warmup(), 1e-3)
        info = self.session.info
        self.reader = RequestReader(settings, self.volume)
        self.writer = ResultWriter(self.state, layout, f"{info.name} {self.session.precision.value} {info.device}")
        self.turns = EngineTurns()
        settled = self.records.settle_orphans()
        self.jobs = AsyncJobs(self.records, self._run_async, settings.max_async_queue, settings.sync_budget_s)
        self.startup_seconds = time.perf_counter() - start
        logger.info("kernel ready in %.1f s: %s %s on %s, batch %d, %.3f s per tile at batch 1; volume %s; "
                    "sync budget %s s",
                    self.startup_seconds, info.name, self.session.precision.value, info.device,
                    self.session.batch_size, self.seconds_per_tile_at_batch_1,
                    type(self.volume).__name__ if self.volume else "none", settings.sync_budget_s)
        for reason in self.session.skipped:
            logger.info("backend not used: %s", reason)
        if settled:
            logger.info("settled %d request(s) left open by stopped kernels", settled)

    @property
    def status(self):
        return self.records.status

    def handle(self, bodies: Sequence[str | bytes]) -> list[str]:
        """One JSON response per body, in order."""
        responses: list[dict | None] = [None] * len(bodies)
        sync: list[SyncJob] = []
        for index, body in enumerate(bodies):
            request = None
            try:
                request = parse_request(body)
                if isinstance(request, StatusRequest):
                    responses[index] = self._status(request.request_id)
                    continue
                started = time.perf_counter()
                earlier = self.records.claim(request.request_id, fingerprint(body))
                if earlier is not None:  # a retry of a request this deployment already has: never run twice
                    responses[index] = self._with_images(earlier)
                    continue
                image = self.reader.load(request)
                if request.seg_intermediate:
                    self._check_seg_intermediate(image)
                estimate = self.reader.estimate(request, image, self.seconds_per_tile_at_batch_1)
                if image.slide is not None or request.run_async or (
                        request.run_async is None and estimate > self.settings.sync_budget_s):  # slides: always
                    responses[index] = self.jobs.submit(request, image, estimate)
                else:
                    sync.append((index, request, image, started))
            except Exception as exc:  # noqa: BLE001 - every failure is this request's error response
                responses[index] = self.records.error_for_body(body, exc)
                if isinstance(request, InferenceRequest) and not isinstance(exc, RequestInUseError):
                    self.records.keep_sync_status(request, responses[index])  # a running id's record is not ours
        for index, response in self._run_sync(sync):
            responses[index] = response
        return [json.dumps(response) for response in responses]

    def close(self) -> None:
        """Finish queued work within the shutdown grace period (SIGTERM gives Kubernetes' 30 s)."""
        finished = self.jobs.close(self.settings.shutdown_grace_s)
        self.records.close()
        if finished:
            self.writer.close()
            self.session.close()

    def _check_seg_intermediate(self, image: LoadedImage) -> None:
        if image.slide is not None:
            raise RequestError("seg_intermediate is for images; this is a whole slide (its pyramids hold the "
                               "five network outputs and the overlays)")
        if not set(SEG_INTERMEDIATE_NAMES) <= set(self.session.output_names):
            raise RequestError(f"seg_intermediate needs a kernel on the torch backend (DEEPLIIF_BACKEND=torch); "
                               f"this one serves {self.session.info.name}, whose exported graph has the five outputs "
                               "only")

    def _options(self, request: InferenceRequest) -> InferenceOptions:
        return InferenceOptions(tile_size=request.image_tile_size, batch_size=self.session.batch_size,
                                outputs=request.outputs, postprocess=request.postprocess,
                                cell_geometry=None, cell_data=request.cell_data,  # no QuPath cells file
                                seg_intermediate=request.seg_intermediate)

    def _infer(self, images: list, options: InferenceOptions | list[InferenceOptions], sync: bool
               ) -> list[InferenceResult]:
        return self.session.infer_many(images, options, run=self.turns.taking_turns(self.session.run, sync))

    def _run_sync(self, jobs: list[SyncJob]) -> Iterator[tuple[int, dict]]:
        """Requests tiled alike (one `TileSpec`) run as one tile stream, batched across requests, whatever
        each asks back (outputs, thresholds)."""
        groups: dict[TileSpec, list[SyncJob]] = {}
        for job in jobs:
            groups.setdefault(self._options(job[1]).tile_spec, []).append(job)
        for group in groups.values():
            try:
                results = self._infer([job[2].array for job in group], [self._options(job[1]) for job in group],
                                      sync=True)
            except Exception as exc:  # noqa: BLE001
                results = [exc] * len(group)
            for (index, request, image, started), result in zip(group, results):
                yield index, self._answer_sync(request, image, result, started)

    def _answer_sync(self, request: InferenceRequest, image: LoadedImage, result: InferenceResult | Exception,
                     started: float) -> dict:
        try:
            if isinstance(result, Exception):
                raise result
            response = self.writer.response(request, image, result, started, to_volume=False)
            self.records.log(request.request_id, "finished", response["msg"])
        except Exception as exc:  # noqa: BLE001
            response = self.records.error(request.request_id, exc)
        self.records.keep_sync_status(request, response)
        return response

    def _run_async(self, request: InferenceRequest, queued: LoadedImage, started: float) -> dict:
        if queued.slide is not None:
            return self._run_slide(request, queued, started)
        image = self.reader.decoded(request, queued)
        (result,) = self._infer([image.array], self._options(request), sync=False)
        response = self.writer.response(request, image, result, started, to_volume=True)
        self.records.log(request.request_id, "finished", response["msg"])
        return response

    def _run_slide(self, request: InferenceRequest, slide: LoadedImage, started: float) -> dict:
        """Stream a slide from the volume into pyramidal outputs in a staging folder, published whole;
        the status record shows tiles done / total while it runs."""
        final = self.records.layout.output_dir(request.request_id)
        staging = self.state.begin_dir(final)
        progress = SlideProgress(self.records, request.request_id, self.reader.estimate_tiles(request, slide))
        checkpoint = self.slide_checkpoint(final)
        try:
            with self.volume.local_file(request.image_path) as local:
                record_path = infer_slide(self.session, local, self.state.local_dir(staging), request.tile_size,
                                          progress.add, self.turns.taking_turns(self.session.run, sync=False),
                                          slide.stem, request.postprocess, checkpoint, progress.stage,
                                          request.outputs, cell_data=request.cell_data,
                                          compression=self.settings.pyramid_compression)
        except CheckpointBusyError:
            raise
        except Exception:
            shutil.rmtree(checkpoint, ignore_errors=True)  # kept only for a retry after this kernel dies
            raise
        record = json.loads(record_path.read_text())  # before the folder moves into place
        self.state.publish_dir(staging, final)
        seconds = time.perf_counter() - started
        response = {"request_id": request.request_id, "status": "finished", "scoring": record["scoring"],
                    "output_dir": final, "output_location": self.state.describe(final), "slide": record["slide"],
                    "tiles": {key: record[key] for key in ("tiles", "empty_tiles", "run_tiles", "tile_size")},
                    "progress": {"tiles_done": record["tiles"], "tiles_total": record["tiles"], "stage": "done"},
                    "resumed": record["resumed"],
                    "timings": {"total_seconds": round(seconds, 3),
                                "engine_seconds": round(record["timings"]["total_seconds"], 3),
                                "network_seconds": round(record["timings"]["inference_seconds"], 3)},
                    "log": list(request.warnings),
                    "msg": f"finished: slide {record['tiles']} tiles ({record['empty_tiles']} empty), "
                           f"{record['scoring']['num_total']} cells, {record['scoring']['percent_pos']}% positive, "
                           f"{seconds:.1f} s"}
        self.records.log(request.request_id, "finished", response["msg"])
        return response

    def slide_checkpoint(self, final: str) -> Path:
        """Where a slide request keeps its regions while it runs: beside its output folder, named by the
        request, so a retry after a killed kernel resumes from them (staging folders are per attempt)."""
        local = self.state.local_dir(final)
        return local.parent / f".{local.name}.resume"

    def _status(self, request_id: str) -> dict:
        return self._with_images(self.records.known(request_id))

    def _with_images(self, record: dict) -> dict:
        """A finished base64 request's record with its images read back, as its first answer had them."""
        if record.get("status") == "finished" and record.get("local_input") and record.get("output_dir"):
            record["images"] = self.writer.read_back_images(record["output_dir"])
        return record


class SlideProgress:
    """Tiles done / total in the running record, written at most every PROGRESS_EVERY_S seconds."""

    PROGRESS_EVERY_S = 2.0

    def __init__(self, records: RequestRecords, request_id: str, total: int) -> None:
        self.records, self.request_id, self.total = records, request_id, total
        self.done, self.written, self.current = 0, 0.0, "tiles"

    def add(self, tiles: int) -> None:
        self.done += tiles
        if time.monotonic() - self.written >= self.PROGRESS_EVERY_S:
            self._write()

    def stage(self, name: str) -> None:
        """A new stage (tiles, pyramids, scoring, overlays) is written at once: the later ones show no tiles."""
        self.current = name
        self._write()

    def _write(self) -> None:
        self.written = time.monotonic()
        try:
            base = self.records.status.read(self.request_id) or {}
            self.records.write(self.request_id, {**base, "status": "running", "msg": f"running: {self.current}, "
                               f"{self.done} of {self.total} tiles", "progress": {
                                   "tiles_done": self.done, "tiles_total": self.total, "stage": self.current}})
        except Exception as exc:  # noqa: BLE001 - progress is a courtesy; the job goes on
            logger.warning("cannot record the progress of %s: %s", self.request_id, exc)


def _make_dir(path: Path | None) -> Path:
    if path is None:
        raise StorageError("no place for request status: set DEEPLIIF_VOLUME_ROOT or REDHARE_MODEL_PATH")
    path.mkdir(parents=True, exist_ok=True)
    return path
