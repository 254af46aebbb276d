"""A local stand-in for WMLA EDI's `redhareapi`, with the same names, so kernel.py runs unchanged here.

Inside WMLA the runtime imports kernel.py, calls `on_kernel_start` once, hands calls to `on_task_invoke`
(several tasks chained through `next()` when the profile's `task_batch_size` > 1) and `on_kernel_shutdown`
at the end. Here `Kernel.run()` does the same behind a real HTTP endpoint (`engine.edi.standin.server`).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ...checkout import PROJECT_ROOT
from ...settings import process_environment
from .tasks import KernelContext, TaskContext, chain_tasks, start_kernel

__all__ = ["Kernel", "KernelContext", "TaskContext", "chain_tasks", "load_kernel", "start_kernel"]

edi_log = logging.getLogger("edi.kernel")  # not under "engine": the engine's records reach kernels by handler


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
        environment = process_environment()  # `python kernel.py` is an entry point
        model_json = Path(environment.get("DEEPLIIF_MODEL_JSON", PROJECT_ROOT / "model.json"))
        serve_kernel(self, model_json.read_text() if model_json.is_file() else "{}",
                     host=environment.get("DEEPLIIF_HOST", "127.0.0.1"),
                     port=int(environment.get("DEEPLIIF_PORT", "8000")))


def load_kernel(path: Path) -> Kernel:
    """Import a kernel file (kernel.py) and instantiate its Kernel subclass, as EDI does."""
    spec = importlib.util.spec_from_file_location("edi_kernel", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot import kernel file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Kernel) and v is not Kernel]
    if len(classes) != 1:
        raise TypeError(f"{path} must define exactly one Kernel subclass; found {[c.__name__ for c in classes]}")
    return classes[0]()
