"""The EDI request contract (README, "EDI request/response contract"), parsed and checked up front.

Every problem becomes a `RequestError` whose message names the field and what was received; the
kernel turns it into `status: error` and goes on serving. Unknown fields are not errors (clients add
their own) but are reported back in `log`, since a misspelt `tile_size` silently ignored is worse.
"""
from __future__ import annotations

import hashlib

import binascii
import base64
import enum
import json
import re
import uuid
from dataclasses import dataclass, field

from deepliif.cell_data import CELL_DATA_VERSIONS
from deepliif.errors import DeepLIIFError, parse_enum
from deepliif.inference import OutputSet
from deepliif.contract import check_seg_weights
from deepliif.scoring_rules import PostprocessOptions
from deepliif.tiling import DEFAULT_TILE_SIZE, check_tile_size

from .layout import RESERVED_NAMES
from .storage import clean_relative_path

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: no trailing newline
INFERENCE_FIELDS = {"type", "img_path_on_pvc", "local_input_image", "tile_size", "images_to_return",
                    "request_id", "async", "seg_weights", "seg_thresh", "size_thresh", "size_thresh_upper",
                    "marker_thresh", "large_noise_thresh", "od_thresh_lower", "od_thresh_upper", "cell_data",
                    "seg_intermediate", "color_dapi", "color_marker"}
EQUAL_SEG_WEIGHTS = check_seg_weights(None)


class RequestError(DeepLIIFError):
    """The request breaks the contract; the message says which field and why."""


class RetryLaterError(RequestError):
    """The request was not run through no fault of its own (the kernel is busy): the same request, sent
    again later, can succeed. Its answer carries `"retry": true`."""


class RequestInUseError(RequestError):
    """The request_id belongs to a request that is still submitted or running."""


class RequestIdTakenError(RequestInUseError):
    """The request_id belongs to another request (different content): ids are never reused."""


def fingerprint(body: str | bytes) -> str:
    """What makes two requests the same request: their JSON content, key order aside, without the id."""
    record = json.loads(body)
    record.pop("request_id", None)
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RequestType(enum.Enum):
    INFERENCE = "inference"
    STATUS = "status"


@dataclass(frozen=True)
class StatusRequest:
    request_id: str


@dataclass(frozen=True)
class InferenceRequest:
    request_id: str
    image_path: str | None          # relative to the volume root
    image_base64: str | None
    tile_size: int | None = None    # None: DeepLIIF's default (images), by magnification (slides)
    outputs: OutputSet = OutputSet.ALL
    run_async: bool | None = None   # None: decided by the estimated run time
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    warnings: tuple[str, ...] = ()
    cell_data: int | None = None    # DeepLIIF 1.2.7's per-cell data of this version (3 to 6) as well
    seg_intermediate: bool = False  # each segmentation generator's own output as well (torch kernels)

    @property
    def image_tile_size(self) -> int:
        """The tile size for an image (slides take theirs from the magnification when none is given)."""
        return self.tile_size or DEFAULT_TILE_SIZE

    def decode_image_bytes(self) -> bytes:
        """The base64 payload as bytes (strict: a stray character is an error, not silently dropped)."""
        text = self.image_base64 or ""
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"local_input_image is not valid base64 ({exc})") from None
        if not data:
            raise RequestError("local_input_image decodes to zero bytes")
        return data


def parse_request(body: str | bytes) -> InferenceRequest | StatusRequest:
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"request body is not UTF-8 text ({exc})") from None
    try:
        record = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise RequestError(f"request body must be a JSON object; got {type(record).__name__}")
    kind = _field(lambda v: parse_enum(RequestType, v, "type"), record.get("type", "inference"))
    if kind is RequestType.STATUS:
        if "request_id" not in record:
            raise RequestError("a status request needs the request_id of the request it asks about")
        return StatusRequest(check_request_id(record["request_id"]))
    return _inference(record)


def _field(parse, value):
    try:
        return parse(value)
    except DeepLIIFError as exc:
        raise RequestError(str(exc)) from None


def check_request_id(value: object) -> str:
    if isinstance(value, str) and value.lower() in RESERVED_NAMES:
        raise RequestError(f"request_id {value!r} is reserved (a folder of the deployment's own: "
                           f"{', '.join(RESERVED_NAMES)}); choose another")
    if not isinstance(value, str) or not REQUEST_ID_PATTERN.fullmatch(value) or ".." in value:
        raise RequestError("request_id must be 1-128 characters of letters, digits, '.', '_' or '-', starting "
                           f"with a letter or digit, without '..' or '/'; got {value!r}")
    return value


def _inference(record: dict) -> InferenceRequest:
    warnings = []
    path, image = record.get("img_path_on_pvc"), record.get("local_input_image")
    if path is None and image is None:
        raise RequestError("request has no image: give img_path_on_pvc (a path on the volume) or "
                           "local_input_image (base64 of an image file)")
    if path is not None:
        path = _field(lambda v: clean_relative_path(v, "img_path_on_pvc"), path)
        if image is not None:
            warnings.append("both img_path_on_pvc and local_input_image were given; using img_path_on_pvc")
            image = None
    elif not isinstance(image, str) or not image:
        raise RequestError(f"local_input_image must be a non-empty base64 string; got {type(image).__name__}")
    request_id = check_request_id(record["request_id"]) if "request_id" in record else str(uuid.uuid4())
    tile_size = record.get("tile_size")
    tile_size = None if tile_size is None else _field(check_tile_size, tile_size)
    outputs = _field(lambda v: parse_enum(OutputSet, v, "images_to_return"), record.get("images_to_return", "all"))
    run_async = record.get("async")
    if run_async is not None and not isinstance(run_async, bool):
        raise RequestError(f"async must be true or false (JSON booleans); got {run_async!r}")
    _check_seg_weights(record.get("seg_weights"))
    unknown = sorted(set(record) - INFERENCE_FIELDS)
    if unknown:
        warnings.append(f"ignored unknown field(s): {', '.join(unknown)}")
    flags = {name: _flag(record, name) for name in ("seg_intermediate", "color_dapi", "color_marker")}
    if flags["color_dapi"] or flags["color_marker"]:
        warnings.append("color_dapi/color_marker: DeepLIIF 1.2.7 returns the same images with them, as this does")
    return InferenceRequest(request_id, path, image, tile_size, outputs, run_async, _postprocess(record),
                            tuple(warnings), _cell_data_version(record.get("cell_data")), flags["seg_intermediate"])


def _flag(record: dict, name: str) -> bool:
    value = record.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false (JSON booleans); got {value!r}")
    return value


def _cell_data_version(value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or value not in CELL_DATA_VERSIONS):
        raise RequestError(f"cell_data must be one of {', '.join(map(str, CELL_DATA_VERSIONS))} (DeepLIIF's "
                           f"cell-data versions); got {value!r}")
    return value


def _check_seg_weights(value: object) -> None:
    """The served graph averages the five segmentations with equal weights, baked in at export; other
    weights need another export, so they are refused rather than silently ignored."""
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                              for w in value):
        raise RequestError(f"seg_weights must be a list of 5 numbers; got {value!r}")
    weights = _field(check_seg_weights, value)
    if any(abs(a - b) > 1e-6 for a, b in zip(weights, EQUAL_SEG_WEIGHTS)):
        raise RequestError(f"this deployment serves equal seg_weights {list(EQUAL_SEG_WEIGHTS)} (built into its "
                           f"engine); got {value!r}")


def _postprocess(record: dict) -> PostprocessOptions:
    keys = ("seg_thresh", "size_thresh", "size_thresh_upper", "marker_thresh", "large_noise_thresh",
            "od_thresh_lower", "od_thresh_upper")
    given = {key: record[key] for key in keys if key in record}
    return _field(lambda kwargs: PostprocessOptions(**kwargs), given)
