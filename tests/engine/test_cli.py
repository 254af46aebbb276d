from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepliif.imageio import read_image, write_png
from deepliif.inference import tile_count
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
    assert sorted(p.name for p in out.iterdir()) == sorted([f"slide_{n}.png" for n in NAMES] + ["slide.json",
                                                                  "slide_cells.csv", "slide_cells.geojson"])
    record = json.loads((out / "slide.json").read_text())
    assert record["cells"] == ["slide_cells.csv", "slide_cells.geojson"]
    rows = (out / "slide_cells.csv").read_text().splitlines()
    assert rows[0].startswith("id,centroid_x,centroid_y") and len(rows) - 1 == record["scoring"]["num_total"]
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


@pytest.mark.slow
def test_demo_ends_with_an_edi_round_trip(generated_models: dict[Layout, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DEEPLIIF_SAMPLE_DIR", str(tmp_path / "no-samples"))
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--model-dir", str(generated_models[Layout.CHECKPOINT]), "--out", str(out),
                 "--backend", "onnxruntime", "--cache-dir", str(tmp_path / "cache"), "--edi"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("HTTP 200, status finished") == 2 and "HTTP 200, status error" in printed
    outputs = out / "edi/volume/edi_deployments/deepliif/demo-path/output_dir"
    assert sorted(p.name for p in outputs.glob("*.png")) == [
        "generated_ihc_Seg.png", "generated_ihc_SegOverlaid.png", "generated_ihc_SegRefined.png"]


@pytest.mark.slow
def test_bench_command(generated_models: dict[Layout, Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"
    assert main(["-q", "bench", "--model-dir", str(generated_models[Layout.CHECKPOINT]), "--tiles", "2",
                 "--backends", "torch,onnxruntime,tensorrt", "--batch-sizes", "1,2", "--device", "cpu",
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["tiles"] == 2 and result["baseline"]["tiles"] == 2
    assert [r["name"] for r in result["results"]] == ["torch/fp32/b1", "torch/fp32/b2", "onnxruntime/fp32/b1",
                                                      "onnxruntime/fp32/b2"]
    assert [s["case"] for s in result["skipped"]] == ["tensorrt/fp32/b1", "tensorrt/fp32/b2"]
    for entry in result["results"]:
        assert entry["speedup"] == pytest.approx(entry["tiles_per_second"] /
                                                 result["baseline"]["tiles_per_second"])
        assert entry["p95_call_seconds"] >= entry["p50_call_seconds"] > 0
        assert entry["gflops"] == pytest.approx(result["tflop_per_tile"] * 1e3 * entry["tiles_per_second"])
    out = capsys.readouterr().out
    assert "onnxruntime/fp32/b2" in out and "skipped tensorrt/fp32/b1" in out


def test_bench_rejects_bad_lists(generated_models: dict[Layout, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = str(generated_models[Layout.CHECKPOINT])
    assert main(["bench", "--model-dir", model, "--backends", "torch,tflite"]) == 2
    assert "backend must be one of" in capsys.readouterr().err
    assert main(["bench", "--model-dir", model, "--batch-sizes", "8", "--tiles", "2"]) == 2
    assert "at least the largest batch size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["infer", "--model-dir", "/nonexistent/model", "--out", "{tmp}/o", "{tmp}/x.png"], "does not exist"),
    (["infer", "--model-dir", "{model}", "--out", "{tmp}/o", "{tmp}/not-an-image.png"], "not a readable image"),
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


def test_bench_end_to_end(generated_models: dict[Layout, Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "e2e.json"
    assert main(["-q", "bench", "--model-dir", str(generated_models[Layout.CHECKPOINT]), "--end-to-end", "1024",
                 "--backends", "torch", "--batch-sizes", "2", "--tiles", "2", "--device", "cpu",
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["size"] == [1024, 1024] and result["tiles"] == tile_count(1024, 1024, 512)
    assert set(result["stage_seconds"]) == {"decode", "tiling", "inference", "stitching", "postprocess", "encoding"}
    assert all(v >= 0 for v in result["stage_seconds"].values()) and result["wall_seconds"] > 0
    assert "end to end: 1024x1024" in capsys.readouterr().out


def test_the_demo_uses_the_trained_mini_model_when_shared_is_present(deepliif_fixtures: Path) -> None:
    import argparse
    from engine.commands import _demo_model_choice
    model, why = _demo_model_choice(argparse.Namespace(model_dir=None, ngf=64))
    assert model.resolve() == (deepliif_fixtures / "models" / "mini").resolve() and "NOT a clinical one" in why
    given, why = _demo_model_choice(argparse.Namespace(model_dir=Path("/x/model"), ngf=64))
    assert given == Path("/x/model") and "given" in why


def test_postprocess_writes_deepliif_cell_data_and_rescore_redraws_from_it_alone(deepliif_fixtures: Path,
                                                                                tmp_path: Path) -> None:
    tile = deepliif_fixtures / "postprocess" / "22_2"
    reference = deepliif_fixtures / "postprocess-1.2.7" / "22_2"
    assert main(["-q", "postprocess", "--image", str(tile / "IHC.png"), "--seg", str(tile / "Seg.png"),
                 "--marker", str(tile / "Marker.png"), "--cell-data", "4", "--out", str(tmp_path / "p")]) == 0
    written = tmp_path / "p" / "IHC_cells.json"
    assert json.loads(written.read_text()) == json.loads((reference / "cells_v4.json").read_text())
    assert "IHC_cells.json" in json.loads((tmp_path / "p" / "IHC.json").read_text())["cells"]
    assert main(["-q", "rescore", "--cells", str(written), "--image", str(tile / "IHC.png"),
                 "--marker-thresh", "default", "--out", str(tmp_path / "r")]) == 0
    case = json.loads((reference / "reference.json").read_text())["cases"]["rescore_v4_marker_default"]
    record = json.loads((tmp_path / "r" / "IHC.json").read_text())
    assert record["scoring"] == case["scoring"] and record["data_version"] == 4
    for name in ("SegOverlaid", "SegRefined"):
        np.testing.assert_array_equal(read_image(tmp_path / "r" / f"IHC_{name}.png"),
                                      read_image(reference / f"rescore_v4_marker_default_{name}.png"))
    assert main(["-q", "rescore", "--cells", str(tile / "Seg.png"), "--image", str(tile / "IHC.png"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


# this project's output names -> DeepLIIF 1.2.7's, for the model whose options name the modalities
DEEPLIIF_127_NAMES = {"Hema": "mod1-Hema", "DAPI": "mod2-DAPI", "Lap2": "mod3-Lap2", "Marker": "mod4-Marker",
                      "Seg": "Seg", "SegOverlaid": "SegOverlaid", "SegRefined": "SegRefined",
                      "IHC_s": "mod0-IHC_s", "Hema_s": "mod1-Hema_s", "DAPI_s": "mod2-DAPI_s",
                      "Lap2_s": "mod3-Lap2_s", "Marker_s": "mod4-Marker_s"}


@pytest.mark.parametrize("case, flags", [("return_seg_intermediate", ["--seg-intermediate"]),
                                         ("color_dapi+color_marker", ["--color-dapi", "--color-marker"])])
def test_infer_flags_give_deepliif_127s_images(deepliif_fixtures: Path, tmp_path: Path, case: str,
                                               flags: list[str]) -> None:
    """`--seg-intermediate` (the five per-generator segmentations) and `--color-dapi --color-marker` give
    the images DeepLIIF 1.2.7's `infer_modalities` gives with its flags, within the `outputs/` tolerance."""
    folder = deepliif_fixtures / "outputs-1.2.7" / "tiny-v1" / "22_2"
    reference = json.loads((folder / "reference.json").read_text())[case]
    assert main(["-q", "infer", "--model-dir", str(deepliif_fixtures / "models" / "tiny-v1"), "--backend", "torch",
                 "--device", "cpu", "--out", str(tmp_path / "out"), *flags, str(folder / "input.png")]) == 0
    record = json.loads((tmp_path / "out" / "input.json").read_text())
    assert sorted(DEEPLIIF_127_NAMES[name] for name in record["outputs"]) == sorted(reference["outputs"])
    assert record["scoring"] == reference["scoring"]
    for name in record["outputs"]:
        ours = read_image(tmp_path / "out" / f"input_{name}.png").astype(int)
        theirs = read_image(folder / f"{case}_{DEEPLIIF_127_NAMES[name]}.png")
        assert np.abs(ours - theirs).max() <= 1 and np.abs(ours - theirs).mean() <= 0.01, name


def test_seg_intermediate_is_refused_where_it_cannot_be_served(tiny_models: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    import tifffile
    write_png(tmp_path / "tile.png", synthetic_ihc(512, 512))
    assert main(["-q", "infer", "--model-dir", str(tiny_models["tiny-v1"]), "--backend", "onnxruntime",
                 "--seg-intermediate", "--out", str(tmp_path / "o"), str(tmp_path / "tile.png")]) == 2
    assert "needs the torch backend" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "s.tif", np.full((1100, 1100, 3), 236, np.uint8), tile=(256, 256), photometric="rgb")
    assert main(["-q", "infer", "--model-dir", str(tiny_models["tiny-v1"]), "--seg-intermediate",
                 "--out", str(tmp_path / "o"), str(tmp_path / "s.tif")]) == 2
    assert "--seg-intermediate is for images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
