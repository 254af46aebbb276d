"""`deepliif-engine package`: the folder `dlim model deploy -p` takes, and the commands to run.

EDI's mandatory files (kernel.py, model.json, README.md) and the project's code go in as they are; the
model directory goes under `model/` (model.json's `weight_path`), so `REDHARE_MODEL_PATH/model` is where
the kernel finds it; with artifacts, this model's cached ONNX/TensorRT entries go under `.engine-cache/`
(the kernel's default cache), so a kernel whose libraries match skips the export. The folder is staged
and renamed into place, so a half-assembled one never looks ready.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

from deepliif.errors import ArgumentError
from deepliif.imageio import write_json

from .. import logger
from ..cache import MANIFEST, default_cache_dir

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FILES = ("kernel.py", "model.json", "model-profile.json", "README.md", "pyproject.toml")
PACKAGES = ("deepliif", "export", "calibration", "engine")
WEIGHTS_DIR = "model"
CACHE_DIR = ".engine-cache"


def package(out: Path, model_dir: Path | None, with_artifacts: bool = False, cache_dir: Path | None = None,
            name: str | None = None) -> dict:
    """Assemble the submission folder; returns what went in and the dlim commands."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ArgumentError(f"{out} exists and is not empty; give a new folder")
    description = json.loads((PROJECT_ROOT / "model.json").read_text())
    if name:
        description["name"] = name
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent if out.parent.exists() else None))
    try:
        for file_name in FILES:
            shutil.copy2(PROJECT_ROOT / file_name, staging / file_name)
        for package_name in PACKAGES:
            shutil.copytree(PROJECT_ROOT / package_name, staging / package_name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        write_json(staging / "model.json", description)
        contents = {"files": list(FILES), "packages": list(PACKAGES), "model": None, "artifacts": []}
        if model_dir is not None:
            from deepliif.model_dir import load_model_dir  # torch: only when packaging a model
            model = load_model_dir(model_dir)  # refuse a broken model before it is shipped
            shutil.copytree(model.directory, staging / WEIGHTS_DIR)
            contents["model"] = model.describe()
            if with_artifacts:
                contents["artifacts"] = _copy_artifacts(model.weights_sha256(), cache_dir or default_cache_dir(),
                                                        staging / CACHE_DIR)
        elif with_artifacts:
            raise ArgumentError("--with-artifacts needs --model-dir (artifacts are found by the model's hash)")
        os.chmod(staging, 0o755)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    contents["commands"] = deploy_commands(out, description["name"])
    logger.info("packaged %s", out)
    return contents


def _copy_artifacts(model_sha256: str, cache: Path, target: Path) -> list[str]:
    """Every published cache entry built from this model (its manifest names the model's hash), except
    ONNX Runtime's graphs optimised for this machine's CPU: the kernel's machine makes its own."""
    copied = []
    for manifest in sorted(Path(cache).glob(f"*/{MANIFEST}")):
        try:
            parts = json.loads(manifest.read_text()).get("parts", {})
        except ValueError:
            continue
        if parts.get("model") == model_sha256 and parts.get("kind") != "onnxruntime-optimized":
            shutil.copytree(manifest.parent, target / manifest.parent.name)
            copied.append(f"{manifest.parent.name} ({parts.get('kind')}, {parts.get('export', {}).get('precision')})")
    if not copied:
        logger.warning("no cached artifacts of this model in %s; kernels will export on first start", cache)
    return copied


def deploy_commands(folder: Path, name: str) -> list[str]:
    folder_arg = shlex.quote(str(folder))
    return [f"dlim model deploy -p {folder_arg}",
            f"dlim model viewprofile {name} -j > {name}-profile.json   # then set the fields of "
            f"{folder_arg}/model-profile.json in it",
            f"dlim model updateprofile {name} -f {name}-profile.json",
            f"dlim model start {name}"]
