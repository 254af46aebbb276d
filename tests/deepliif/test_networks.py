from __future__ import annotations

import json
from pathlib import Path

import torch

from deepliif.networks import (
    NormMode, Padding, ResnetGenerator, ResnetSpec, TileNorm, UnetGenerator, UnetSpec, set_norm_mode,
)


def _variants(fixtures: Path) -> dict[str, dict[str, list[int]]]:
    return json.loads((fixtures / "state_dict_manifests.json").read_text())


def _build(variant: str) -> torch.nn.Module:
    arch, padding, dropout = variant.split("|")
    with_dropout = dropout == "dropout=True"
    if arch == "resnet_9blocks":
        return ResnetGenerator(ResnetSpec(64, Padding(padding.split("=")[1]), with_dropout))
    return UnetGenerator(UnetSpec(64, with_dropout))


def test_full_size_manifests_match_keys_and_shapes(deepliif_fixtures: Path) -> None:
    manifests = _variants(deepliif_fixtures)
    assert len(manifests) == 6
    for variant, manifest in manifests.items():
        with torch.device("meta"):
            module = _build(variant)
        ours = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert ours == manifest, variant


def test_full_size_manifest_state_dict_loads_strictly(deepliif_fixtures: Path) -> None:
    manifest = _variants(deepliif_fixtures)["resnet_9blocks|padding=reflect|dropout=True"]
    state = {k: torch.zeros(shape) if shape else torch.tensor(0) for k, shape in manifest.items()}
    result = _build("resnet_9blocks|padding=reflect|dropout=True").load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_unet_skip_carries_activated_input() -> None:
    """The original in-place LeakyReLU mutates the block input: the skip half must be leaky_relu(x)."""
    torch.manual_seed(0)
    net = UnetGenerator(UnetSpec(ngf=2)).eval()
    block = net.model.model[1]  # second level: receives the outermost down-conv output
    x = torch.randn(1, 2, 256, 256) * 3
    out = block(x)
    assert out.shape == (1, 4, 256, 256)
    assert torch.equal(out[:, :2], torch.nn.functional.leaky_relu(x, 0.2))
    assert (x < 0).any(), "input must keep negative values: the block must not mutate it"


def test_per_sample_norm_is_batch_independent_and_batch_mode_is_not() -> None:
    norm = TileNorm(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8) * 5 + 2
    alone = norm(a)
    assert torch.allclose(norm(torch.cat([a, b]))[:1], alone, atol=1e-6)
    set_norm_mode(norm, NormMode.BATCH)
    assert torch.allclose(norm(a), alone, atol=1e-5)  # one tile: its own statistics
    assert not torch.allclose(norm(torch.cat([a, b]))[:1], alone, atol=1e-2)  # leaks across the batch


def test_per_sample_norm_keeps_reductions_in_fp32() -> None:
    norm = TileNorm(2)
    x = torch.randn(2, 2, 256, 256) * 300
    assert torch.allclose(norm(x.half()).float(), norm(x), atol=2e-2)
    assert norm(x.half()).dtype == torch.float16


def test_running_mode_uses_stored_statistics() -> None:
    norm = TileNorm(1)
    norm.running_mean.fill_(2.0)
    norm.running_var.fill_(4.0)
    set_norm_mode(norm, NormMode.RUNNING)
    x = torch.full((1, 1, 2, 2), 4.0)
    assert torch.allclose(norm(x), torch.full_like(x, 2.0 / (4.0 + 1e-5) ** 0.5))
