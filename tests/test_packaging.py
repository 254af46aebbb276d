"""The install must end with exactly one ONNX Runtime package (both at once hide the GPU providers)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORT_PACKAGES = {"onnxruntime", "onnxruntime-gpu"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[=<>\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_each_install_has_exactly_one_onnxruntime() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _names(project["dependencies"])
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert not base & ORT_PACKAGES, "the base must not pull either ONNX Runtime package"
    assert (base | extras["cpu"]) & ORT_PACKAGES == {"onnxruntime"}
    assert (base | extras["gpu"] | extras["tensorrt"]) & ORT_PACKAGES == {"onnxruntime-gpu"}
    assert all("cuda-python" not in names for names in extras.values())  # nothing imports it
    for name, names in extras.items():
        if name not in ("cpu", "gpu"):
            assert not names & ORT_PACKAGES, f"extra {name} would mix ONNX Runtime packages"


def test_the_makefile_and_readme_install_one_of_them() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"pip install[^\n]*-e '\.\[([^\]]*)\]'", makefile)
    assert installs and all("cpu" in extras.split(",") and "gpu" not in extras.split(",") for extras in installs)
    readme = (ROOT / "README.md").read_text()
    for extras in re.findall(r"pip install[^\n`]*\.\[([a-z,]+)\]", readme):
        chosen = set(extras.split(","))
        assert not {"cpu", "gpu"} <= chosen, f"README installs both ONNX Runtime packages: [{extras}]"
