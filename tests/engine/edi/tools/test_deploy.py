"""`deploy` against a stand-in `dlim` on PATH that records its arguments and answers like dlim."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from deepliif.errors import ArgumentError
from engine.cli import main
from engine.edi.tools.deploy import Deployment, DlimConnection, ProfileSettings

STAND_IN = '''#!{python}
"""dlim as far as deploy uses it: records argv, prints a deployed profile for viewprofile -j, fails on request."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["DLIM_RECORD"], "a") as record:
    entry = {{"argv": args}}
    if "updateprofile" in args:
        entry["profile"] = json.load(open(args[args.index("-f") + 1]))
    record.write(json.dumps(entry) + "\\n")
step = args[1] if len(args) > 1 else ""
if os.environ.get("DLIM_FAIL") == step:
    print(f"Error: {{step}} refused: model deepliif-test already exists", file=sys.stderr)
    sys.exit(3)
if step == "viewprofile":
    print(json.dumps({{"name": args[2], "kernel": {{"gpu": "shared", "runtime": "dlipy3"}},
                      "resource_allocation": {{"kernel": {{"resources": "ncpus=1,mem=1024"}}}},
                      "policy": {{"kernel_min": 1, "kernel_max": 1, "schedule_interval": 3}},
                      "replica": 1}}))
else:
    print(f"{{step}} done")
'''


@pytest.fixture
def dlim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "dlim"
    script.write_text(STAND_IN.format(python=sys.executable))
    script.chmod(0o755)
    record = tmp_path / "dlim-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DLIM_RECORD", str(record))
    monkeypatch.setenv("USER_ACCESS_TOKEN", "secret-token-123")
    monkeypatch.delenv("DLIM_FAIL", raising=False)
    return record


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "submission"
    assert main(["package", "--out", str(out), "--name", "deepliif-test", "--model-source",
                 "volume:models/deepliif"]) == 0
    return out


def calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_deploy_runs_the_dlim_sequence_in_order_with_the_edited_profile(dlim: Path, packaged: Path, capsys) -> None:
    assert main(["deploy", str(packaged), "--rest-server", "https://cpd.example/dlim/v1/", "--kernel-max", "8",
                 "--ncpus", "6", "--task-batch-size", "8"]) == 0
    made = calls(dlim)
    steps = [c["argv"][:2] for c in made]
    assert steps == [["model", "deploy"], ["model", "viewprofile"], ["model", "updateprofile"], ["model", "start"]]
    assert made[0]["argv"][2:4] == ["-p", str(packaged)] and made[1]["argv"][2:4] == ["deepliif-test", "-j"]
    for call in made:  # every call reaches the same server with the token from $USER_ACCESS_TOKEN
        tail = call["argv"][-4:]
        assert tail == ["--rest-server", "https://cpd.example/dlim/v1/", "--jwt-token", "secret-token-123"]
    profile = made[2]["profile"]
    assert profile["kernel"] == {"gpu": "exclusive", "runtime": "dlipy3"}  # edited, the rest kept
    assert profile["policy"]["kernel_max"] == 8 and profile["policy"]["task_batch_size"] == 8
    assert profile["policy"]["schedule_interval"] == 3 and profile["replica"] == 1
    assert profile["policy"]["task_execution_timeout"] == 120  # from the folder's model-profile.json
    resources = dict(kv.split("=") for kv in profile["resource_allocation"]["kernel"]["resources"].split(","))
    assert resources["ncpus"] == "6" and resources["ncpus_limit"] == "12" and resources["mem_limit"] == "65536"
    assert "secret-token-123" not in capsys.readouterr().out


def test_dry_run_prints_the_exact_commands_and_runs_nothing(dlim: Path, packaged: Path, capsys) -> None:
    assert main(["deploy", str(packaged), "--rest-server", "https://cpd.example/dlim/v1/", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    tail = '--rest-server https://cpd.example/dlim/v1/ --jwt-token "$USER_ACCESS_TOKEN"'
    assert printed[0] == f"dlim model deploy -p {packaged} {tail}"
    assert printed[1] == f"dlim model viewprofile deepliif-test -j {tail} > PROFILE.json"
    assert json.loads(printed[2].removeprefix("# set in PROFILE.json: "))["kernel"]["gpu"] == "exclusive"
    assert printed[3:] == [f"dlim model updateprofile deepliif-test -f PROFILE.json {tail}",
                           f"dlim model start deepliif-test {tail}"]
    assert not dlim.exists()


@pytest.mark.parametrize("failing, ran", [("deploy", 1), ("viewprofile", 2), ("updateprofile", 3), ("start", 4)])
def test_a_failing_step_stops_the_sequence_with_its_output(dlim: Path, packaged: Path, capsys,
                                                           monkeypatch: pytest.MonkeyPatch, failing: str,
                                                           ran: int) -> None:
    monkeypatch.setenv("DLIM_FAIL", failing)
    assert main(["deploy", str(packaged)]) == 2
    err = capsys.readouterr().err
    assert f"dlim step {failing!r} failed (exit 3)" in err and f"{failing} refused: model deepliif-test" in err
    assert "secret-token-123" not in err and "****" in err
    assert len(calls(dlim)) == ran


def test_deploy_refuses_what_cannot_be_deployed(packaged: Path, tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="not a packaged folder"):
        Deployment(tmp_path, "x")
    with pytest.raises(ArgumentError, match="names the deployment 'deepliif-test', not 'other'"):
        Deployment(packaged, "other")
    with pytest.raises(ArgumentError, match="kernel_max"):
        ProfileSettings(kernel_min=4, kernel_max=2)
    with pytest.raises(ArgumentError, match="not on PATH"):
        Deployment(packaged, None, DlimConnection(), dlim="no-such-dlim-here").run()
    assert json.loads((packaged / "model.json").read_text())["mk_environments"][-1] == {
        "name": "DEEPLIIF_MODEL_SOURCE", "value": "volume:models/deepliif"}


def test_serve_batches_tasks_as_the_profile_says(tmp_path: Path) -> None:
    """`serve` hands a kernel call as many tasks as the deployment's profile will (policy.task_batch_size)."""
    from engine.edi.tools.deploy import PROFILE_TEMPLATE, profile_task_batch_size
    from engine.checkout import PROJECT_ROOT
    shipped = json.loads((PROJECT_ROOT / PROFILE_TEMPLATE).read_text())["policy"]["task_batch_size"]
    assert profile_task_batch_size(PROJECT_ROOT / PROFILE_TEMPLATE) == shipped
    profile = tmp_path / PROFILE_TEMPLATE
    profile.write_text(json.dumps({"policy": {"task_batch_size": 7}}))
    assert profile_task_batch_size(profile) == 7
    profile.write_text(json.dumps({"policy": {"task_batch_size": 0}}))
    with pytest.raises(ArgumentError, match="task_batch_size must be a positive integer; got 0"):
        profile_task_batch_size(profile)
    assert profile_task_batch_size(tmp_path / "absent.json") == 4
