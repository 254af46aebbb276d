"""A DeepLIIF model directory read without loading weights: layout, option file, the file of each role.

Generator names are derived here, once, from the files present. Nothing here imports PyTorch: a process
that serves an exported graph names its model (the artifact cache key) without loading nine networks.
"""
from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelDirError
from .imageio import RememberedDigests, file_sha256
from .options import OPTION_FILE, TrainOptions, read_train_options


class Layout(enum.Enum):
    TORCHSCRIPT = "torchscript"
    CHECKPOINT = "checkpoint"

    def file_name(self, generator: str) -> str:
        return f"{generator}.pt" if self is Layout.TORCHSCRIPT else f"latest_net_{generator}.pth"

    @property
    def pattern(self) -> re.Pattern[str]:
        if self is Layout.TORCHSCRIPT:
            return re.compile(r"^(G[A-Za-z]*\d+)\.pt$")
        return re.compile(r"^latest_net_(G[A-Za-z]*\d+)\.pth$")


@dataclass(frozen=True)
class GeneratorNames:
    """Which file-level generator name plays which role.

    `translation[i]` turns IHC into `MODALITIES[i]`; `segmentation[0]` segments the IHC input and
    `segmentation[i + 1]` segments the generated `MODALITIES[i]`.
    """

    translation: tuple[str, ...]
    segmentation: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return self.translation + self.segmentation

    @classmethod
    def from_names(cls, names: set[str], modalities_no: int, where: Path) -> GeneratorNames:
        translation = tuple(f"G{i}" for i in range(1, modalities_no + 1))
        missing = [n for n in translation if n not in names]
        if missing:
            raise ModelDirError(f"{where}: translation generator weights missing for {', '.join(missing)}")
        seg = sorted((n for n in names if n not in translation), key=_trailing_number)
        prefixes = {re.sub(r"\d$", "", n) for n in seg}
        if len(seg) != modalities_no + 1 or len(prefixes) != 1:
            raise ModelDirError(
                f"{where}: expected {modalities_no + 1} segmentation generators sharing one name prefix "
                f"(e.g. G51...G55), found {seg or 'none'}")
        return cls(translation, tuple(seg))


def _trailing_number(name: str) -> int:
    return int(re.search(r"(\d+)$", name).group(1))  # names come from Layout.pattern, so digits exist


@dataclass(frozen=True)
class ModelFiles:
    """A model directory read without loading any weights: options, layout, and the file of each role.

    Enough to name the model (its identity keys the artifact cache) and to check the directory up front;
    a process that serves a cached export never needs the PyTorch modules.
    """

    directory: Path
    options: TrainOptions
    layout: Layout
    names: GeneratorNames
    files: dict[str, Path]

    def weights_sha256(self, memo: RememberedDigests | None = None) -> str:
        """Hash over the option file and every weight file, in role order: the model's identity."""
        digest = hashlib.sha256()
        for path in [self.directory / OPTION_FILE] + [self.files[n] for n in self.names.all]:
            digest.update(f"{path.name}:{file_sha256(path, memo)}\n".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        return (f"{self.directory}: {self.layout.value} layout; translation {','.join(self.names.translation)}; "
                f"segmentation {','.join(self.names.segmentation)}")


def read_model_files(model_dir: str | Path) -> ModelFiles:
    directory = Path(model_dir)
    if not directory.is_dir():
        raise ModelDirError(f"model directory {directory} does not exist or is not a directory")
    options = read_train_options(directory)
    layout, files = detect_layout(directory)
    names = GeneratorNames.from_names(set(files), options.modalities_no, directory)
    return ModelFiles(directory, options, layout, names, files)


def detect_layout(model_dir: Path) -> tuple[Layout, dict[str, Path]]:
    """Which layout the directory uses, and the generator files of that layout by name."""
    files = [p for p in model_dir.iterdir() if p.is_file()]
    for layout in (Layout.TORCHSCRIPT, Layout.CHECKPOINT):
        found = {m.group(1): p for p in files if (m := layout.pattern.match(p.name))}
        if found:
            return layout, found
    raise ModelDirError(
        f"{model_dir}: no generator weights found (expected G1.pt ... G55.pt or latest_net_G1.pth ...)")
