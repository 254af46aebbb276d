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

from deepliif.contract import FUSED_GRAPH
from deepliif.errors import ArgumentError
from deepliif.imageio import file_sha256, write_json
from deepliif.logs import project_logger

from ...artifacts import ArtifactKind, published_entries
from ...checkout import checkout_file
from ...cache import default_cache_dir

logger = project_logger("engine")

FILES = ("kernel.py", "model.json", "model-profile.json", "README.md", "pyproject.toml")
PACKAGES = ("deepliif", "export", "calibration", "engine")
WEIGHTS_DIR = "model"
CACHE_DIR = ".engine-cache"


def package(out: Path, model_dir: Path | None, with_artifacts: bool = False, cache_dir: Path | None = None,
            name: str | None = None, onnx: Path | None = None, with_weights: bool = False,
            model_source: str | None = None) -> dict:
    """Assemble the submission folder; returns what went in and the dlim commands.

    The model's weights stay out unless `with_weights`: WMLA limits a submission's size, and kernels fetch
    the model from the volume at start (`upload-model`, DEEPLIIF_MODEL_SOURCE). `onnx`: a fused graph from
    `export onnx` (or an fp16 one from `calibrate`) filed into the folder's artifact cache under the name
    the kernel looks for, so kernels serve it without exporting."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ArgumentError(f"{out} exists and is not empty; give a new folder")
    if onnx is not None and model_dir is None:
        raise ArgumentError("--onnx needs --model-dir: the graph is filed under the model it was exported from")
    description = json.loads(checkout_file("model.json").read_text())
    if name:
        description["name"] = name
    if model_source:
        from ..kernel.model_store import ModelSource
        ModelSource.parse(model_source)  # refuse a malformed source before it is shipped
        environments = [e for e in description.get("mk_environments", []) if e["name"] != "DEEPLIIF_MODEL_SOURCE"]
        description["mk_environments"] = [*environments, {"name": "DEEPLIIF_MODEL_SOURCE", "value": model_source}]
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent if out.parent.exists() else None))
    try:
        for file_name in FILES:
            shutil.copy2(checkout_file(file_name), staging / file_name)
        for package_name in PACKAGES:
            shutil.copytree(checkout_file(package_name), staging / package_name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        write_json(staging / "model.json", description)
        contents = {"files": list(FILES), "packages": list(PACKAGES), "model": None, "artifacts": [],
                    "weights_bytes": 0, "weights_included": False}
        if model_dir is not None:
            from deepliif.model_dir import load_model_dir  # torch: only when packaging a model
            model = load_model_dir(model_dir)  # refuse a broken model before it is shipped
            weights = sum(p.stat().st_size for p in Path(model.directory).rglob("*") if p.is_file())
            if with_weights:
                shutil.copytree(model.directory, staging / WEIGHTS_DIR)
            contents.update(model=model.describe(), weights_bytes=weights, weights_included=with_weights)
            model_sha256 = model.weights_sha256()
            if with_artifacts:
                contents["artifacts"] = _copy_artifacts(model_sha256, cache_dir or default_cache_dir({}),
                                                        staging / CACHE_DIR)
            if onnx is not None:
                contents["artifacts"].append(_file_onnx(Path(onnx), model, staging / CACHE_DIR))
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
    """Every published cache entry built from this model, except ONNX Runtime's graphs optimised for this
    machine's CPU: the kernel's machine makes its own."""
    copied = []
    for entry, provenance in published_entries(cache, model_sha256):
        if provenance.kind is not ArtifactKind.ORT_OPTIMIZED:
            shutil.copytree(entry, target / entry.name)
            copied.append(f"{entry.name} ({provenance.kind.value}, {provenance.precision.value})")
    if not copied:
        logger.warning("no cached artifacts of this model in %s; kernels will export on first start", cache)
    return copied


def _file_onnx(onnx: Path, model, cache_dir: Path) -> str:
    """The exported graph as the cache entry a kernel of this model opens (checked, not re-exported)."""
    from export.onnx_checks import check_fused_signature, check_onnx
    from export.tensorrt_build import onnx_precision

    from calibration.gate import ACCURACY_FILE

    from export.workflow import VALIDATION_FILE

    from ...artifacts import SANITY_FILE, SanityCheck, onnx_entry_parts, sanity_check
    from ...cache import ArtifactCache
    model_sha256 = model.weights_sha256()
    summary = check_onnx(onnx)
    check_fused_signature(summary)
    precision = onnx_precision(summary)
    manifest = onnx.with_name("export.json")
    made_from = json.loads(manifest.read_text()).get("model_sha256") if manifest.is_file() else None
    if made_from not in (None, model_sha256):
        raise ArgumentError(f"{onnx} was exported from another model (its export.json names another weights hash)")
    if precision.value == "int8":
        raise ArgumentError(f"{onnx} is an INT8 graph: ship it as the kernel's DEEPLIIF_ONNX, not as a cache entry")

    def build(staging: Path) -> None:
        """The graph with what vouches for it: the gate report of a calibrated graph, else the export's
        validation as a sanity check, else a sanity check run here."""
        shutil.copy2(onnx, staging / FUSED_GRAPH.file_name)
        if (onnx.parent / ACCURACY_FILE).is_file():
            shutil.copy2(onnx.parent / ACCURACY_FILE, staging / ACCURACY_FILE)
        elif (onnx.parent / VALIDATION_FILE).is_file():
            report = json.loads((onnx.parent / VALIDATION_FILE).read_text())
            SanityCheck.from_validation(report, file_sha256(onnx)).write(staging / SANITY_FILE)
        else:
            sanity_check(model, onnx, precision).write(staging / SANITY_FILE)

    entry = ArtifactCache(cache_dir).get(onnx_entry_parts(model_sha256, precision), build)
    (cache_dir / "file-hashes.json").unlink(missing_ok=True)  # paths of this machine mean nothing there
    return f"{entry.name} (onnx, {precision.value}, from {onnx})"


def deploy_commands(folder: Path, name: str) -> list[str]:
    folder_arg = shlex.quote(str(folder))
    return [f"dlim model deploy -p {folder_arg}",
            f"dlim model viewprofile {name} -j > {name}-profile.json   # then set the fields of "
            f"{folder_arg}/model-profile.json in it",
            f"dlim model updateprofile {name} -f {name}-profile.json",
            f"dlim model start {name}"]
