"""The project's log records on the kernel's own log: WMLA shows what a kernel passes to `log_info` /
`log_error` on its console, so a `logging.Handler` forwards the project's logger tree there (the model
floor, the engine, export and calibration alike) and library code logs as everywhere else (no kernel
object threaded through it). While attached, the tree does not also propagate to the process's root
handlers: each line reaches the operator once, on the kernel's console."""
from __future__ import annotations

import logging
import threading

from deepliif.logs import LOG_ROOT



class KernelLogHandler(logging.Handler):
    """ERROR and above to `log_error`, the rest to `log_info`. A record the kernel's own logging sends
    back into the project's loggers is dropped rather than forwarded again."""

    def __init__(self, kernel, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.kernel = kernel
        self.propagated = True  # the tree's setting before this handler took over
        self._inside = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._inside, "active", False):
            return
        self._inside.active = True
        try:
            forward = self.kernel.log_error if record.levelno >= logging.ERROR else self.kernel.log_info
            forward(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never fail a request
            self.handleError(record)
        finally:
            self._inside.active = False


def attach_kernel_log(kernel) -> KernelLogHandler:
    logger = logging.getLogger(LOG_ROOT)
    handler = KernelLogHandler(kernel)
    handler.propagated = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # the kernel's console shows the project's INFO records
    return handler


def detach_kernel_log(handler: KernelLogHandler | None) -> None:
    if handler is not None:
        logger = logging.getLogger(LOG_ROOT)
        logger.removeHandler(handler)
        logger.propagate = handler.propagated
