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
