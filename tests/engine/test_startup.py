"""Start-up: a warm cache serves ONNX Runtime without PyTorch and without rereading the artifacts, and the
whole-process bench runs both processes and reports them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepliif.imageio import write_png
from deepliif.model_files import Layout
from engine.file_hashes import HashMemo
from engine.cli import main
from engine.samples import synthetic_ihc
from engine.session import Session

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def warm_cache(generated_models, tmp_path_factory) -> tuple[Path, Path]:
    model_dir = generated_models[Layout.CHECKPOINT]
    cache = tmp_path_factory.mktemp("warm-cache")
    with Session(model_dir, backend="onnxruntime", device="cpu", cache_dir=cache):
        pass
    return model_dir, cache


@pytest.mark.slow
def test_a_warm_onnxruntime_session_needs_no_torch(warm_cache) -> None:
    """Regression: every start loaded all nine PyTorch generators, even when ONNX Runtime served."""
    model_dir, cache = warm_cache
    code = ("import json, sys\n"
            "from engine.session import Session\n"
            "from engine.samples import synthetic_ihc\n"
            f"s = Session({str(model_dir)!r}, backend='onnxruntime', device='cpu', cache_dir={str(cache)!r})\n"
            "r = s.infer(synthetic_ihc(600, 700, seed=2))\n"
            "print(json.dumps({'stages': sorted(s.startup), 'tiles': r.tiles, 'torch': 'torch' in sys.modules}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["torch"] is False and report["tiles"] > 1
    assert "load PyTorch model" not in report["stages"] and "open backend" in report["stages"]
    assert "built artifact" not in result.stderr


def test_hashes_are_remembered_until_the_file_changes(tmp_path: Path) -> None:
    memo = HashMemo(tmp_path / "hashes.json")
    target = tmp_path / "weights.bin"
    target.write_bytes(b"a" * 1000)
    first = memo.sha256(target)
    assert HashMemo(tmp_path / "hashes.json").sha256(target) == first  # read back from the file
    with target.open("r+b") as handle:  # same size, new content and mtime: hashed again
        handle.write(b"b")
    assert memo.sha256(target) != first


@pytest.mark.slow
def test_whole_process_bench_reports_both_processes(generated_models, tmp_path: Path, capsys) -> None:
    image = tmp_path / "ihc.png"
    write_png(image, synthetic_ihc(512, 512, seed=5))
    assert main(["bench", "--whole-process", "--model-dir", str(generated_models[Layout.CHECKPOINT]),
                 "--image", str(image), "--backends", "onnxruntime", "--device", "cpu", "--repeats", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["command"] for r in report["runs"]] == ["DeepLIIF way", "deepliif-engine infer (onnxruntime)"]
    for run in report["runs"]:
        assert run["wall_seconds"] > run["inference_seconds"] > 0 and run["peak_rss_gib"] > 0
    assert report["summary"]["speedup"] > 0 and "open backend" in report["engine_startup_seconds"]
    assert "speed-up (DeepLIIF way wall / engine wall)" in capsys.readouterr().out
