"""The project's one logger tree: every module logs under `deepliif_engine.<floor>`, so one handler (the
WMLA kernel's console, the CLI's `-q`) governs all of them: the model floor, the engine, export and
calibration alike."""
from __future__ import annotations

import logging

LOG_ROOT = "deepliif_engine"


def project_logger(floor: str) -> logging.Logger:
    """The logger of one floor of the project (`deepliif`, `engine`, `export`, `calibration`)."""
    return logging.getLogger(f"{LOG_ROOT}.{floor}")
