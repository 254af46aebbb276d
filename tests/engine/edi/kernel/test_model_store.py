from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepliif.errors import ArgumentError
from deepliif.model_dir import load_model_dir
from engine.errors import ArtifactError
from engine.cli import main
from engine.edi.kernel.model_store import FETCHED, MANIFEST, ModelFetcher, ModelSource, upload_model
from engine.edi.kernel.storage import MountedVolume, StorageError

from ..conftest import ROOT


@pytest.fixture
def uploaded(edi_model: Path, tmp_path: Path) -> Path:
    volume = tmp_path / "volume"
    volume.mkdir()
    assert main(["upload-model", "--model-dir", str(edi_model), "--to", "models/deepliif", "--volume-root",
                 str(volume)]) == 0
    return volume


def fetch(volume: Path, target: Path) -> Path:
    return ModelFetcher(ModelSource.parse("volume:models/deepliif"), target, MountedVolume(volume)).fetch()


def test_upload_writes_every_file_and_a_manifest_of_sha256s(edi_model: Path, uploaded: Path) -> None:
    manifest = json.loads((uploaded / "models/deepliif" / MANIFEST).read_text())
    names = sorted(p.name for p in edi_model.iterdir() if p.is_file())
    assert sorted(manifest["files"]) == names
    for name, entry in manifest["files"].items():
        assert (uploaded / "models/deepliif" / name).read_bytes() == (edi_model / name).read_bytes()
        assert entry["size"] == (edi_model / name).stat().st_size and len(entry["sha256"]) == 64


def test_a_fetched_model_loads_and_a_second_fetch_reuses_it(edi_model: Path, uploaded: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    target = fetch(uploaded, tmp_path / "redhare" / "model")
    assert load_model_dir(target).weights_sha256() == load_model_dir(edi_model).weights_sha256()
    assert fetch(uploaded, target) == target
    assert len(re.findall("fetched model from", caplog.text)) == 1 and "model already fetched" in caplog.text
    assert not list(target.parent.glob(".model.fetch-*"))


def test_kernels_starting_together_fetch_once(uploaded: Path, tmp_path: Path) -> None:
    target = tmp_path / "redhare" / "model"
    code = ("import logging\nlogging.basicConfig(level=logging.INFO)\n"
            "from engine.edi.kernel.model_store import ModelFetcher, ModelSource\n"
            "from engine.edi.kernel.storage import MountedVolume\n"
            f"ModelFetcher(ModelSource.parse('volume:models/deepliif'), {str(target)!r}, "
            f"MountedVolume({str(uploaded)!r})).fetch()\n")
    processes = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    logs = [p.communicate(timeout=120)[1] for p in processes]
    assert all(p.returncode == 0 for p in processes), logs
    assert sum("fetched model from" in log for log in logs) == 1
    assert sum("another kernel" in log or "already fetched" in log for log in logs) == 2


def test_a_fetch_cut_short_leaves_nothing_that_loads_and_the_next_one_completes(uploaded: Path, tmp_path: Path) -> None:
    target = tmp_path / "redhare" / "model"
    target.parent.mkdir(parents=True)
    leftover = target.parent / ".model.fetch-killed"  # what a fetcher killed midway leaves
    leftover.mkdir()
    (leftover / "G1.pt").write_bytes(b"half")
    assert not target.exists()
    fetch(uploaded, target)
    assert not leftover.exists() and (target / FETCHED).is_file()


def test_a_file_that_does_not_match_the_manifest_is_refused_and_nothing_is_published(uploaded: Path,
                                                                                   tmp_path: Path) -> None:
    weights = sorted((uploaded / "models/deepliif").glob("*.pt"))[0]
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    target = tmp_path / "redhare" / "model"
    with pytest.raises(ArtifactError, match=f"{weights.name} .* does not match {MANIFEST}"):
        fetch(uploaded, target)
    assert not target.exists() and not list(target.parent.glob(".model.fetch-*"))


def test_a_new_upload_is_fetched_again(edi_model: Path, uploaded: Path, tmp_path: Path) -> None:
    target = fetch(uploaded, tmp_path / "redhare" / "model")
    (target / "stale-marker").write_text("from the first fetch")
    opt = edi_model / "train_opt.txt"
    changed = tmp_path / "changed-model"
    changed.mkdir()
    for file in edi_model.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    (changed / opt.name).write_text(opt.read_text() + "\n")
    upload_model(changed, MountedVolume(uploaded), "models/deepliif")
    fetch(uploaded, target)
    assert (target / opt.name).read_text() == opt.read_text() + "\n" and not (target / "stale-marker").exists()


def test_sources_and_targets_that_cannot_work_are_named(uploaded: Path, tmp_path: Path, edi_model: Path) -> None:
    with pytest.raises(ArgumentError, match="volume:<path"):
        ModelSource.parse("relative/model")
    with pytest.raises(StorageError, match=r"\.\."):
        ModelSource.parse("volume:../outside")
    with pytest.raises(ArgumentError, match="no volume is configured"):
        ModelFetcher(ModelSource.parse("volume:models/deepliif"), tmp_path / "m", None)
    with pytest.raises(ArtifactError, match="upload-model"):
        ModelFetcher(ModelSource.parse("volume:models/none"), tmp_path / "m", MountedVolume(uploaded)).fetch()
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "G1.pt").write_bytes(b"from the submission")
    with pytest.raises(ArgumentError, match="keep one of the two"):
        fetch(uploaded, shipped)
    local = ModelFetcher(ModelSource.parse(str(uploaded / "models/deepliif")), tmp_path / "local" / "model", None)
    assert load_model_dir(local.fetch()).weights_sha256() == load_model_dir(edi_model).weights_sha256()
