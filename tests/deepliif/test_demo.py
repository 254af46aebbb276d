from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepliif.demo import write_demo_model
from deepliif.errors import ArgumentError
from deepliif.model_dir import Layout, load_model_dir


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = write_demo_model(tmp_path / "a", Layout.CHECKPOINT, ngf=2, seed=3)
    b = write_demo_model(tmp_path / "b", Layout.CHECKPOINT, ngf=2, seed=3)
    c = write_demo_model(tmp_path / "c", Layout.CHECKPOINT, ngf=2, seed=4)
    weights = [torch.load(p / "latest_net_G51.pth", weights_only=True)["model.model.0.weight"] for p in (a, b, c)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_torchscript_layout_mimics_a_release(generated_models: dict[Layout, Path]) -> None:
    path = generated_models[Layout.TORCHSCRIPT]
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["train_opt.txt"] + [f"G{i}.pt" for i in range(1, 5)] + [f"G5{i}.pt" for i in range(1, 6)])
    assert "targets_no: 5" in (path / "train_opt.txt").read_text()
    state = torch.jit.load(str(path / "G1.pt")).state_dict()
    assert not any("running_mean" in k for k in state)  # removed before tracing, as DeepLIIF does


def test_refuses_a_non_empty_directory_and_bad_ngf(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ArgumentError, match="not an empty directory"):
        write_demo_model(tmp_path / "taken", ngf=2)
    with pytest.raises(ArgumentError, match="ngf"):
        write_demo_model(tmp_path / "new", ngf=0)
    assert not (tmp_path / "new").exists()


def test_full_size_demo_model_keys(tmp_path: Path) -> None:
    """ngf 64 builds on the meta device so the test stays fast; the writer is the same code path."""
    from deepliif.networks import ResnetGenerator, ResnetSpec
    with torch.device("meta"):
        assert sum(p.numel() for p in ResnetGenerator(ResnetSpec(ngf=64)).parameters()) > 10_000_000
    model = load_model_dir(write_demo_model(tmp_path / "m", Layout.TORCHSCRIPT, ngf=3))
    assert model.generators["G55"].spec.ngf == 3
