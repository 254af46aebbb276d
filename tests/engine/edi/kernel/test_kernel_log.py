"""The project's log records reach the kernel's WMLA console through a logging.Handler, once."""
from __future__ import annotations

import logging

import pytest

from deepliif.logs import project_logger
from engine.edi.kernel.kernel_log import attach_kernel_log, detach_kernel_log


class RecordingKernel:
    def __init__(self) -> None:
        self.info: list[str] = []
        self.error: list[str] = []

    def log_info(self, *message: object) -> None:
        self.info.append(" ".join(map(str, message)))
        project_logger("engine").info("echo of %s", message)  # a kernel whose own log feeds back

    def log_error(self, *message: object) -> None:
        self.error.append(" ".join(map(str, message)))


def test_engine_records_go_to_log_info_and_log_error_and_stop_when_detached() -> None:
    kernel = RecordingKernel()
    handler = attach_kernel_log(kernel)
    try:
        project_logger("engine").info("kernel ready in %.1f s", 1.25)
        project_logger("engine").error("request %s failed", "r1")
        project_logger("engine").debug("not shown")
    finally:
        detach_kernel_log(handler)
    project_logger("engine").info("after detach")
    assert kernel.info == ["kernel ready in 1.2 s"]  # the echo was not forwarded again
    assert kernel.error == ["request r1 failed"]


def test_every_floor_reaches_the_console_once(caplog: pytest.LogCaptureFixture) -> None:
    """Export's plan-build notice, calibration's ungated-graph warning and the model floor's slide
    lines all reach WMLA's console; none is printed a second time by the process's root handlers."""
    kernel = RecordingKernel()
    caplog.set_level(logging.INFO)
    handler = attach_kernel_log(kernel)
    try:
        project_logger("export").warning("building a TensorRT plan; this takes minutes")
        project_logger("calibration").warning("serving an ungated graph")
        project_logger("deepliif").info("resuming at row 8992")
    finally:
        detach_kernel_log(handler)
    assert kernel.info == ["building a TensorRT plan; this takes minutes", "serving an ungated graph",
                           "resuming at row 8992"]
    assert not [r for r in caplog.records if r.name.startswith("deepliif_engine")]  # not also on the root
    project_logger("export").warning("after detach")
    assert [r.getMessage() for r in caplog.records] == ["after detach"]
