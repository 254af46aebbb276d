"""Loading a DeepLIIF model directory, in either layout users have.

- a released, serialized directory: TorchScript `G1.pt ... G4.pt, G51.pt ... G55.pt`
- a training checkpoint directory: state dicts `latest_net_G1.pth ...`

The architecture of each generator is inferred from its weights (padding and dropout layers shift the
positional keys), checked against `train_opt.txt`, and rebuilt as plain modules so that tiles can be
batched with per-sample normalisation. Generator names are derived here, once, from the files present.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import logger
from .contract import MODALITIES
from .errors import ModelDirError, UnsupportedModelError, WeightsMismatchError
from .imageio import RememberedDigests
from .model_files import GeneratorNames, Layout, ModelFiles, detect_layout, read_model_files
from .networks import (
    Generator, GeneratorSpec, NormMode, Padding, ResnetSpec, UnetSpec, build_generator, set_norm_mode,
)
from .options import OPTION_FILE, TrainOptions

__all__ = ["MODALITIES", "DeepLIIFModel", "GeneratorNames", "Layout", "LoadedGenerator", "ModelFiles",
           "detect_layout", "load_model_dir", "read_model_files"]
_RUNNING_STATS = ("running_mean", "running_var")


@dataclass
class LoadedGenerator:
    name: str
    spec: GeneratorSpec
    module: Generator
    norm_mode: NormMode
    path: Path


@dataclass
class DeepLIIFModel:
    """A DeepLIIF model directory, loaded: options, the role of each generator, and the modules."""

    directory: Path
    options: TrainOptions
    layout: Layout
    names: GeneratorNames
    generators: dict[str, LoadedGenerator]

    def module(self, name: str) -> Generator:
        return self.generators[name].module

    @property
    def translators(self) -> list[Generator]:
        return [self.module(n) for n in self.names.translation]

    @property
    def segmenters(self) -> list[Generator]:
        return [self.module(n) for n in self.names.segmentation]

    def describe(self) -> str:
        first_t = self.generators[self.names.translation[0]]
        first_s = self.generators[self.names.segmentation[0]]
        modes = sorted({g.norm_mode.value for g in self.generators.values()})
        return (f"{self.directory}: {self.layout.value} layout; translation {','.join(self.names.translation)}"
                f" = {first_t.spec.describe()}; segmentation {','.join(self.names.segmentation)} = "
                f"{first_s.spec.describe()}; normalisation {'/'.join(modes)}")

    def weights_sha256(self, memo: RememberedDigests | None = None) -> str:
        """The model's identity (see `ModelFiles.weights_sha256`)."""
        files = {name: generator.path for name, generator in self.generators.items()}
        return ModelFiles(self.directory, self.options, self.layout, self.names, files).weights_sha256(memo)

    def to(self, device: torch.device | str) -> DeepLIIFModel:
        for generator in self.generators.values():
            generator.module.to(device)
        return self


def load_model_dir(model_dir: str | Path, device: torch.device | str = "cpu") -> DeepLIIFModel:
    """Load every generator of a DeepLIIF directory and report what was found."""
    found = read_model_files(model_dir)
    directory, options, layout, names = found.directory, found.options, found.layout, found.names
    generators = {}
    for name in names.all:
        is_translation = name in names.translation
        generators[name] = _load_generator(name, found.files[name], layout, options, is_translation)
    _check_uniform(generators, names, directory)
    model = DeepLIIFModel(directory, options, layout, names, generators).to(device)
    logger.info("loaded %s", model.describe())
    return model


def _load_generator(name: str, path: Path, layout: Layout, options: TrainOptions,
                    is_translation: bool) -> LoadedGenerator:
    if layout is Layout.TORCHSCRIPT:
        state, norm_mode = _read_torchscript(path)
    else:
        state, norm_mode = _read_checkpoint(path), NormMode.PER_SAMPLE
    spec = infer_resnet_spec(state, path) if is_translation else infer_unet_spec(state, path, options)
    _warn_option_mismatch(spec, options, path)
    module = build_generator(spec)
    load_weights(module, state, norm_mode, path)
    set_norm_mode(module, norm_mode)
    module.eval()
    return LoadedGenerator(name, spec, module, norm_mode, path)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise ModelDirError(f"{path} is not a readable PyTorch state dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelDirError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _read_torchscript(path: Path) -> tuple[dict[str, torch.Tensor], NormMode]:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit raises RuntimeError/ValueError variants for foreign files
        raise ModelDirError(f"{path} is not a readable TorchScript file: {exc}") from exc
    return dict(module.state_dict()), torchscript_norm_mode(module, path)


def torchscript_norm_mode(module: torch.jit.ScriptModule, path: Path) -> NormMode:
    """Tell from the serialized graph which statistics its BatchNorm layers use.

    DeepLIIF's serializer removes running statistics before tracing, which bakes `training=True` into
    every `aten::batch_norm` call; another serializer may keep `training=False` and running statistics.
    """
    flags = set()
    for node in module.inlined_graph.nodes():
        if node.kind() == "aten::batch_norm":
            flags.add(node.inputsAt(5).toIValue())
        elif node.kind() == "aten::instance_norm":
            flags.add(True)
    if flags == {False}:
        return NormMode.RUNNING
    if flags <= {True}:
        return NormMode.PER_SAMPLE
    raise UnsupportedModelError(f"{path}: its BatchNorm layers mix running and per-input statistics")


def infer_resnet_spec(state: dict[str, torch.Tensor], path: Path) -> ResnetSpec:
    """Padding and dropout layers shift the residual block's positional keys; read them back."""
    first = state.get("model.1.weight")
    if first is None or first.ndim != 4 or "model.26.weight" not in state:
        raise WeightsMismatchError(f"{path}: not a resnet_9blocks generator (no model.1/model.26 conv weights)")

    def conv_at(index: int) -> bool:
        tensor = state.get(f"model.10.conv_block.{index}.weight")
        return tensor is not None and tensor.ndim == 4

    if conv_at(1):
        padding, dropout = Padding.REFLECT, conv_at(6)
    elif conv_at(0):
        padding, dropout = Padding.ZERO, conv_at(4)
    else:
        raise WeightsMismatchError(f"{path}: residual block layout not recognised (model.10.conv_block.*)")
    return ResnetSpec(ngf=first.shape[0], padding=padding, dropout=dropout,
                      input_nc=first.shape[1], output_nc=state["model.26.weight"].shape[0])


def infer_unet_spec(state: dict[str, torch.Tensor], path: Path, options: TrainOptions) -> UnetSpec:
    first = state.get("model.model.0.weight")
    last = state.get("model.model.3.weight")
    if first is None or last is None or first.ndim != 4 or last.ndim != 4:
        raise WeightsMismatchError(f"{path}: not a unet_512 generator (no model.model.0/model.model.3 weights)")
    return UnetSpec(ngf=first.shape[0], dropout=not options.no_dropout,
                    input_nc=first.shape[1], output_nc=last.shape[1])


def load_weights(module: Generator, state: dict[str, torch.Tensor], norm_mode: NormMode, path: Path) -> None:
    """Load strictly, but accept what DeepLIIF's serializer leaves out (running statistics).

    Every problem is collected first and reported in one error that names the file.
    """
    expected = module.state_dict()
    optional = set()
    if norm_mode is not NormMode.RUNNING:
        optional = {k for k in expected if k.rsplit(".", 1)[-1] in _RUNNING_STATS + ("num_batches_tracked",)}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs architecture {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("wrong shapes", wrong)) if items]
        raise WeightsMismatchError(f"{path}: weights do not fit the inferred architecture; " + "; ".join(parts))
    merged = {k: state.get(k, v) for k, v in expected.items()}
    module.load_state_dict(merged, strict=True)


def _warn_option_mismatch(spec: GeneratorSpec, options: TrainOptions, path: Path) -> None:
    if spec.ngf != options.ngf:
        logger.warning("%s: weights have ngf=%d but %s says %d; using the weights", path, spec.ngf,
                       OPTION_FILE, options.ngf)
    if isinstance(spec, ResnetSpec):
        if spec.padding.value != options.padding:
            logger.warning("%s: weights use %s padding but %s says %r; using the weights", path,
                           spec.padding.value, OPTION_FILE, options.padding)
        if spec.dropout == options.no_dropout:
            logger.warning("%s: dropout layers %s in weights but no_dropout=%s in %s; using the weights",
                           path, "present" if spec.dropout else "absent", options.no_dropout, OPTION_FILE)


def _check_uniform(generators: dict[str, LoadedGenerator], names: GeneratorNames, where: Path) -> None:
    """The fused pipeline feeds one generator's output to another: all must agree on channels."""
    for name in names.all:
        spec = generators[name].spec
        if spec.input_nc != 3 or spec.output_nc != 3:
            raise UnsupportedModelError(
                f"{where}: generator {name} maps {spec.input_nc} to {spec.output_nc} channels; "
                "DeepLIIF generators map RGB to RGB")
