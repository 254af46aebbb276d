from __future__ import annotations

from pathlib import Path

import pytest

from deepliif.errors import ModelDirError, UnsupportedModelError
from deepliif.options import TrainOptions, parse_option_text, read_train_options

BANNER = "----------------- Options ---------------\n"


def test_parses_literals_and_drops_default_suffixes() -> None:
    values = parse_option_text(BANNER + "  ngf: 64   [default: 32]\n  name: 'x y'\n gpu_ids: [0, 1]\n"
                               " no_dropout: True\n netG: resnet_9blocks\n")
    assert values == {"ngf": 64, "name": "x y", "gpu_ids": [0, 1], "no_dropout": True, "netG": "resnet_9blocks"}


def test_targets_no_era_means_one_modality_less() -> None:
    assert TrainOptions.from_mapping({"targets_no": 5}).modalities_no == 4
    assert TrainOptions.from_mapping({"modalities_no": 4}).modalities_no == 4


def test_unsupported_model_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match=r"model='DeepLIIFExt'.*netG='unet_256'"):
        TrainOptions.from_mapping({"model": "DeepLIIFExt", "netG": "unet_256"})


def test_absent_option_file(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="train_opt.txt is missing"):
        read_train_options(tmp_path)


def test_unreadable_option_file(tmp_path: Path) -> None:
    (tmp_path / "train_opt.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelDirError, match="cannot be read"):
        read_train_options(tmp_path)


def test_option_file_without_options(tmp_path: Path) -> None:
    (tmp_path / "train_opt.txt").write_text("nothing here\n")
    with pytest.raises(ModelDirError, match="no 'key: value' option lines"):
        read_train_options(tmp_path)


def test_wrong_value_type(tmp_path: Path) -> None:
    (tmp_path / "train_opt.txt").write_text("ngf: 'wide'\n")
    with pytest.raises(ModelDirError, match="wrong type"):
        read_train_options(tmp_path)


def test_both_fixture_eras(tiny_models: dict[str, Path]) -> None:
    assert read_train_options(tiny_models["tiny-v1"]).padding == "zero"
    v2 = read_train_options(tiny_models["tiny-v2"])
    assert (v2.padding, v2.no_dropout, v2.modalities_no) == ("reflect", True, 4)
