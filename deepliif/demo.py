"""Writing a DeepLIIF model directory with seeded random weights, in either layout.

For plumbing and speed measurements only: the networks are the real, full-size architecture, but the
weights are random, so the images and counts mean nothing. The TorchScript layout is written the way
DeepLIIF's serializer writes a release (running statistics removed, then traced); the checkpoint layout
the way training saves state dicts.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from . import logger
from .errors import ArgumentError
from .model_dir import MODALITIES, Layout
from .networks import (
    NormMode, Padding, ResnetSpec, TileNorm, UnetSpec, build_generator, drop_running_stats, set_norm_mode,
)
from .pipeline import NETWORK_TILE

TRANSLATION_NAMES = tuple(f"G{i}" for i in range(1, len(MODALITIES) + 1))
SEGMENTATION_NAMES = tuple(f"G5{i}" for i in range(1, len(MODALITIES) + 2))


def _option_text(layout: Layout, ngf: int, padding: Padding, dropout: bool) -> str:
    era = "targets_no: 5" if layout is Layout.TORCHSCRIPT else "modalities_no: 4"
    lines = [
        "name: 'demo-random-weights'", "model: 'DeepLIIF'", "netG: 'resnet_9blocks'", "net_gs: 'unet_512'",
        f"ngf: {ngf}", "norm: 'batch'", "input_nc: 3", "output_nc: 3", "upsample: 'convtranspose'",
        f"padding: '{padding.value}'", f"no_dropout: {not dropout}", era,
    ]
    banner = "----------------- Options ---------------"
    return "\n".join([banner, *lines, "----------------- End -------------------", ""])


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """DeepLIIF's `normal` init (conv N(0, 0.02), norm weight N(1, 0.02)), seeded."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, TileNorm):
                layer.weight.normal_(1.0, 0.02, generator=generator)
                layer.bias.zero_()
            elif isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                layer.weight.normal_(0.0, 0.02, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()


def write_demo_model(out_dir: str | Path, layout: Layout = Layout.TORCHSCRIPT, ngf: int = 64,
                     seed: int = 0) -> Path:
    """Create `out_dir` (absent or empty) holding a complete DeepLIIF directory; returns its path."""
    if isinstance(ngf, bool) or not isinstance(ngf, int) or not 1 <= ngf <= 256:
        raise ArgumentError(f"ngf must be an integer from 1 to 256; got {ngf!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArgumentError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    padding, dropout = (Padding.ZERO, True) if layout is Layout.TORCHSCRIPT else (Padding.REFLECT, False)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "train_opt.txt").write_text(_option_text(layout, ngf, padding, dropout))
        rng = torch.Generator().manual_seed(seed)
        specs = [(n, ResnetSpec(ngf, padding, dropout)) for n in TRANSLATION_NAMES]
        specs += [(n, UnetSpec(ngf, dropout)) for n in SEGMENTATION_NAMES]
        for name, spec in specs:
            module = build_generator(spec).eval()
            _randomise(module, rng)
            _save(module, staging / layout.file_name(name), layout)
            logger.info("wrote %s", layout.file_name(name))
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _save(module: torch.nn.Module, path: Path, layout: Layout) -> None:
    if layout is Layout.CHECKPOINT:
        torch.save(module.state_dict(), path)
        return
    drop_running_stats(module)
    set_norm_mode(module, NormMode.BATCH)
    example = torch.zeros(1, 3, NETWORK_TILE, NETWORK_TILE)
    with torch.no_grad(), warnings.catch_warnings():
        # BatchNorm's batch-size check is Python control flow; tracing warns about it, harmlessly here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(path))
