"""The engine's log records on the kernel's own log: WMLA shows what a kernel passes to `log_info` /
`log_error` on its console, so a `logging.Handler` forwards the `engine` logger there and library code
logs as everywhere else (no kernel object threaded through it)."""
from __future__ import annotations

import logging
import threading

ENGINE_LOGGER = "engine"


class KernelLogHandler(logging.Handler):
    """ERROR and above to `log_error`, the rest to `log_info`. A record the kernel's own logging sends
    back into the `engine` logger is dropped rather than forwarded again."""

    def __init__(self, kernel, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.kernel = kernel
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
    logger = logging.getLogger(ENGINE_LOGGER)
    handler = KernelLogHandler(kernel)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # the kernel's console shows the engine's INFO records
    return handler


def detach_kernel_log(handler: KernelLogHandler | None) -> None:
    if handler is not None:
        logging.getLogger(ENGINE_LOGGER).removeHandler(handler)
