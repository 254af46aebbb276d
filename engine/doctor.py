"""`deepliif-engine doctor`: what this machine offers, and whether every backend that should run here does.

The first command on a new machine (a WMLA kernel's GPU, a laptop, CI). It reports the software and the
GPUs, then opens each backend x precision through the real `Session` path (export or build into a
scratch cache, load, run one tile) on a small generated model (or `--model-dir`) and compares with the
PyTorch CPU reference. A case that cannot run here is skipped with the reason; a case that should run
and does not, or runs and disagrees, fails the command.
"""
from __future__ import annotations

import importlib.metadata
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deepliif.demo import write_demo_model
from deepliif.errors import DeepLIIFError
from deepliif.model_dir import Layout, load_model_dir
from deepliif.pipeline import OUTPUT_NAMES, FusedPipeline, TileRunner
from deepliif.tables import format_rows
from engine.errors import BackendUnavailableError

from engine.backends.precision import Precision
from export.config import Tolerance
from engine.backends.tensorrt_plan import tensorrt_module
from export.validate import ImageStats

from .backends import BackendKind
from .samples import synthetic_ihc
from .session import Session

DOCTOR_NGF = 8  # small enough to export and run in seconds on a CPU, full architecture otherwise


@dataclass
class CaseResult:
    backend: str
    precision: str
    status: str  # pass, fail, skip
    detail: str = ""
    max_abs: int | None = None
    min_psnr_db: float | None = None
    seconds: float | None = None
    tf32: str = ""  # on, off, or n/a (no such switch on the device)
    engine_cache: str = ""  # where the backend keeps compiled engines, if it keeps any


def environment() -> dict:
    """Versions, GPUs and providers; never raises (a broken library is itself a finding)."""
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "gpus": _gpus()}
    env.update(_onnxruntime_info())
    try:
        env["tensorrt"] = tensorrt_module().__version__
    except BackendUnavailableError as exc:
        env["tensorrt"], env["tensorrt_unavailable"] = None, str(exc)
    return env


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        gpus.append({"index": index, "name": torch.cuda.get_device_name(index),
                     "compute_capability": f"{major}.{minor}", "free_gib": round(free / 2**30, 1),
                     "total_gib": round(total / 2**30, 1)})
    return gpus


def _onnxruntime_info() -> dict:
    installed = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    info = {"onnxruntime_packages": installed, "onnxruntime_providers": []}
    try:
        import onnxruntime
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as exc:
        info["onnxruntime_unavailable"] = str(exc)
    return info


def planned_cases(env: dict) -> list[tuple[BackendKind, Precision, str | None]]:
    """(backend, precision, reason to skip or None) for every combination the engine offers."""
    gpu = env["cuda_available"]
    no_gpu = "needs a CUDA GPU; none is visible here"
    cases = []
    for kind in (BackendKind.TORCH, BackendKind.ONNXRUNTIME, BackendKind.TENSORRT):
        for precision in Precision:
            cases.append((kind, precision, _skip_reason(kind, precision, env, gpu, no_gpu)))
    return cases


def _skip_reason(kind: BackendKind, precision: Precision, env: dict, gpu: bool, no_gpu: str) -> str | None:
    if precision is Precision.INT8:
        return "int8 serves a calibrated, gated graph: make one with `deepliif-engine calibrate`, then " \
               "check it with `bench --precision int8 --int8-onnx`"
    if kind is BackendKind.TENSORRT:
        return env.get("tensorrt_unavailable") or (None if gpu else no_gpu)
    if kind is BackendKind.ONNXRUNTIME and env.get("onnxruntime_unavailable"):
        return env["onnxruntime_unavailable"]
    if precision is Precision.FP16 and not gpu:
        return no_gpu
    return None


def run_case(model_dir: Path, kind: BackendKind, precision: Precision, cache_dir: Path,
             tile: np.ndarray, reference: dict[str, np.ndarray]) -> CaseResult:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    try:
        # doctor judges the graph itself (below, against the torch reference): an fp16 export is forced
        with Session(model_dir, backend=kind, precision=precision.value, device=device, cache_dir=cache_dir,
                     batch_size=1, force_ungated=precision is Precision.FP16) as session:
            actual = session.run(tile[None])
            info = session.info
    except DeepLIIFError as exc:
        return CaseResult(kind.value, precision.value, "fail", str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash in a library is exactly what doctor must report
        return CaseResult(kind.value, precision.value, "fail", f"{type(exc).__name__}: {exc}")
    stats = [ImageStats.between(reference[name], actual[name][0]) for name in OUTPUT_NAMES]
    psnr = min(s.psnr_db for s in stats)
    result = CaseResult(kind.value, precision.value, "pass", info.detail, max(s.max_abs for s in stats),
                        None if math.isinf(psnr) else round(psnr, 2), round(time.perf_counter() - start, 2),
                        "n/a" if info.tf32 is None else ("on" if info.tf32 else "off"), info.engine_cache or "")
    tolerance = Tolerance.for_precision(precision)
    if tolerance.max_abs is not None and result.max_abs > tolerance.max_abs:
        result.status, result.detail = "fail", f"max abs difference {result.max_abs} > {tolerance.max_abs}"
    elif tolerance.min_psnr is not None and not math.isinf(psnr) and psnr < tolerance.min_psnr:
        result.status, result.detail = "fail", f"PSNR {result.min_psnr_db} dB < {tolerance.min_psnr} dB"
    return result


def diagnose(model_dir: Path | None = None) -> dict:
    """The whole report: environment, cases, and whether the machine passes."""
    env = environment()
    problems = []
    if len(env["onnxruntime_packages"]) > 1:
        problems.append("both onnxruntime and onnxruntime-gpu are installed: the GPU providers vanish; "
                        "pip uninstall -y onnxruntime onnxruntime-gpu, then install one extra ([cpu] or [gpu])")
    with tempfile.TemporaryDirectory(prefix="deepliif-doctor-") as scratch:
        if model_dir is None:
            model_dir = write_demo_model(Path(scratch) / "model", Layout.TORCHSCRIPT, ngf=DOCTOR_NGF, seed=0)
        tile = synthetic_ihc(seed=11)
        reference = {k: v[0] for k, v in TileRunner(FusedPipeline(load_model_dir(model_dir))).run(tile[None]).items()}
        cases = []
        for kind, precision, skip in planned_cases(env):
            if skip:
                cases.append(CaseResult(kind.value, precision.value, "skip", skip))
            else:
                cases.append(run_case(Path(model_dir), kind, precision, Path(scratch) / "cache", tile, reference))
    passed = not problems and all(c.status != "fail" for c in cases)
    return {"environment": env, "problems": problems, "cases": [asdict(c) for c in cases], "passed": passed,
            "model": str(model_dir) if model_dir else f"generated (ngf {DOCTOR_NGF}, random weights)"}


def format_report(report: dict) -> str:
    env = report["environment"]
    gpus = "; ".join(f"{g['name']} (sm {g['compute_capability']}, {g['free_gib']}/{g['total_gib']} GiB free)"
                     for g in env["gpus"]) or "none visible"
    lines = [f"python {env['python']}  torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'})  "
             f"onnxruntime {env['onnxruntime_packages'] or 'not installed'}",
             f"GPUs: {gpus}",
             f"ONNX Runtime providers: {', '.join(env['onnxruntime_providers']) or 'none'}",
             f"TensorRT: {env['tensorrt'] or 'unavailable: ' + env.get('tensorrt_unavailable', '')}", ""]
    rows = [("backend", "precision", "result", "max abs", "min PSNR dB", "seconds", "TF32", "engine cache", "detail")]
    for c in report["cases"]:
        psnr = str(c["min_psnr_db"]) if c["min_psnr_db"] is not None else ("inf" if c["max_abs"] == 0 else "")
        rows.append((c["backend"], c["precision"], c["status"].upper(), "" if c["max_abs"] is None else str(c["max_abs"]),
                     psnr, "" if c["seconds"] is None else f"{c['seconds']:.1f}", c["tf32"], c["engine_cache"],
                     c["detail"]))
    lines += format_rows(rows)
    lines += [f"PROBLEM: {p}" for p in report["problems"]]
    lines.append("doctor: PASSED" if report["passed"] else "doctor: FAILED")
    return "\n".join(lines)
