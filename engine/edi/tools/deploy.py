"""`deepliif-engine deploy`: the WMLA guide's dlim sequence for a packaged folder, run in order.

deploy -p → viewprofile -j → the profile edited with the folder's model-profile.json (exclusive GPU, CPU and
memory with their limits, task timeout, task batch size, kernel min/max) → updateprofile -f → start. Each
step's failure stops the sequence with the step's name and dlim's own output. Every call carries the REST
server and the JWT token when given, as WMLA's notebooks pass them (`--rest-server`, `--jwt-token`); the
token is never printed.
"""
from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from deepliif.errors import ArgumentError, DeepLIIFError
from deepliif.imageio import write_json
from deepliif.logs import project_logger

from ..kernel.settings import DEFAULT_TASK_BATCH_SIZE

logger = project_logger("engine")

TOKEN_ENV = "USER_ACCESS_TOKEN"
PROFILE_TEMPLATE = "model-profile.json"
STEP_TIMEOUT_S = 600


class DeployError(DeepLIIFError):
    """A dlim step failed; the message names the step and carries dlim's output."""


@dataclass(frozen=True)
class DlimConnection:
    rest_server: str | None = None
    jwt_token: str | None = None
    token_from_env: bool = False

    def args(self, for_display: bool = False) -> list[str]:
        found = ["--rest-server", self.rest_server] if self.rest_server else []
        if self.jwt_token:
            shown = f"${TOKEN_ENV}" if self.token_from_env else "****"
            found += ["--jwt-token", shown if for_display else self.jwt_token]
        return found


def profile_task_batch_size(profile: Path) -> int:
    """The tasks EDI hands one kernel call under this profile (`policy.task_batch_size`); the stand-in's
    `serve` reads it so it batches as the deployment will."""
    try:
        value = json.loads(Path(profile).read_text()).get("policy", {}).get("task_batch_size")
    except FileNotFoundError:
        return DEFAULT_TASK_BATCH_SIZE
    except (OSError, ValueError, AttributeError) as exc:
        raise ArgumentError(f"{profile}: cannot read its policy.task_batch_size: {exc}") from exc
    if value is None:
        return DEFAULT_TASK_BATCH_SIZE
    if not isinstance(value, int) or value < 1:
        raise ArgumentError(f"{profile}: policy.task_batch_size must be a positive integer; got {value!r}")
    return value


@dataclass(frozen=True)
class ProfileSettings:
    """What the deployment's profile is set to; None keeps the folder's model-profile.json value."""
    kernel_min: int | None = None
    kernel_max: int | None = None
    ncpus: int | None = None
    mem_mb: int | None = None
    task_execution_timeout: int | None = None
    task_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value is not None and (not isinstance(value, int) or value < (-1 if name == "kernel_max" else 1)):
                raise ArgumentError(f"{name} must be a positive integer; got {value!r}")
        if self.kernel_min and self.kernel_max and self.kernel_max != -1 and self.kernel_max < self.kernel_min:
            raise ArgumentError(f"kernel_max ({self.kernel_max}) is below kernel_min ({self.kernel_min})")

    def template(self, base: dict) -> dict:
        """model-profile.json with these settings applied (CPU and memory limits twice the request)."""
        edited = copy.deepcopy(base)
        policy = edited.setdefault("policy", {})
        for key, value in (("kernel_min", self.kernel_min), ("kernel_max", self.kernel_max),
                           ("task_execution_timeout", self.task_execution_timeout),
                           ("task_batch_size", self.task_batch_size)):
            if value is not None:
                policy[key] = value
        resources = dict(kv.split("=", 1) for kv in edited.get("resource_allocation", {}).get("kernel", {})
                         .get("resources", "").split(",") if "=" in kv)
        if self.ncpus:
            resources.update(ncpus=str(self.ncpus), ncpus_limit=str(2 * self.ncpus))
        if self.mem_mb:
            resources.update(mem=str(self.mem_mb), mem_limit=str(2 * self.mem_mb))
        if resources:
            edited.setdefault("resource_allocation", {}).setdefault("kernel", {})["resources"] = \
                ",".join(f"{k}={v}" for k, v in resources.items())
        edited.setdefault("kernel", {})["gpu"] = "exclusive"  # one kernel owns its GPU: the engine's premise
        return edited


def merged(profile: dict, template: dict) -> dict:
    """The deployed profile with the template's fields set in it, everything else kept as dlim gave it."""
    result = copy.deepcopy(profile)
    for key, value in template.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


@dataclass
class Deployment:
    package_dir: Path
    name: str | None  # None: the folder's model.json name
    connection: DlimConnection = field(default_factory=DlimConnection)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    dlim: str = "dlim"

    def __post_init__(self) -> None:
        self.package_dir = Path(self.package_dir)
        for required in ("kernel.py", "model.json", "README.md"):
            if not (self.package_dir / required).is_file():
                raise ArgumentError(f"{self.package_dir} is not a packaged folder: no {required} (run "
                                    "`deepliif-engine package` first)")
        declared = json.loads((self.package_dir / "model.json").read_text()).get("name")
        self.name = self.name or declared
        if declared != self.name:
            raise ArgumentError(f"{self.package_dir}/model.json names the deployment {declared!r}, not {self.name!r}:"
                                f" package it again with --name {self.name}, or deploy it as {declared}")

    def commands(self, profile_file: str = "PROFILE.json", display: bool = True) -> list[list[str]]:
        """The dlim calls in order; viewprofile's output is the profile edited before updateprofile."""
        tail = self.connection.args(for_display=display)
        return [[self.dlim, "model", "deploy", "-p", str(self.package_dir), *tail],
                [self.dlim, "model", "viewprofile", self.name, "-j", *tail],
                [self.dlim, "model", "updateprofile", self.name, "-f", profile_file, *tail],
                [self.dlim, "model", "start", self.name, *tail]]

    def dry_run(self) -> list[str]:
        quoted = shlex.quote(f"${TOKEN_ENV}")  # shown so that a shell expands it, as the run would
        deploy, view, update, start = (shlex.join(c).replace(quoted, f'"${TOKEN_ENV}"') for c in self.commands())
        return [deploy, f"{view} > PROFILE.json", f"# set in PROFILE.json: {json.dumps(self.template())}",
                update, start]

    def template(self) -> dict:
        path = self.package_dir / PROFILE_TEMPLATE
        base = json.loads(path.read_text()) if path.is_file() else {}
        return self.profile.template(base)

    def run(self) -> dict:
        """Run the sequence; the profile as sent. DeployError names the step that failed."""
        if shutil.which(self.dlim) is None:
            raise ArgumentError(f"{self.dlim!r} is not on PATH: download dlim from WMLA (Help > Command Line Tools)")
        with tempfile.TemporaryDirectory(prefix="deepliif-deploy-") as scratch:
            profile_file = str(Path(scratch) / f"{self.name}-profile.json")
            deploy, view, update, start = self.commands(profile_file, display=False)
            self._step("deploy", deploy)
            try:
                profile = json.loads(self._step("viewprofile", view))
            except ValueError as exc:
                raise DeployError(f"dlim step 'viewprofile' did not print a JSON profile ({exc})") from exc
            edited = merged(profile, self.template())
            write_json(Path(profile_file), edited)
            self._step("updateprofile", update)
            self._step("start", start)
        logger.info("deployed %s from %s", self.name, self.package_dir)
        return edited

    def _step(self, step: str, argv: list[str]) -> str:
        shown = shlex.join(a if a != self.connection.jwt_token else "****" for a in argv)
        logger.info("dlim step %s: %s", step, shown)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)  # inherits the env
        except subprocess.TimeoutExpired as exc:
            raise DeployError(f"dlim step {step!r} did not finish in {STEP_TIMEOUT_S} s: {shown}") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-4000:]
            raise DeployError(f"dlim step {step!r} failed (exit {done.returncode}): {shown}\n{output}")
        return done.stdout
