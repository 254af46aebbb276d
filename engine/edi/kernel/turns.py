"""Turns on the engine: one backend call at a time (the GPU is this kernel's alone), and a waiting
synchronous request goes before async work at every tile batch, so it waits for at most the batch
already running, never for a whole async job."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import numpy as np

Run = Callable[[np.ndarray], dict[str, np.ndarray]]


class EngineTurns:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy = False
        self._sync_waiting = 0

    @contextlib.contextmanager
    def turn(self, sync: bool) -> Iterator[None]:
        with self._changed:
            self._sync_waiting += sync
            try:
                while self._busy or (not sync and self._sync_waiting):
                    self._changed.wait()
            finally:
                self._sync_waiting -= sync
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()

    def taking_turns(self, run: Run, sync: bool) -> Run:
        """`run` that takes a turn for each tile batch."""
        def run_in_turn(batch: np.ndarray) -> dict[str, np.ndarray]:
            with self.turn(sync):
                return run(batch)
        return run_in_turn
