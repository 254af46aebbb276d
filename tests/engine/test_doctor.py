"""`deepliif-engine doctor` on this (CPU) machine: passes, shows TensorRT unavailable with the reason, and
fails when a backend that should work gives wrong numbers or the install mixes ONNX Runtime packages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import doctor
from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from engine.cli import main


def _cases(report: dict) -> dict[tuple[str, str], dict]:
    return {(c["backend"], c["precision"]): c for c in report["cases"]}


@pytest.mark.slow
def test_doctor_passes_here_and_says_why_it_skips(tmp_path: Path, capsys) -> None:
    assert main(["doctor", "--json", str(tmp_path / "doctor.json")]) == 0
    report = json.loads((tmp_path / "doctor.json").read_text())
    cases = _cases(report)
    assert cases[("torch", "fp32")]["status"] == "pass" and cases[("torch", "fp32")]["max_abs"] <= 1
    assert cases[("onnxruntime", "fp32")]["status"] == "pass" and cases[("onnxruntime", "fp32")]["max_abs"] <= 1
    if report["environment"]["tensorrt"] is None:
        assert cases[("tensorrt", "fp32")]["status"] == "skip"
        assert "TensorRT is not installed" in cases[("tensorrt", "fp32")]["detail"]
    if not report["environment"]["cuda_available"]:
        assert "needs a CUDA GPU" in cases[("torch", "fp16")]["detail"]
    assert "calibrate" in cases[("onnxruntime", "int8")]["detail"]
    if not report["environment"]["cuda_available"]:  # the CPU has no TF32 switch, and no engine cache
        assert cases[("torch", "fp32")]["tf32"] == cases[("onnxruntime", "fp32")]["tf32"] == "n/a"
        assert cases[("onnxruntime", "fp32")]["engine_cache"] == ""
    out = capsys.readouterr().out
    assert "doctor: PASSED" in out and "TensorRT: unavailable" in out and "engine cache" in out


@pytest.mark.slow
def test_doctor_fails_on_wrong_numbers_and_on_mixed_packages(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def black(self, batch):
        return {name: np.zeros_like(batch) for name in ("Hema", "DAPI", "Lap2", "Marker", "Seg")}

    monkeypatch.setattr(OnnxRuntimeBackend, "run_impl", black)
    real_info = doctor._onnxruntime_info
    monkeypatch.setattr(doctor, "_onnxruntime_info", lambda: {
        **real_info(), "onnxruntime_packages": {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"}})
    report = doctor.diagnose()
    assert not report["passed"]
    failed = _cases(report)[("onnxruntime", "fp32")]
    assert failed["status"] == "fail" and "max abs difference" in failed["detail"]
    assert any("both onnxruntime and onnxruntime-gpu" in p for p in report["problems"])
    assert "doctor: FAILED" in doctor.format_report(report)
