"""The one interface every backend offers: load once, then `run(uint8 NHWC batch) -> {name: uint8 NHWC}`.

As in Polygraphy's runners, the public `run` validates the batch and the backend's batch limits, and the
subclass only implements `run_impl`; a backend is a context manager so device memory is released
deterministically (the EDI kernel's shutdown, the bench's sweep).
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass

import numpy as np

from deepliif.errors import ArgumentError
from deepliif.contract import OUTPUT_NAMES, check_tile_batch

from engine.backends.precision import Precision


@dataclass(frozen=True)
class BackendInfo:
    """What a loaded backend is: for logs, bench tables and the kernel's start-up report."""

    name: str
    device: str
    precision: Precision
    max_batch: int | None  # None: no limit but memory
    detail: str = ""
    tf32: bool | None = None  # whether fp32 maths may round to TF32 on the device; None: no such switch (CPU)
    engine_cache: str | None = None  # where compiled engines live (a plan's cache entry, the TensorRT EP's folder)

    def as_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision.value}


class Backend(abc.ABC):
    """A live inference session on one device. Subclasses set `info` in their constructor, and
    `output_names` where they give more than the fused graph's five outputs."""

    info: BackendInfo
    output_names: tuple[str, ...] = OUTPUT_NAMES

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        check_tile_batch(batch)
        limit = self.info.max_batch
        if limit is not None and len(batch) > limit:
            raise ArgumentError(f"{self.info.name} backend takes at most {limit} tiles per call; "
                                f"got {len(batch)}")
        return self.run_impl(batch)

    @abc.abstractmethod
    def run_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a checked batch; return every output as uint8 [B, 512, 512, 3] keyed by `output_names`."""

    def close(self) -> None:
        """Release device memory and sessions; safe to call twice."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
