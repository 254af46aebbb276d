"""Reading DeepLIIF's `train_opt.txt`.

The file is written by the training code as `key: value` lines (values are Python literals, sometimes
followed by `[default: ...]`) between two banner lines. Two eras exist: old files say `targets_no: 5`
(the IHC input counted as a target), newer ones `modalities_no: 4`.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelDirError, UnsupportedModelError

OPTION_FILE = "train_opt.txt"
_DEFAULT_SUFFIX = re.compile(r"\s*\[default:.*\]\s*$")


def parse_option_text(text: str) -> dict[str, Any]:
    """Parse `key: value` lines; values become Python objects where they are literals."""
    values: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition(":")
        key = key.strip()
        if not sep or not key or " " in key or key.startswith("-"):
            continue
        values[key] = _parse_value(_DEFAULT_SUFFIX.sub("", raw).strip())
    return values


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


@dataclass(frozen=True)
class TrainOptions:
    """The options that decide which networks a DeepLIIF directory holds."""

    model: str = "DeepLIIF"
    modalities_no: int = 4
    ngf: int = 64
    norm: str = "batch"
    netG: str = "resnet_9blocks"
    net_gs: str = "unet_512"
    padding: str = "zero"
    no_dropout: bool = False
    input_nc: int = 3
    output_nc: int = 3
    upsample: str = "convtranspose"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = OPTION_FILE) -> TrainOptions:
        modalities = values.get("modalities_no")
        if modalities is None and "targets_no" in values:
            modalities = int(values["targets_no"]) - 1  # old era counted the IHC input as a target
        try:
            options = cls(
                model=str(values.get("model", "DeepLIIF")),
                modalities_no=int(modalities if modalities is not None else 4),
                ngf=int(values.get("ngf", 64)),
                norm=str(values.get("norm", "batch")),
                netG=str(values.get("netG", "resnet_9blocks")),
                net_gs=str(values.get("net_gs", "unet_512")),
                padding=str(values.get("padding", "zero")),
                no_dropout=bool(values.get("no_dropout", False)),
                input_nc=int(values.get("input_nc", 3)),
                output_nc=int(values.get("output_nc", 3)),
                upsample=str(values.get("upsample", "convtranspose")),
                raw=dict(values),
            )
        except (TypeError, ValueError) as exc:
            raise ModelDirError(f"{source}: an option has a value of the wrong type ({exc})") from exc
        options.check_supported(source)
        return options

    def check_supported(self, source: str = OPTION_FILE) -> None:
        """Refuse option sets that describe a different model than the one implemented here."""
        expected = {
            "model": "DeepLIIF", "modalities_no": 4, "norm": "batch", "netG": "resnet_9blocks",
            "net_gs": "unet_512", "input_nc": 3, "output_nc": 3, "upsample": "convtranspose",
        }
        wrong = [f"{k}={getattr(self, k)!r} (supported: {v!r})" for k, v in expected.items()
                 if getattr(self, k) != v]
        if self.padding not in ("zero", "reflect"):
            wrong.append(f"padding={self.padding!r} (supported: 'zero', 'reflect')")
        if wrong:
            raise UnsupportedModelError(f"{source} describes an unsupported model: " + "; ".join(wrong))


def read_train_options(model_dir: Path) -> TrainOptions:
    """Read and validate `train_opt.txt` of a model directory."""
    path = Path(model_dir) / OPTION_FILE
    if not path.is_file():
        raise ModelDirError(
            f"{path} is missing: a DeepLIIF model directory holds {OPTION_FILE} beside its weights")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{path} cannot be read: {exc}") from exc
    values = parse_option_text(text)
    if not values:
        raise ModelDirError(f"{path} holds no 'key: value' option lines")
    return TrainOptions.from_mapping(values, source=str(path))
