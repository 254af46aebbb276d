"""Every module imports on a bare CPU machine, without the heavy optional GPU libraries."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorrt", "cuda", "pycuda", "cupy")


def test_all_modules_import_without_heavy_libraries() -> None:
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for package in ("deepliif", "engine", "export", "calibration")
                     for p in (ROOT / package).rglob("*.py")) + ["kernel"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"loaded = [h for h in {HEAVY!r} if h in sys.modules]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(modules) >= 10
