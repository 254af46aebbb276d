"""DeepLIIF's generators, rebuilt with state-dict keys identical to the originals.

Two architectures: the ResNet-9 translation generators (IHC -> Hema, DAPI, Lap2, Marker) and the U-Net-512
segmentation generators. Layer order inside each `nn.Sequential` is the original one, because the
state-dict keys are positional (`model.10.conv_block.5.weight`); that is also why dropout layers, inert at
inference, are still built where the original had them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class NormMode(enum.Enum):
    """Which statistics the BatchNorm layers normalise with at inference."""

    PER_SAMPLE = "per-sample"  # DeepLIIF's inference: statistics of each input tile (batch-safe)
    BATCH = "batch"  # the original modules' behaviour: statistics of the whole batch (leaks across tiles)
    RUNNING = "running"  # stored running statistics (a serialized graph that kept them)


class Padding(enum.Enum):
    ZERO = "zero"
    REFLECT = "reflect"


class TileNorm(nn.BatchNorm2d):
    """A BatchNorm2d (same parameters and state-dict keys) whose statistics source is a `NormMode`.

    DeepLIIF removes the running statistics at inference, so each tile is normalised with its own
    statistics; for a batch of tiles that is instance normalisation with the BatchNorm's affine weights.
    Reductions stay in fp32 whatever the activation dtype, because fp16 variance over 512x512 overflows.
    """

    def __init__(self, num_features: int, mode: NormMode = NormMode.PER_SAMPLE) -> None:
        super().__init__(num_features)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32, weight, bias = (_as_fp32(t) for t in (x, self.weight, self.bias))
        if self.mode is NormMode.PER_SAMPLE:
            y = F.instance_norm(x32, weight=weight, bias=bias, eps=self.eps)
        elif self.mode is NormMode.BATCH:
            y = F.batch_norm(x32, None, None, weight, bias, True, 0.0, self.eps)
        else:
            if self.running_mean is None or self.running_var is None:
                raise RuntimeError("TileNorm in RUNNING mode has no running statistics")
            y = F.batch_norm(x32, self.running_mean.float(), self.running_var.float(), weight, bias,
                             False, 0.0, self.eps)
        return _as_dtype(y, dtype)


def _as_fp32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A cast only where one is needed, so an exported fp32 graph carries no no-op Cast nodes."""
    return _as_dtype(tensor, torch.float32)


def _as_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if tensor is None or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def set_norm_mode(module: nn.Module, mode: NormMode) -> None:
    """Switch every TileNorm inside `module` to `mode`."""
    for layer in module.modules():
        if isinstance(layer, TileNorm):
            layer.mode = mode


def drop_running_stats(module: nn.Module) -> None:
    """Remove running statistics, as DeepLIIF's serializer does before tracing."""
    for layer in module.modules():
        if isinstance(layer, TileNorm):
            layer.running_mean = None
            layer.running_var = None


@dataclass(frozen=True)
class ResnetSpec:
    """What a ResNet-9 generator's weights say about it."""

    ngf: int = 64
    padding: Padding = Padding.ZERO
    dropout: bool = False
    input_nc: int = 3
    output_nc: int = 3

    def describe(self) -> str:
        return (f"resnet_9blocks ngf={self.ngf} padding={self.padding.value} "
                f"dropout_layers={self.dropout}")


@dataclass(frozen=True)
class UnetSpec:
    """What a U-Net-512 generator's weights say about it (dropout does not change its keys)."""

    ngf: int = 64
    dropout: bool = False
    input_nc: int = 3
    output_nc: int = 3

    def describe(self) -> str:
        return f"unet_512 ngf={self.ngf} dropout_layers={self.dropout}"


def _pad_layer(padding: Padding, size: int) -> nn.Module:
    return nn.ReflectionPad2d(size) if padding is Padding.REFLECT else nn.ZeroPad2d(size)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, padding: Padding, dropout: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for first in (True, False):
            conv_padding = 1
            if padding is Padding.REFLECT:
                layers.append(nn.ReflectionPad2d(1))
                conv_padding = 0
            layers += [nn.Conv2d(dim, dim, 3, padding=conv_padding, bias=False), TileNorm(dim)]
            if first:
                layers.append(nn.ReLU(True))
                if dropout:
                    layers.append(nn.Dropout(0.5))
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """7x7 conv in, two stride-2 downsamplings, 9 residual blocks, two transposed-conv upsamplings, Tanh."""

    def __init__(self, spec: ResnetSpec = ResnetSpec()) -> None:
        super().__init__()
        ngf = spec.ngf
        layers: list[nn.Module] = [
            _pad_layer(spec.padding, 3),
            nn.Conv2d(spec.input_nc, ngf, 7, bias=False), TileNorm(ngf), nn.ReLU(True),
        ]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=False),
                       TileNorm(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, spec.padding, spec.dropout) for _ in range(9)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                          output_padding=1, bias=False),
                       TileNorm(ngf * mult // 2), nn.ReLU(True)]
        layers += [_pad_layer(spec.padding, 3), nn.Conv2d(ngf, spec.output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetBlock(nn.Module):
    """One U-Net level: down, the inner levels, up, and (except outermost) the skip concatenation.

    The original block starts with an in-place LeakyReLU, which mutates the block's input, so the skip
    connection carries the *activated* input. This block computes that activation once, explicitly, and
    concatenates it.
    """

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None,
                 inner: UnetBlock | None = None, outermost: bool = False, dropout: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        input_nc = outer_nc if input_nc is None else input_nc
        down = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=False)
        if outermost:
            layers = [down, inner, nn.ReLU(True),
                      nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1), nn.Tanh()]
        elif inner is None:  # innermost
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(True),
                      nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=False),
                      TileNorm(outer_nc)]
        else:
            layers = [nn.LeakyReLU(0.2), down, TileNorm(inner_nc), inner, nn.ReLU(True),
                      nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=False),
                      TileNorm(outer_nc)]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        activated = self.model[0](x)
        h = activated
        for layer in list(self.model)[1:]:
            h = layer(h)
        return torch.cat([activated, h], 1)


class UnetGenerator(nn.Module):
    """U-Net with 9 downsamplings (`unet_512`): 512x512 in, 1x1 at the bottleneck."""

    def __init__(self, spec: UnetSpec = UnetSpec()) -> None:
        super().__init__()
        ngf = spec.ngf
        block = UnetBlock(ngf * 8, ngf * 8)
        for _ in range(4):
            block = UnetBlock(ngf * 8, ngf * 8, inner=block, dropout=spec.dropout)
        for mult in (4, 2, 1):
            block = UnetBlock(ngf * mult, ngf * mult * 2, inner=block)
        self.model = UnetBlock(spec.output_nc, ngf, input_nc=spec.input_nc, inner=block, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


Generator = ResnetGenerator | UnetGenerator
GeneratorSpec = ResnetSpec | UnetSpec


def build_generator(spec: GeneratorSpec) -> Generator:
    return ResnetGenerator(spec) if isinstance(spec, ResnetSpec) else UnetGenerator(spec)
