"""The task side of WMLA EDI's `redhareapi`, as the local stand-in offers it: the contexts a kernel is
handed and how a call's tasks are chained. The HTTP server (`server.py`) and the kernel base class
(`runtime.py`) both build on this module, so neither imports the other at import time.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ...settings import process_environment
from ..kernel.settings import model_environment


class KernelCallbacks(Protocol):
    def on_kernel_start(self, kernel_context: KernelContext) -> None: ...

    def on_task_invoke(self, task_context: TaskContext) -> None: ...

    def on_kernel_shutdown(self) -> None: ...


class KernelContext:
    """`environment` is the stand-in's addition: the kernel's settings as a mapping (model.json's
    mk_environments under the process environment or the given overrides), so the local server never
    rewrites the process environment. Inside WMLA a kernel reads the process environment, where EDI has put
    mk_environments."""

    def __init__(self, model_description: str, environment: Mapping[str, str] | None = None) -> None:
        self._model_description = model_description
        self.environment = {**model_environment(model_description),
                            **(process_environment() if environment is None else environment)}

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


def start_kernel(kernel: KernelCallbacks, model_description: str,
                 environment: Mapping[str, str] | None = None) -> None:
    """What EDI does at kernel start: hand the kernel its description and settings, then call it."""
    kernel.on_kernel_start(KernelContext(model_description, environment))
