"""Is there a CUDA GPU, asked without importing PyTorch where the answer is plainly no.

Importing torch costs seconds and hundreds of MB; a CPU machine serving an ONNX graph never needs it.
Without an NVIDIA driver (no /dev/nvidiactl, no /proc/driver/nvidia) there is no CUDA device to find.
"""
from __future__ import annotations

import sys
from pathlib import Path

NVIDIA_DRIVER_PATHS = (Path("/dev/nvidiactl"), Path("/proc/driver/nvidia"))


def cuda_available() -> bool:
    if "torch" not in sys.modules and not any(p.exists() for p in NVIDIA_DRIVER_PATHS):
        return False
    import torch
    return torch.cuda.is_available()


def free_cuda_memory(device: int = 0) -> int:
    import torch
    return torch.cuda.mem_get_info(device)[0]


# CUDA runtime errors that the CUDA documentation calls sticky ("the process must be terminated and
# relaunched"): after one, every later CUDA call in the process fails, whatever library makes it. Matched
# by the runtime's own error strings, as PyTorch, ONNX Runtime and TensorRT pass them on.
STICKY_CUDA_ERRORS = ("an illegal memory access was encountered", "device-side assert triggered",
                      "unspecified launch failure", "misaligned address", "an illegal instruction was encountered",
                      "uncorrectable ecc error", "hardware stack error", "invalid program counter",
                      "cudaerrorillegaladdress", "cudaerrorlaunchfailure", "cudaerrorassert")


def is_sticky_cuda_fault(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a CUDA fault that poisons the process's CUDA context."""
    while error is not None:
        if any(text in str(error).lower() for text in STICKY_CUDA_ERRORS):
            return True
        error = error.__cause__ or error.__context__
    return False
