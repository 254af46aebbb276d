"""Every request leaves a status record, one image can be asked for, and every response field the kernel
emits is documented in README.md's contract."""
from __future__ import annotations

import json
import re
import time

from engine.edi.kernel.service import EdiService

from .conftest import ROOT, b64


def _call(service: EdiService, *payloads: dict) -> list[dict]:
    return [json.loads(r) for r in service.handle([json.dumps(p) for p in payloads])]


def _wait(service: EdiService, request_id: str) -> dict:
    for _ in range(600):
        (status,) = _call(service, {"type": "status", "request_id": request_id})
        if status["status"] in ("finished", "error"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"{request_id} did not finish")


def test_a_finished_sync_request_has_a_status_and_one_image_can_be_asked_for(service: EdiService,
                                                                             tile_png: bytes) -> None:
    """Regression: a status request for a finished sync request answered `error` ("no request is known")."""
    (done,) = _call(service, {"local_input_image": b64(tile_png), "request_id": "sync-1",
                              "images_to_return": "Hema"})
    assert done["status"] == "finished" and sorted(done["images"]) == ["local.png", "local_Hema.png"]
    (status,) = _call(service, {"type": "status", "request_id": "sync-1"})
    assert status["status"] == "finished" and status["scoring"] == done["scoring"] and "images" not in status
    (failed,) = _call(service, {"img_path_on_pvc": "slides/missing.png", "request_id": "sync-2"})
    (status,) = _call(service, {"type": "status", "request_id": "sync-2"})
    assert failed["status"] == status["status"] == "error" and status["msg"] == failed["msg"]


def _documented_fields() -> set[str]:
    text = (ROOT / "README.md").read_text()
    contract = text[text.index("### EDI request/response contract"):text.index("### Kernel environment")]
    return set(re.findall(r"`([a-z_]+)`", contract))


def test_every_response_field_is_documented(service: EdiService, tile_png: bytes) -> None:
    responses = _call(service, {"local_input_image": b64(tile_png), "request_id": "doc-1"},
                      {"img_path_on_pvc": "slides/tile.png", "request_id": "doc-2"},
                      {"img_path_on_pvc": "slides/tile.png", "request_id": "doc-3", "async": True},
                      {"local_input_image": b64(tile_png), "request_id": "doc-4", "async": True},
                      {"img_path_on_pvc": "../outside.png", "request_id": "doc-5"})
    responses += [_wait(service, "doc-3"), _wait(service, "doc-4")]
    responses += _call(service, {"type": "status", "request_id": "doc-1"}, {"type": "status", "request_id": "nope"})
    emitted = {key for response in responses for key in response}
    emitted |= {f"{key}" for response in responses for key in response.get("timings", {})}
    emitted |= {key for response in responses for key in response.get("scoring", {})}
    undocumented = emitted - _documented_fields()
    assert not undocumented, f"response fields missing from README's contract: {sorted(undocumented)}"
    assert {"output_location", "submitted_at", "estimated_seconds", "local_input"} <= emitted


def test_cell_data_is_answered_inline_or_written_beside_the_outputs(service: EdiService, tile_png: bytes) -> None:
    """`cell_data` (3 to 6): DeepLIIF 1.2.7's per-cell data, inline for a base64 image, as
    `<stem>_cells.json` in the output folder for an image on the volume; another value is refused by name."""
    (inline,) = _call(service, {"local_input_image": b64(tile_png), "request_id": "cells-1", "cell_data": 6})
    assert inline["status"] == "finished" and inline["cell_data"]["dataVersion"] == 6
    assert set(inline["cell_data"]) == {"cells", "settings", "dataVersion"}
    assert len(inline["cell_data"]["cells"]) >= inline["scoring"]["num_total"]
    (written,) = _call(service, {"img_path_on_pvc": "slides/tile.png", "request_id": "cells-2", "cell_data": 3})
    assert written["status"] == "finished" and "cell_data" not in written
    document = json.loads((service.volume.root / written["output_dir"] / "tile_cells.json").read_text())
    assert document["dataVersion"] == 3 and "default_marker_thresh" in document["settings"]
    (refused,) = _call(service, {"local_input_image": b64(tile_png), "request_id": "cells-3", "cell_data": 7})
    assert refused["status"] == "error" and "cell_data must be one of 3, 4, 5, 6" in refused["msg"]


def test_seg_intermediate_is_answered_by_a_torch_kernel_and_refused_by_others(
        service: EdiService, edi_model, edi_cache, tile_png: bytes, tmp_path) -> None:
    """`seg_intermediate`: a torch kernel answers the five per-generator segmentations as well; a kernel on
    an exported graph refuses by name, as it refuses a slide; `color_dapi`/`color_marker` change nothing
    (as in DeepLIIF 1.2.7) and say so in `log`; a flag that is not a JSON boolean is refused."""
    from .conftest import make_volume, settings_for
    (refused,) = _call(service, {"local_input_image": b64(tile_png), "request_id": "segs-1", "seg_intermediate": True})
    assert refused["status"] == "error" and "needs a kernel on the torch backend" in refused["msg"]
    (coloured,) = _call(service, {"local_input_image": b64(tile_png), "request_id": "segs-2", "color_dapi": True,
                                  "images_to_return": "DAPI"})
    assert coloured["status"] == "finished" and any("color_dapi" in line for line in coloured["log"])
    (bad,) = _call(service, {"local_input_image": b64(tile_png), "request_id": "segs-3", "color_marker": "yes"})
    assert bad["status"] == "error" and "color_marker must be true or false" in bad["msg"]
    torch_kernel = EdiService(settings_for(edi_model, make_volume(tmp_path / "volume"), edi_cache, tmp_path / "state",
                                           backend="torch"))
    try:
        (answered,) = _call(torch_kernel, {"local_input_image": b64(tile_png), "request_id": "segs-4",
                                           "seg_intermediate": True, "images_to_return": "Seg"})
        (plain,) = _call(torch_kernel, {"local_input_image": b64(tile_png), "request_id": "segs-5"})
    finally:
        torch_kernel.close()
    assert answered["status"] == "finished", answered
    assert sorted(answered["images"]) == sorted(["local.png", "local_Seg.png"] + [
        f"local_{source}_s.png" for source in ("IHC", "Hema", "DAPI", "Lap2", "Marker")])
    assert plain["status"] == "finished" and not any(name.endswith("_s.png") for name in plain["images"])
