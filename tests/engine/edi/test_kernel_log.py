"""The engine's log records reach the kernel's WMLA console through a logging.Handler."""
from __future__ import annotations

import logging

from engine.edi.kernel_log import attach_kernel_log, detach_kernel_log


class RecordingKernel:
    def __init__(self) -> None:
        self.info: list[str] = []
        self.error: list[str] = []

    def log_info(self, *message: object) -> None:
        self.info.append(" ".join(map(str, message)))
        logging.getLogger("engine").info("echo of %s", message)  # a kernel whose own log feeds back

    def log_error(self, *message: object) -> None:
        self.error.append(" ".join(map(str, message)))


def test_engine_records_go_to_log_info_and_log_error_and_stop_when_detached() -> None:
    kernel = RecordingKernel()
    handler = attach_kernel_log(kernel)
    try:
        logging.getLogger("engine").info("kernel ready in %.1f s", 1.25)
        logging.getLogger("engine").error("request %s failed", "r1")
        logging.getLogger("engine").debug("not shown")
    finally:
        detach_kernel_log(handler)
    logging.getLogger("engine").info("after detach")
    assert kernel.info == ["kernel ready in 1.2 s"]  # the echo was not forwarded again
    assert kernel.error == ["request r1 failed"]
