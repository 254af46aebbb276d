"""The WMLA EDI kernel for DeepLIIF: request → engine → response.

Thin on purpose: EDI calls it, `engine.edi.kernel.service.EdiService` does the work (contract in
README.md). Inside WMLA `redhareapi` is present; anywhere else the project's stand-in with the same names
is used, so this file runs unchanged (`python kernel.py`, or `deepliif-engine serve`).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the submission folder holds the packages

try:
    import redhareapiversion  # noqa: F401 - EDI wants it imported before redhareapi
    from redhareapi import Kernel
except ImportError:
    from engine.edi.standin.runtime import Kernel

from deepliif.workers import keep_freed_memory
from engine.edi.kernel.answers import error_json
from engine.edi.kernel.kernel_log import attach_kernel_log, detach_kernel_log
from engine.edi.kernel.service import EdiService
from engine.edi.kernel.settings import KernelSettings
from engine.settings import process_environment


class DeepLIIFKernel(Kernel):
    service: EdiService | None = None

    def on_kernel_start(self, kernel_context) -> None:
        # the local stand-in hands settings over as a mapping; inside WMLA, EDI has put them in os.environ
        environ = getattr(kernel_context, "environment", None) or process_environment()
        settings = KernelSettings.from_environment(environ, kernel_context.get_model_description())
        keep_freed_memory()  # large per-image temporaries reused, not faulted in afresh per request
        self._log_handler = attach_kernel_log(self)
        self.log_info(f"starting DeepLIIF kernel: model {settings.model_dir}, backend {settings.backend}, "
                      f"precision {settings.precision}")
        self.service = EdiService(settings)

    def on_task_invoke(self, task_context) -> None:
        tasks = []
        while task_context is not None:
            tasks.append(task_context)
            task_context = task_context.next()
        try:
            responses = self.service.handle([t.get_input_data() for t in tasks])
        except Exception as exc:  # noqa: BLE001 - handle() answers per request; this is the last resort
            self.log_error(f"kernel cannot serve: {type(exc).__name__}: {exc}")
            responses = [error_json(f"kernel cannot serve: {exc}")] * len(tasks)
        for task, response in zip(tasks, responses):
            task.set_output_data(response)

    def on_kernel_shutdown(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None
        self.log_info("DeepLIIF kernel stopped")
        detach_kernel_log(getattr(self, "_log_handler", None))


if __name__ == "__main__":
    DeepLIIFKernel().run()
