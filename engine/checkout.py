"""Where the project's checkout is, stated once: the folder holding `kernel.py`, `model.json` and the
packages, and `../shared` beside it. An installed copy of the packages (a non-editable install) has no
checkout around it; what needs one (`package`, `serve`'s defaults, the demo) says so instead of failing on a
missing file somewhere inside site-packages."""
from __future__ import annotations

from pathlib import Path

from deepliif.errors import ArgumentError

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # engine/ sits at the checkout's top level
SHARED_DIR = PROJECT_ROOT.parent / "shared"  # the project's fixtures and sample data, beside the checkout
CHECKOUT_MARKER = "kernel.py"


def is_checkout(root: Path = PROJECT_ROOT) -> bool:
    return (root / CHECKOUT_MARKER).is_file() and (root / "pyproject.toml").is_file()


def checkout_file(name: str, root: Path = PROJECT_ROOT) -> Path:
    """`root/name`, or an ArgumentError saying that this needs the project's checkout."""
    if not is_checkout(root):
        raise ArgumentError(f"{name} comes from the project's checkout, but these packages run from {root}, "
                            "which is not one (a non-editable install); run from a clone (pip install -e .)")
    path = root / name
    if not path.exists():
        raise ArgumentError(f"{path} is missing from the project's checkout")
    return path
