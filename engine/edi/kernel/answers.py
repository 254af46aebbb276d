"""The EDI contract's error answer, in one shape for every layer that can fail a request: the kernel's
records, kernel.py's last resort, the local endpoint and the kernel pool. `retry: true` says the request
itself was fine and may be sent again (the kernel was busy, or stopped before finishing it)."""
from __future__ import annotations

import json


def error_answer(msg: str, request_id: str | None = None, log: list[str] | None = None,
                 retry: bool = False) -> dict:
    answer = {"request_id": request_id, "status": "error", "msg": msg, "log": [msg] if log is None else log}
    return {**answer, "retry": True} if retry else answer


def error_json(msg: str, request_id: str | None = None, retry: bool = False) -> str:
    """The error answer as the JSON text a task's output or an HTTP body carries."""
    return json.dumps(error_answer(msg, request_id, retry=retry))


def request_id_in(body: str | bytes) -> str | None:
    """The `request_id` a body names, unchecked, for answers that echo it (None when it names none)."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed.get("request_id") if isinstance(parsed, dict) else None
