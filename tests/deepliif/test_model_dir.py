from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from deepliif.errors import ModelDirError, WeightsMismatchError
from deepliif.model_dir import Layout, load_model_dir
from deepliif.networks import NormMode, Padding, ResnetGenerator, ResnetSpec, TileNorm, UnetSpec, set_norm_mode


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "model"))


def _edit_state(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_fixture_layouts_and_variants(tiny_models: dict[str, Path]) -> None:
    v1, v2 = load_model_dir(tiny_models["tiny-v1"]), load_model_dir(tiny_models["tiny-v2"])
    assert v1.layout is Layout.TORCHSCRIPT and v2.layout is Layout.CHECKPOINT
    assert v1.names.translation == ("G1", "G2", "G3", "G4")
    assert v1.names.segmentation == ("G51", "G52", "G53", "G54", "G55")
    assert v1.generators["G1"].spec == ResnetSpec(ngf=4, padding=Padding.ZERO, dropout=True)
    assert v2.generators["G1"].spec == ResnetSpec(ngf=4, padding=Padding.REFLECT, dropout=False)
    assert v2.generators["G55"].spec == UnetSpec(ngf=4, dropout=False)
    assert {g.norm_mode for g in [*v1.generators.values(), *v2.generators.values()]} == {NormMode.PER_SAMPLE}
    assert "torchscript layout" in v1.describe() and "padding=zero" in v1.describe()


def test_generated_models_load_in_both_layouts(generated_models: dict[Layout, Path]) -> None:
    for layout, path in generated_models.items():
        model = load_model_dir(path)
        assert model.layout is layout
        assert all(g.spec.ngf == 2 for g in model.generators.values())


def test_other_segmentation_names_are_derived_from_files(generated_models: dict[Layout, Path],
                                                         tmp_path: Path) -> None:
    model_dir = _copy(generated_models[Layout.CHECKPOINT], tmp_path)
    for i in range(1, 6):
        (model_dir / f"latest_net_G5{i}.pth").rename(model_dir / f"latest_net_GS{i - 1}.pth")
    assert load_model_dir(model_dir).names.segmentation == ("GS0", "GS1", "GS2", "GS3", "GS4")


def test_missing_translation_weight_file(generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    model_dir = _copy(generated_models[Layout.CHECKPOINT], tmp_path)
    (model_dir / "latest_net_G3.pth").unlink()
    with pytest.raises(ModelDirError, match="missing for G3"):
        load_model_dir(model_dir)


def test_missing_segmentation_weight_file(generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    model_dir = _copy(generated_models[Layout.TORCHSCRIPT], tmp_path)
    (model_dir / "G53.pt").unlink()
    with pytest.raises(ModelDirError, match="expected 5 segmentation generators"):
        load_model_dir(model_dir)


def test_no_weights_at_all(tmp_path: Path) -> None:
    (tmp_path / "train_opt.txt").write_text("model: 'DeepLIIF'\n")
    with pytest.raises(ModelDirError, match="no generator weights found"):
        load_model_dir(tmp_path)


def test_weights_of_the_wrong_shape(generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    model_dir = _copy(generated_models[Layout.CHECKPOINT], tmp_path)
    wrong_shape = {"model.4.weight": torch.zeros(5, 2, 3, 3)}
    _edit_state(model_dir / "latest_net_G2.pth", lambda state: state.update(wrong_shape))
    with pytest.raises(WeightsMismatchError, match=r"latest_net_G2.pth.*wrong shapes.*model.4.weight"):
        load_model_dir(model_dir)


def test_weights_of_the_wrong_variant(generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    model_dir = _copy(generated_models[Layout.CHECKPOINT], tmp_path)
    shutil.copy(model_dir / "latest_net_G51.pth", model_dir / "latest_net_G1.pth")
    with pytest.raises(WeightsMismatchError, match="latest_net_G1.pth: not a resnet_9blocks"):
        load_model_dir(model_dir)


def test_unexpected_and_missing_keys_are_all_reported(generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    model_dir = _copy(generated_models[Layout.CHECKPOINT], tmp_path)

    def add_one_drop_one(state: dict) -> None:
        state["model.extra.weight"] = torch.zeros(1)
        del state["model.model.1.model.2.weight"]

    _edit_state(model_dir / "latest_net_G52.pth", add_one_drop_one)
    with pytest.raises(WeightsMismatchError, match=r"missing keys \(1\).*unexpected keys \(1\): model.extra"):
        load_model_dir(model_dir)


@pytest.mark.parametrize("name", ["latest_net_G4.pth", "G4.pt"])
def test_unreadable_weight_file(generated_models: dict[Layout, Path], tmp_path: Path, name: str) -> None:
    layout = Layout.CHECKPOINT if name.endswith(".pth") else Layout.TORCHSCRIPT
    model_dir = _copy(generated_models[layout], tmp_path)
    (model_dir / name).write_bytes(b"not a model at all")
    with pytest.raises(ModelDirError, match=f"{name} is not a readable"):
        load_model_dir(model_dir)


def test_torchscript_with_running_statistics_is_detected_and_run_that_way(
        generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    model_dir = _copy(generated_models[Layout.TORCHSCRIPT], tmp_path)
    torch.manual_seed(1)
    net = ResnetGenerator(ResnetSpec(ngf=2, padding=Padding.ZERO, dropout=True)).eval()
    for layer in net.modules():
        if isinstance(layer, TileNorm):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    set_norm_mode(net, NormMode.RUNNING)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        expected = traced(x)
    traced.save(str(model_dir / "G1.pt"))
    loaded = load_model_dir(model_dir)
    assert loaded.generators["G1"].norm_mode is NormMode.RUNNING
    assert loaded.generators["G2"].norm_mode is NormMode.PER_SAMPLE
    with torch.no_grad():
        assert torch.allclose(loaded.module("G1")(x), expected, atol=1e-5)


def test_option_and_weight_disagreement_is_reported(generated_models: dict[Layout, Path], tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    model_dir = _copy(generated_models[Layout.CHECKPOINT], tmp_path)
    options = (model_dir / "train_opt.txt").read_text().replace("padding: 'reflect'", "padding: 'zero'")
    (model_dir / "train_opt.txt").write_text(options)
    with caplog.at_level(logging.WARNING, logger="deepliif_engine.deepliif"):
        model = load_model_dir(model_dir)
    assert model.generators["G1"].spec.padding is Padding.REFLECT
    assert "weights use reflect padding" in caplog.text


def test_weights_hash_identifies_the_files(generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    model_dir = _copy(generated_models[Layout.CHECKPOINT], tmp_path)
    before = load_model_dir(model_dir).weights_sha256()
    assert before == load_model_dir(generated_models[Layout.CHECKPOINT]).weights_sha256()
    with (model_dir / "latest_net_G55.pth").open("ab") as handle:
        handle.write(b"\0")
    assert load_model_dir(model_dir).weights_sha256() != before
