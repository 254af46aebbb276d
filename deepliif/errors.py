"""The project's exceptions: one base class, one subclass per kind of failure.

Every error a user can cause (a bad model directory, a bad image, a bad argument) is raised as one of
these with a message that names the offending file or value, so callers (CLI, EDI kernel) can report it
in one line instead of a traceback.
"""
from __future__ import annotations

import enum


class DeepLIIFError(Exception):
    """Base class of every error this project raises on purpose."""


class ModelDirError(DeepLIIFError):
    """The model directory, its option file or a weight file is missing or unreadable."""


class UnsupportedModelError(DeepLIIFError):
    """The model directory describes a model this engine does not implement."""


class WeightsMismatchError(DeepLIIFError):
    """Weights do not fit the architecture they claim (missing/unexpected keys, wrong shapes)."""


class ImageError(DeepLIIFError):
    """An input image cannot be decoded, is empty, too large, or of an unsupported kind."""


class ArgumentError(DeepLIIFError):
    """An argument is out of range or of the wrong type."""


def parse_enum(cls, value: object, what: str):
    """`cls(value)` for an enum of lower-case string values (members pass through), or an
    ArgumentError naming `what`, the choices and the value received."""
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        choices = ", ".join(member.value for member in cls)
        raise ArgumentError(f"{what} must be one of {choices}; got {value!r}") from None


class ChoiceEnum(enum.Enum):
    """An enum of lower-case string values that user input is parsed into, with the message `parse_enum`
    gives; `choice_name` is what the message calls the value."""

    @classmethod
    def choice_name(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def parse(cls, value: object):
        return parse_enum(cls, value, cls.choice_name())
