"""`deepliif-engine submit`: push a cohort of images and slides through an EDI endpoint, and lose nothing.

Every input becomes one async request with a request_id derived from what it is (its bytes, or its path on
the volume) and the options, so a request sent twice is the same request: the kernel answers a repeat from
its record and never runs finished work again. What happens to each input goes to a local journal, one
JSON line at a time, so a run cut short (a crash, Ctrl-C, the server restarted) is resumed by running the
same command again. At the end each input is finished (scoring and outputs in the cohort table), failed
(with the kernel's message), or still pending in the journal.
"""
from __future__ import annotations

import base64
import csv
import enum
import hashlib
import io
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deepliif.errors import ArgumentError, DeepLIIFError
from deepliif.imageio import write_atomically
from deepliif.logs import project_logger

from .client import EdiClient, EndpointRefusedError, EndpointUnavailableError

logger = project_logger("engine")

JOURNAL = "journal.jsonl"
TABLE = "cohort.csv"
VOLUME_PREFIX = "volume:"
SCORING_FIELDS = ("num_total", "num_pos", "num_neg", "percent_pos")
TABLE_FIELDS = ("input", "request_id", "state", "msg", *SCORING_FIELDS, "outputs")


class State(enum.Enum):
    SUBMITTED = "submitted"
    FINISHED = "finished"
    FAILED = "failed"
    PENDING = "pending"   # never accepted by the endpoint (yet)


@dataclass(frozen=True)
class CohortInput:
    """One image or slide: a local file sent inline (base64) or a path on the endpoint's storage volume."""
    key: str                    # the local file's absolute path, or volume:<path>
    local: Path | None
    volume_path: str | None

    @classmethod
    def parse(cls, text: str) -> CohortInput:
        if text.startswith(VOLUME_PREFIX):
            path = text[len(VOLUME_PREFIX):].strip()
            if not path or path.startswith("/"):
                raise ArgumentError(f"{text!r}: give a path relative to the volume root after volume:")
            return cls(text, None, path)
        local = Path(text).resolve()
        if not local.is_file():
            raise ArgumentError(f"{text}: no such file (a path on the endpoint's volume is written volume:PATH)")
        return cls(str(local), local, None)

    @property
    def stem(self) -> str:
        name = Path(self.volume_path).name if self.volume_path else self.local.name
        return re.sub(r"[^A-Za-z0-9._-]", "_", name.split(".")[0])[:60] or "input"

    def request_id(self, options: dict) -> str:
        """The same input with the same options always gets the same id (a resubmission is a retry)."""
        digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
        if self.local is not None:
            with self.local.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(self.key.encode())
        return f"{self.stem}-{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class CohortOptions:
    concurrency: int = 4
    max_inline_bytes: int = 16 << 20
    poll_s: float = 2.0
    tile_size: int | None = None
    images_to_return: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ArgumentError(f"concurrency must be at least 1; got {self.concurrency}")
        if self.poll_s <= 0:
            raise ArgumentError(f"the poll interval must be positive; got {self.poll_s}")

    def request_fields(self) -> dict:
        fields = {"tile_size": self.tile_size, "images_to_return": self.images_to_return}
        return {key: value for key, value in fields.items() if value is not None}


class Journal:
    """Append-only JSON lines; the last line of an input is its state. A line torn by a crash is skipped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["input"]] = entry
                except (ValueError, KeyError, TypeError):
                    logger.warning("skipping a damaged line of %s", self.path)

    def record(self, entry: dict) -> None:
        with self._lock:
            self.entries[entry["input"]] = entry
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def state(self, key: str) -> State | None:
        entry = self.entries.get(key)
        return State(entry["state"]) if entry else None


class Cohort:
    """Runs every input to an end through `client`, `options.concurrency` at a time."""

    def __init__(self, inputs: list[CohortInput], out: Path, client: EdiClient, options: CohortOptions) -> None:
        keys = [i.key for i in inputs]
        if len(set(keys)) != len(keys):
            raise ArgumentError(f"an input is given twice: {sorted({k for k in keys if keys.count(k) > 1})}")
        self.inputs, self.out, self.client, self.options = inputs, Path(out), client, options
        self.out.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.out / JOURNAL)
        self.stop = client.stop  # one event stops the workers and their client's retries

    def run(self, on_done: Callable[[], None] = lambda: None) -> dict[str, int]:
        """Every input not finished or failed in the journal, then the table; the count in each state."""
        from concurrent.futures import ThreadPoolExecutor
        todo = [i for i in self.inputs if self.journal.state(i.key) not in (State.FINISHED, State.FAILED)]
        for _ in range(len(self.inputs) - len(todo)):
            on_done()
        pool = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="cohort")
        try:
            for future in [pool.submit(self._one, item, on_done) for item in todo]:
                future.result()
        except BaseException:
            self.stop.set()  # Ctrl-C or a refused token: workers stop at their next step
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.write_table()
        return self.counts()

    def _one(self, item: CohortInput, on_done: Callable[[], None]) -> None:
        fields = self.options.request_fields()
        request_id = self.journal.entries.get(item.key, {}).get("request_id") or item.request_id(fields)
        try:
            answer = self._submit(item, request_id, fields) if self.journal.state(item.key) is not State.SUBMITTED \
                else self.client.status(request_id)
            while not self.stop.is_set():
                answer = self._follow(item, request_id, fields, answer)
                if answer is None:
                    on_done()
                    return
                self.stop.wait(self.options.poll_s)
                answer = self.client.status(request_id)
        except EndpointRefusedError:
            raise  # no input can get through: the whole run stops
        except EndpointUnavailableError as exc:
            logger.warning("%s stays pending: %s", item.key, exc)
        except DeepLIIFError as exc:
            self._end(item, request_id, State.FAILED, str(exc))
            on_done()

    def _submit(self, item: CohortInput, request_id: str, fields: dict) -> dict:
        body = {"request_id": request_id, "async": True, **fields}
        if item.volume_path is not None:
            body["img_path_on_pvc"] = item.volume_path
        else:
            size = item.local.stat().st_size
            if size > self.options.max_inline_bytes:
                limit = self.options.max_inline_bytes / 1e6
                raise DeepLIIFError(f"{item.local.name} is {size / 1e6:.1f} MB, over the {limit:.0f} MB sent inline: "
                                    "copy it to the volume and give volume:PATH")
            body["local_input_image"] = base64.b64encode(item.local.read_bytes()).decode()
        return self.client.post(body)

    def _follow(self, item: CohortInput, request_id: str, fields: dict, answer: dict) -> dict | None:
        """Act on an answer: None when the input has ended, else the answer to wait on."""
        while _send_again(answer) and not self.stop.is_set():
            logger.info("%s: %s; sending it again", item.key, answer.get("msg"))  # busy, lost, or never arrived
            self.stop.wait(self.options.poll_s)
            answer = self._submit(item, request_id, fields)
        status = answer.get("status")
        if status == "finished":
            self._end(item, request_id, State.FINISHED, answer.get("msg", ""), answer)
            return None
        if status == "error" and not _send_again(answer):
            self._end(item, request_id, State.FAILED, answer.get("msg", "error without a message"))
            return None
        if self.journal.state(item.key) is not State.SUBMITTED:
            self.journal.record({"input": item.key, "request_id": request_id, "state": State.SUBMITTED.value})
        return answer

    def _end(self, item: CohortInput, request_id: str, state: State, msg: str, answer: dict | None = None) -> None:
        entry = {"input": item.key, "request_id": request_id, "state": state.value, "msg": msg}
        if answer is not None:
            entry["scoring"] = answer.get("scoring")
            entry["outputs"] = self._save_images(request_id, answer.get("images") or {}) or \
                answer.get("output_location") or answer.get("output_dir")
        self.journal.record(entry)

    def _save_images(self, request_id: str, images: dict) -> str | None:
        """An inline input's images, written under OUT/<request_id>/ (each file written whole, then renamed)."""
        if not images:
            return None
        folder = self.out / request_id
        folder.mkdir(exist_ok=True)
        for name, data in images.items():
            write_atomically(folder / Path(name).name, base64.b64decode(data))
        return str(folder)

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in (State.FINISHED, State.FAILED, State.PENDING)}
        for item in self.inputs:
            state = self.journal.state(item.key)
            counts[State.PENDING.value if state in (None, State.SUBMITTED) else state.value] += 1
        return counts

    def write_table(self) -> Path:
        """OUT/cohort.csv: one row per input in the order given, written whole, then renamed."""
        text = io.StringIO()
        writer = csv.DictWriter(text, TABLE_FIELDS)
        writer.writeheader()
        for item in self.inputs:
            entry = self.journal.entries.get(item.key, {})
            state = entry.get("state", State.PENDING.value)
            scoring = entry.get("scoring") or {}
            writer.writerow({"input": item.key, "request_id": entry.get("request_id", ""),
                             "state": State.PENDING.value if state == State.SUBMITTED.value else state,
                             "msg": entry.get("msg", ""), "outputs": entry.get("outputs") or "",
                             **{name: scoring.get(name, "") for name in SCORING_FIELDS}})
        path = self.out / TABLE
        write_atomically(path, text.getvalue().encode())
        return path

    def summary(self) -> str:
        counts = self.counts()
        scorings = [e.get("scoring") for e in self.journal.entries.values() if e.get("scoring")]
        cells = sum(s.get("num_total", 0) for s in scorings)
        positive = sum(s.get("num_pos", 0) for s in scorings)
        line = (f"{len(self.inputs)} inputs: {counts['finished']} finished, {counts['failed']} failed, "
                f"{counts['pending']} pending")
        if counts["pending"]:
            line += " (run the same command again to resume)"
        if cells:
            line += f"; {cells} cells, {100 * positive / cells:.1f}% positive overall"
        return line + f"; table {self.out / TABLE}"


def _send_again(answer: dict) -> bool:
    """The kernel did not run it through no fault of the request (busy, its kernel lost), or does not know
    the id (a submission that never arrived): the same request goes again."""
    return answer.get("status") == "error" and bool(
        answer.get("retry") or re.match(r"no request \S+ is known", answer.get("msg", "")))
