from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepliif.imageio import read_image, write_png
from deepliif.model_dir import Layout, load_model_dir
from engine.cli import main
from engine.samples import synthetic_ihc

NAMES = ("Hema", "DAPI", "Lap2", "Marker", "Seg", "SegOverlaid", "SegRefined")


def test_infer_writes_images_and_record(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "slide.png"
    write_png(image, synthetic_ihc(600, 700, seed=1))
    out = tmp_path / "out"
    assert main(["-q", "infer", "--model-dir", str(tiny_models["tiny-v2"]), "--batch-size", "2",
                 "--out", str(out), str(image)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"slide_{n}.png" for n in NAMES] + ["slide.json"])
    record = json.loads((out / "slide.json").read_text())
    assert record["tiles"] == 4 and record["batch_size"] == 2
    assert set(record["scoring"]) >= {"num_total", "num_pos", "num_neg", "percent_pos"}
    assert {"decode_seconds", "inference_seconds", "postprocess_seconds", "encode_seconds"} <= set(record["timings"])
    assert read_image(out / "slide_Seg.png").shape == (600, 700, 3)


def test_infer_selected_outputs(generated_models: dict[Layout, Path], tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    write_png(image, synthetic_ihc(seed=4))
    assert main(["-q", "infer", "--model-dir", str(generated_models[Layout.TORCHSCRIPT]), "--outputs",
                 "modalities", "--out", str(tmp_path / "o"), str(image)]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == sorted(
        f"a_{n}.png" for n in ("Hema", "DAPI", "Lap2", "Marker"))


def test_postprocess_rescores_fixture(deepliif_fixtures: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    tile = deepliif_fixtures / "postprocess" / "34_3"
    assert main(["-q", "postprocess", "--image", str(tile / "IHC.png"), "--seg", str(tile / "Seg.png"),
                 "--marker", str(tile / "Marker.png"), "--size-thresh", "100", "--size-thresh-upper", "2000",
                 "--out", str(tmp_path)]) == 0
    expected = json.loads((tile / "scoring_size_100_upper_2000.json").read_text())["scoring"]
    assert json.loads((tmp_path / "IHC.json").read_text())["scoring"] == expected
    assert (tmp_path / "IHC_SegOverlaid.png").is_file() and (tmp_path / "IHC_SegRefined.png").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == expected


def test_demo_model_command(tmp_path: Path) -> None:
    assert main(["-q", "demo-model", "--out", str(tmp_path / "m"), "--layout", "checkpoint", "--ngf", "2"]) == 0
    assert load_model_dir(tmp_path / "m").layout is Layout.CHECKPOINT


def test_demo_on_a_generated_image(generated_models: dict[Layout, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DEEPLIIF_SAMPLE_DIR", str(tmp_path / "no-samples"))
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--model-dir", str(generated_models[Layout.CHECKPOINT]), "--out", str(out)]) == 0
    assert (out / "generated_ihc.json").is_file() and (out / "generated_ihc_SegRefined.png").is_file()
    assert f"demo results in {out.resolve()}/" in capsys.readouterr().out


def test_bench_command(generated_models: dict[Layout, Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"
    assert main(["-q", "bench", "--model-dir", str(generated_models[Layout.CHECKPOINT]), "--tiles", "2",
                 "--batch-size", "2", "--warmup", "0", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["tiles"] == 2 and result["deepliif_way"]["tiles"] == 2
    assert result["speedup"] == pytest.approx(
        result["batched"]["tiles_per_second"] / result["deepliif_way"]["tiles_per_second"])
    assert "speed-up batched / DeepLIIF way" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["infer", "--model-dir", "/nonexistent/model", "--out", "{tmp}/o", "{tmp}/x.png"], "does not exist"),
    (["infer", "--model-dir", "{model}", "--out", "{tmp}/o", "{tmp}/not-an-image.png"], "not a readable image"),
    (["infer", "--model-dir", "{model}", "--tile-size", "8", "--out", "{tmp}/o", "{tmp}/x.png"], "tile_size"),
    (["infer", "--model-dir", "{model}", "--max-pixels", "10", "--out", "{tmp}/o", "{tmp}/x.png"], "over the limit"),
    (["infer", "--model-dir", "{model}", "--device", "cuda", "--out", "{tmp}/o", "{tmp}/x.png"], "CUDA"),
    (["postprocess", "--image", "{tmp}/x.png", "--seg", "{tmp}/x.png", "--marker-thresh", "default",
      "--out", "{tmp}/o"], "needs the Marker image"),
])
def test_errors_are_one_line_with_exit_code_2(generated_models: dict[Layout, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], argv: list[str],
                                              message: str) -> None:
    import torch
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    write_png(tmp_path / "x.png", synthetic_ihc(64, 64))
    (tmp_path / "not-an-image.png").write_text("hello")
    filled = [a.format(tmp=tmp_path, model=generated_models[Layout.CHECKPOINT]) for a in argv]
    assert main(["-q", *filled]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepliif-engine: error:") and message in err and "Traceback" not in err
