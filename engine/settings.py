"""The process environment, read in one place.

Entry points (the command line, kernel.py, Triton's Python-backend model, the stand-in's `python kernel.py`)
take `process_environment()` once and hand it to the settings and defaults that need it
(`KernelSettings.from_environment`, `default_cache_dir`, `sample_dir`, `cpd_from_environment`); library code
never reads the environment itself, so what a run was configured with is what its entry point passed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping


def process_environment() -> Mapping[str, str]:
    """This process's environment variables (live: a later change shows)."""
    return os.environ


def writable_process_environment() -> MutableMapping[str, str]:
    """For the one entry point that must narrow its own process before CUDA starts (a Triton GPU instance)."""
    return os.environ
