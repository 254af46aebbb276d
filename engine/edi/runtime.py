"""A local stand-in for WMLA EDI's `redhareapi`, with the same names, so kernel.py runs unchanged here.

Inside WMLA the runtime imports kernel.py, calls `on_kernel_start` once, hands calls to `on_task_invoke`
(several tasks chained through `next()` when the profile's `task_batch_size` > 1) and `on_kernel_shutdown`
at the end. Here `Kernel.run()` does the same behind a real HTTP endpoint (`engine.edi.server`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .settings import apply_model_environment

edi_log = logging.getLogger("engine.edi.kernel")


class KernelContext:
    def __init__(self, model_description: str) -> None:
        self._model_description = model_description

    def get_model_description(self) -> str:
        return self._model_description


class TaskContext:
    """One task of a call: its request body in, its response body out, and the next task of the call."""

    def __init__(self, input_data: str | bytes, next_task: TaskContext | None = None) -> None:
        self._input = input_data
        self._next = next_task
        self.output: str | None = None

    def get_input_data(self) -> str | bytes:
        return self._input

    def set_output_data(self, data: str) -> None:
        self.output = data

    def next(self) -> TaskContext | None:
        return self._next


def chain_tasks(bodies: list[str | bytes]) -> list[TaskContext]:
    """Tasks linked first to last, as EDI hands a batch of them to one `on_task_invoke`."""
    tasks: list[TaskContext] = []
    for body in reversed(bodies):
        tasks.insert(0, TaskContext(body, tasks[0] if tasks else None))
    return tasks


class Kernel:
    """Base class of an EDI kernel: the three callbacks, logging, and `run()`."""

    def on_kernel_start(self, kernel_context: KernelContext) -> None:
        raise NotImplementedError

    def on_task_invoke(self, task_context: TaskContext) -> None:
        raise NotImplementedError

    def on_kernel_shutdown(self) -> None:
        raise NotImplementedError

    def log_info(self, *message: object) -> None:
        edi_log.info(" ".join(str(m) for m in message))

    def log_error(self, *message: object) -> None:
        edi_log.error(" ".join(str(m) for m in message))

    def log_debug(self, *message: object) -> None:
        edi_log.debug(" ".join(str(m) for m in message))

    def run(self) -> None:
        """Serve this kernel on `DEEPLIIF_HOST`:`DEEPLIIF_PORT` (127.0.0.1:8000) until interrupted."""
        from .server import serve_kernel
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        model_json = Path(os.environ.get("DEEPLIIF_MODEL_JSON", Path(__file__).resolve().parents[2] / "model.json"))
        serve_kernel(self, model_json.read_text() if model_json.is_file() else "{}",
                     host=os.environ.get("DEEPLIIF_HOST", "127.0.0.1"),
                     port=int(os.environ.get("DEEPLIIF_PORT", "8000")))


def start_kernel(kernel: Kernel, model_description: str) -> None:
    """What EDI does at kernel start: put mk_environments into the environment, then call the kernel."""
    apply_model_environment(model_description)
    kernel.on_kernel_start(KernelContext(model_description))
