from __future__ import annotations

import json

from engine.edi.kernel.answers import error_answer, error_json, request_id_in


def test_one_error_answer_shape() -> None:
    assert error_answer("bad") == {"request_id": None, "status": "error", "msg": "bad", "log": ["bad"]}
    assert error_answer("busy", "r1", retry=True)["retry"] is True
    assert "retry" not in error_answer("bad", "r1")
    assert json.loads(error_json("x", "r2")) == error_answer("x", "r2")


def test_request_id_in_bodies_of_any_shape() -> None:
    assert request_id_in(b'{"request_id": "r1"}') == "r1"
    assert request_id_in(b"[1, 2]") is None
    assert request_id_in(b"\xff not json") is None
    assert request_id_in("{}") is None
