"""A request_id belongs to its first request; records name their kernel, whose heartbeat says if it lives."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from engine.edi.kernel import records as records_module
from engine.edi.kernel.mounted import MountedVolume
from engine.edi.kernel.service import EdiService
from engine.edi.kernel.storage import StorageError

from ..conftest import call as _call, b64, make_volume, settings_for


def test_a_retry_is_answered_never_run_twice_and_other_content_is_refused(service: EdiService, tile_png: bytes,
                                                                          engine_passes: list[int]) -> None:
    runs = engine_passes
    request = {"img_path_on_pvc": "slides/tile.png", "request_id": "own-1"}
    (first,) = _call(service, request)
    (retry,) = _call(service, {"request_id": "own-1", "img_path_on_pvc": "slides/tile.png"})  # key order aside
    assert first["status"] == retry["status"] == "finished" and retry["output_dir"] == first["output_dir"]
    assert retry["scoring"] == first["scoring"] and runs == [1]  # answered from the record
    (other,) = _call(service, {"img_path_on_pvc": "slides/wide.png", "request_id": "own-1"})
    assert other["status"] == "error" and "already used by another request" in other["msg"]
    assert service.status.read("own-1")["status"] == "finished"  # the refusal did not touch the owner's record
    (inline,) = _call(service, {"local_input_image": b64(tile_png), "request_id": "own-1"})
    assert inline["status"] == "error" and runs == [1]  # a sync request cannot replace a used id's outputs


def test_a_failed_request_may_run_again_under_its_id(service: EdiService, monkeypatch: pytest.MonkeyPatch) -> None:
    request = {"img_path_on_pvc": "slides/late.png", "request_id": "own-2"}
    (missing,) = _call(service, request)
    assert missing["status"] == "error" and "no such file" in missing["msg"]
    (service.volume.root / "slides" / "late.png").write_bytes((service.volume.root / "slides/tile.png").read_bytes())
    (again,) = _call(service, request)
    assert again["status"] == "finished"


def test_records_of_a_kernel_without_heartbeat_are_lost_and_settled_at_start(edi_model: Path, edi_cache: Path,
                                                                             tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "volume")
    service = EdiService(settings_for(edi_model, volume, edi_cache, tmp_path / "state", pod="pod-live"))
    try:
        records = service.records
        records.status.write("dead-1", {"status": "running", "kernel": "pod-gone.1.abc", "pod": "pod-gone"})
        stale = time.time() - records_module.STALE_AFTER_S - 5
        old = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(stale))
        service.state.write_bytes(f"{records.layout.base}/edi_kernels/pod-quiet.2.def.json",
                                  json.dumps({"heartbeat_at": old}).encode())
        records.status.write("quiet-1", {"status": "submitted", "kernel": "pod-quiet.2.def", "pod": "pod-quiet"})
        records.status.write("alive-1", {"status": "running", "kernel": records.kernel, "pod": "pod-live"})
        (dead,) = _call(service, {"type": "status", "request_id": "dead-1"})
        assert "lost: kernel pod-gone.1.abc stopped" in dead["msg"] and dead["retry"] is True
        assert _call(service, {"type": "status", "request_id": "quiet-1"})[0]["status"] == "error"
        assert _call(service, {"type": "status", "request_id": "alive-1"})[0]["status"] == "running"
        assert records.status.read("dead-1")["status"] == "running"  # reading reported it; it wrote nothing
    finally:
        service.close()
    restarted = EdiService(settings_for(edi_model, volume, edi_cache, tmp_path / "state", pod="pod-other"))
    try:
        assert restarted.records.status.read("dead-1")["status"] == "error"  # settled at start
        assert restarted.records.status.read("dead-1")["retry"] is True
        assert restarted.records.status.read("quiet-1")["status"] == "error"
        assert restarted.records.status.read("alive-1")["status"] == "error"  # its kernel closed: heartbeat gone
    finally:
        restarted.close()


def test_swapping_a_folder_for_a_symlink_mid_read_never_reads_outside(tmp_path: Path) -> None:
    """Regression: check-then-open let 29 of 150 reads copy a file from outside the volume."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "slides").mkdir(parents=True)
    outside.mkdir()
    (outside / "tile.png").write_bytes(b"SECRET")
    (root / "slides" / "tile.png").write_bytes(b"inside")
    volume = MountedVolume(root)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(root / "slides", root / "real")
            os.symlink(outside, root / "slides")
            os.unlink(root / "slides")
            os.rename(root / "real", root / "slides")

    swapper = threading.Thread(target=swap)
    swapper.start()
    seen = []
    try:
        for _ in range(3000):
            try:
                seen.append(volume.read_bytes("slides/tile.png", 100))
            except StorageError:
                pass
    finally:
        stop.set()
        swapper.join()
    assert b"SECRET" not in seen and b"inside" in seen
