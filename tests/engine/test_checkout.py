"""The checkout is found one way, and a copy of the packages outside a checkout (what a non-editable install
leaves in site-packages) says what it lacks instead of failing on a missing file."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepliif.errors import ArgumentError
from engine.checkout import PROJECT_ROOT, checkout_file, is_checkout


def test_this_checkout_is_found() -> None:
    assert is_checkout() and (PROJECT_ROOT / "pyproject.toml").is_file()
    assert checkout_file("model.json") == PROJECT_ROOT / "model.json"
    with pytest.raises(ArgumentError, match="missing from the project's checkout"):
        checkout_file("no-such-file.json")


def test_installed_packages_without_a_checkout_say_so(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    for package in ("deepliif", "engine"):
        shutil.copytree(PROJECT_ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("from engine.checkout import checkout_file\n"
             "try:\n    checkout_file('model.json')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ArgumentError model.json comes from the project's checkout")
    assert "non-editable install" in done.stdout
