"""A Triton Inference Server model repository serving the fused pipeline.

Three runtimes, one tensor contract (uint8 NHWC in and out, Triton's implicit batch axis):
- `onnxruntime`: `REPO/<name>/1/model.onnx` on Triton's ONNX Runtime backend;
- `tensorrt`: `REPO/<name>/1/model.plan` on Triton's TensorRT backend;
- `python`: `REPO/<name>/1/model.py` on Triton's Python backend, serving this project's own `Session`
  (`engine.triton_model`) on the model directory copied to `1/model/` (and a given fused ONNX to
  `1/deepliif.onnx`); the Python that Triton's stub runs must have this package installed.
The config is generated, then parsed back with a small protobuf text-format reader and compared with what
was meant, so a formatting slip cannot ship. The model directory is assembled under a temporary name and
renamed into place.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deepliif.errors import ArgumentError, ChoiceEnum
from deepliif.contract import FUSED_GRAPH, NETWORK_TILE
from deepliif.model_files import read_model_files
from engine.errors import ArtifactError, ExportError

from engine.backends import BackendKind
from engine.backends.onnxruntime_backend import provider_options
from engine.backends.precision import Precision

from . import logger
from .onnx_checks import check_fused_signature, check_onnx
from .tensorrt_build import METADATA_FILE, EngineMetadata, onnx_precision

_DIMS = [NETWORK_TILE, NETWORK_TILE, 3]
PYTHON_MODEL_DIR = "model"  # the DeepLIIF model directory's copy inside the version folder
PYTHON_MODEL_SOURCE = (
    '"""Triton Python-backend entry point written by `deepliif-engine export triton --backend python`.\n\n'
    "The model is this project's `engine.triton_model`; its settings are config.pbtxt's parameters.\n"
    '"""\n'
    "from engine.triton_model import TritonPythonModel  # noqa: F401\n")


@dataclass(frozen=True)
class PythonModelSettings:
    """What a Python-backend instance serves, as config.pbtxt parameters: the model directory and an
    optional fused graph (paths relative to the version folder, where the writer copies them), the
    backend and precision of the session, the artifact cache (default: the project's)."""

    model_dir: Path
    onnx: Path | None = None
    backend: str = "auto"
    precision: str = "fp32"
    cache_dir: Path | None = None

    KEYS = ("model_dir", "onnx", "backend", "precision", "cache_dir")

    def as_parameters(self) -> dict[str, str]:
        values = {key: getattr(self, key) for key in self.KEYS}
        return {key: str(value) for key, value in values.items() if value is not None}

    @classmethod
    def from_model_config(cls, config: dict, version_dir: Path) -> PythonModelSettings:
        """From Triton's JSON model config (parameters map to `{"string_value": ...}`)."""
        values = {key: entry.get("string_value", "") for key, entry in config.get("parameters", {}).items()}
        unknown = sorted(set(values) - set(cls.KEYS))
        if unknown:
            raise ArgumentError(f"Triton model parameters {unknown} are unknown; known: {list(cls.KEYS)}")
        if not values.get("model_dir"):
            raise ArgumentError("Triton model parameter 'model_dir' (the DeepLIIF model directory) is missing")

        def path(key: str) -> Path | None:
            return version_dir / values[key] if values.get(key) else None

        return cls(model_dir=path("model_dir"), onnx=path("onnx"), backend=values.get("backend") or "auto",
                   precision=values.get("precision") or "fp32", cache_dir=path("cache_dir"))


class InstanceKind(ChoiceEnum):
    GPU = "gpu"
    CPU = "cpu"

    @property
    def triton_name(self) -> str:
        return f"KIND_{self.name}"


@dataclass(frozen=True)
class Runtime:
    """How config.pbtxt names what runs the model (`platform` or `backend`), and its file in `1/`."""

    key: str
    value: str
    file_name: str


ONNXRUNTIME = Runtime("platform", "onnxruntime_onnx", "model.onnx")
TENSORRT = Runtime("platform", "tensorrt_plan", "model.plan")
PYTHON = Runtime("backend", "python", "model.py")
TRITON_BACKENDS = ("onnxruntime", "tensorrt", "python")  # what `export triton --backend` writes


@dataclass(frozen=True)
class TritonConfig:
    name: str = "deepliif"
    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 5000
    instances: int = 1
    instance_kind: InstanceKind = InstanceKind.GPU
    parameters: dict[str, str] = field(default_factory=dict)  # the Python model's settings
    # ONNX Runtime backend: gpu_execution_accelerator name -> its parameters (ONNX Runtime's EP option names)
    accelerators: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # comment lines at the top of config.pbtxt: what the server must be run with

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ArgumentError(f"Triton model name must be letters, digits, '_', '.', '-'; got {self.name!r}")
        if self.max_batch_size < 1 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise ArgumentError("max_batch_size and instances must be >= 1, queue delay >= 0; got "
                                f"{self.max_batch_size}, {self.instances}, {self.max_queue_delay_us}")
        preferred = tuple(b for b in self.preferred_batch_sizes if b <= self.max_batch_size)
        object.__setattr__(self, "preferred_batch_sizes", preferred or (self.max_batch_size,))
        object.__setattr__(self, "instance_kind", InstanceKind.parse(self.instance_kind))


def render_config(config: TritonConfig, runtime: Runtime) -> str:
    """config.pbtxt text. The batch axis is implicit in Triton (max_batch_size > 0), so dims are HWC."""
    def tensor(name: str) -> str:
        return f'  {{ name: "{name}" data_type: TYPE_UINT8 dims: [ {", ".join(map(str, _DIMS))} ] }}'

    outputs = ",\n".join(tensor(n) for n in FUSED_GRAPH.onnx_output_names)
    preferred = ", ".join(map(str, config.preferred_batch_sizes))
    parameters = "".join(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
                         for key, value in config.parameters.items())
    notes = "".join(f"# {line}\n" for line in config.notes)
    return (f'{notes}name: "{config.name}"\n'
            f'{runtime.key}: "{runtime.value}"\n'
            f"max_batch_size: {config.max_batch_size}\n"
            f"input [\n{tensor(FUSED_GRAPH.input_name)}\n]\n"
            f"output [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
            f"  max_queue_delay_microseconds: {config.max_queue_delay_us}\n}}\n"
            f"instance_group [ {{ kind: {config.instance_kind.triton_name} count: {config.instances} }} ]\n"
            f"{parameters}{_optimization(config.accelerators)}")


def _optimization(accelerators: dict[str, dict[str, str]]) -> str:
    if not accelerators:
        return ""
    def entry(name: str, options: dict[str, str]) -> str:
        lines = "".join(f'      parameters {{ key: "{key}" value: "{value}" }}\n' for key, value in options.items())
        return f'    {{ name: "{name}"\n{lines}    }}'

    entries = ",\n".join(entry(name, options) for name, options in accelerators.items())
    return f"optimization {{ execution_accelerators {{\n  gpu_execution_accelerator: [\n{entries}\n  ]\n}} }}\n"


def onnx_accelerators(precision: Precision, max_batch_size: int) -> dict[str, dict[str, str]]:
    """The ONNX Runtime backend's GPU execution providers for a graph of this precision, with the options
    the engine's own sessions use (`provider_options`: TF32 only for fp16, a heuristic convolution search).
    fp16 and int8 run on the TensorRT EP first (int8 must: the CUDA EP runs Q/DQ as float operations),
    with its batch profile and `precision_mode` FP32, because Triton maps FP16/INT8 to the EP's precision
    flags, which would override the graph's own types."""
    def as_strings(options: dict) -> dict[str, str]:
        return {key: str(int(value) if isinstance(value, bool) else value) for key, value in options.items()
                if key != "device_id"}  # Triton places the instance

    cuda = as_strings(provider_options("CUDAExecutionProvider", precision, None))
    if precision is Precision.FP32:
        return {"cuda": cuda}
    tensorrt = provider_options("TensorrtExecutionProvider", precision, None,
                                batch_range=(1, max_batch_size, max_batch_size))
    profile = as_strings({key: value for key, value in tensorrt.items() if key.startswith("trt_profile_")})
    return {"tensorrt": {"precision_mode": "FP32", **profile}, "cuda": cuda}


def plan_notes(metadata: EngineMetadata) -> tuple[str, ...]:
    """What Triton's TensorRT backend must be for this plan, said in the config and the log."""
    built = (f"plan built with TensorRT {metadata.tensorrt_version} for {metadata.gpu_name} "
             f"(compute capability {metadata.compute_capability})")
    if metadata.version_compatible:
        return (built, "version-compatible: start tritonserver with --backend-config=tensorrt,version-compatible=true")
    return (built, f"not version-compatible: Triton's TensorRT backend must be exactly TensorRT "
                   f"{metadata.tensorrt_version}, on that GPU model")


def write_repository(repo: Path, config: TritonConfig, onnx_path: Path | None = None,
                     plan_path: Path | None = None) -> Path:
    """Write `repo/<name>/` for the plan when given (capped by its profile), else for the ONNX."""
    if (onnx_path is None) == (plan_path is None):
        raise ArgumentError("give exactly one artifact: an ONNX file or a TensorRT plan")
    if plan_path is not None:
        metadata = EngineMetadata.read(Path(plan_path).with_name(METADATA_FILE))
        metadata.check_plan_file(plan_path)
        if metadata.profile["min"][0] > 1:  # Triton's dynamic batcher sends whatever it has, down to one
            raise ArgumentError(f"{plan_path}: its profile's minimum batch is {metadata.profile['min'][0]}, but "
                                "Triton sends batches of 1; rebuild it with --min-batch 1")
        profile_max = metadata.profile["max"][0]
        if config.max_batch_size > profile_max:
            logger.info("max_batch_size %d capped at the plan's profile maximum %d", config.max_batch_size,
                        profile_max)
            config = dataclasses.replace(config, max_batch_size=profile_max)
        notes = plan_notes(metadata)
        logger.warning("Triton TensorRT model %s: %s; %s", config.name, *notes)
        config = dataclasses.replace(config, notes=notes)
        runtime, artifact = TENSORRT, Path(plan_path)
    else:
        summary = check_onnx(onnx_path)
        check_fused_signature(summary)
        if config.instance_kind is InstanceKind.GPU:
            config = dataclasses.replace(config, accelerators=onnx_accelerators(onnx_precision(summary),
                                                                                config.max_batch_size))
        runtime, artifact = ONNXRUNTIME, Path(onnx_path)
    return _publish(Path(repo), config, runtime,
                    lambda version: shutil.copyfile(artifact, version / runtime.file_name))


def write_python_repository(repo: Path, config: TritonConfig, model_dir: Path, onnx_path: Path | None = None,
                            backend: str = "auto", precision: str = "fp32", cache_dir: Path | None = None) -> Path:
    """Write `repo/<name>/` for Triton's Python backend: `model.py`, the model directory, the fused ONNX
    when given, and the session's settings as config parameters (paths relative to the version folder)."""
    files = read_model_files(model_dir)  # refuse a directory that is not a DeepLIIF model, before writing
    backend, precision = BackendKind.parse(backend).value, Precision.parse(precision).value
    if onnx_path is not None:
        check_fused_signature(check_onnx(onnx_path))
    settings = PythonModelSettings(Path(PYTHON_MODEL_DIR), Path(FUSED_GRAPH.file_name) if onnx_path else None,
                                   backend, precision, Path(cache_dir).resolve() if cache_dir else None)
    config = dataclasses.replace(config, parameters=settings.as_parameters())

    def fill(version: Path) -> None:
        (version / PYTHON.file_name).write_text(PYTHON_MODEL_SOURCE)
        shutil.copytree(files.directory, version / PYTHON_MODEL_DIR)
        if onnx_path is not None:
            shutil.copyfile(onnx_path, version / FUSED_GRAPH.file_name)

    return _publish(Path(repo), config, PYTHON, fill)


def _publish(repo: Path, config: TritonConfig, runtime: Runtime, fill: Callable[[Path], None]) -> Path:
    """Render and check the config, let `fill` write the version folder, and rename the whole into place."""
    text = render_config(config, runtime)
    check_config(parse_pbtxt(text), config, runtime)
    name = config.name
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    except OSError as exc:
        raise ArgumentError(f"cannot write the Triton repository {repo}: {exc}") from exc
    try:
        (staging / "1").mkdir()
        fill(staging / "1")
        (staging / "config.pbtxt").write_text(text)
        target = repo / name
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=repo))
            target.rename(old / name)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return repo / name


def check_config(parsed: dict, config: TritonConfig, runtime: Runtime) -> None:
    """The parsed config must say exactly what was meant; raise with every mismatch."""
    problems = []

    def expect(what: str, actual, wanted) -> None:
        if actual != wanted:
            problems.append(f"{what} is {actual!r}, expected {wanted!r}")

    expect("name", parsed.get("name"), config.name)
    expect(runtime.key, parsed.get(runtime.key), runtime.value)
    expect("max_batch_size", parsed.get("max_batch_size"), config.max_batch_size)
    tensors = {"input": [FUSED_GRAPH.input_name], "output": list(FUSED_GRAPH.onnx_output_names)}
    for group, names in tensors.items():
        entries = parsed.get(group, [])
        expect(f"{group} names", [e.get("name") for e in entries], names)
        for entry in entries:
            expect(f"{entry.get('name')} type", entry.get("data_type"), "TYPE_UINT8")
            expect(f"{entry.get('name')} dims", entry.get("dims"), _DIMS)
    batching = parsed.get("dynamic_batching", {})
    expect("preferred_batch_size", batching.get("preferred_batch_size"), list(config.preferred_batch_sizes))
    groups = parsed.get("instance_group", [])
    expect("instance_group", groups, [{"kind": config.instance_kind.triton_name, "count": config.instances}])
    parameters = {p.get("key"): p.get("value", {}).get("string_value") for p in parsed.get("parameters", [])}
    expect("parameters", parameters, config.parameters)
    accelerators = parsed.get("optimization", {}).get("execution_accelerators", {}).get("gpu_execution_accelerator", [])
    expect("gpu_execution_accelerator", {a.get("name"): {p["key"]: p["value"] for p in a.get("parameters", [])}
                                         for a in accelerators}, config.accelerators)
    if problems:
        raise ExportError("generated Triton config is wrong: " + "; ".join(problems))


_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def parse_pbtxt(text: str) -> dict:
    """Parse protobuf text format (the subset model configs use) into dicts and lists.

    Repeated fields and `[a, b]` lists become lists; `input`/`output`/`instance_group` are lists even
    with one entry, as in Triton's schema.
    """
    tokens = _tokenize(text)
    parsed, position = _parse_fields(tokens, 0, closing=None)
    if position != len(tokens):
        raise ArtifactError(f"config.pbtxt: unexpected {tokens[position]!r}")
    return parsed


def _tokenize(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ArtifactError(f"config.pbtxt: cannot read from {text[position:position + 20]!r}")
        position = match.end()
        if not match.group(1):
            tokens.append(match.group(2) or match.group(3) or match.group(4))
    return tokens


_ALWAYS_LISTS = {"input", "output", "instance_group", "preferred_batch_size", "dims", "parameters"}


def _parse_fields(tokens: list[str], position: int, closing: str | None) -> tuple[dict, int]:
    fields: dict = {}
    while position < len(tokens) and tokens[position] != closing:
        key = tokens[position]
        position += 1
        if position < len(tokens) and tokens[position] == ":":
            position += 1
        value, position = _parse_value(tokens, position)
        if key in _ALWAYS_LISTS:
            fields.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        elif key in fields:
            raise ArtifactError(f"config.pbtxt: field {key!r} given twice")
        else:
            fields[key] = value
    if closing is not None:
        if position >= len(tokens):
            raise ArtifactError(f"config.pbtxt: missing {closing!r}")
        position += 1
    return fields, position


def _parse_value(tokens: list[str], position: int):
    if position >= len(tokens):
        raise ArtifactError("config.pbtxt: a field has no value")
    token = tokens[position]
    if token == "{":
        return _parse_fields(tokens, position + 1, "}")
    if token == "[":
        items, position = [], position + 1
        while position < len(tokens) and tokens[position] != "]":
            item, position = _parse_value(tokens, position)
            items.append(item)
            if position < len(tokens) and tokens[position] == ",":
                position += 1
        if position >= len(tokens):
            raise ArtifactError("config.pbtxt: missing ']'")
        return items, position + 1
    return _scalar(token), position + 1


def _scalar(token: str):
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape")
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            pass
    return token
