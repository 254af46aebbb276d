"""Inputs for demos and benchmarks: the shared sample IHC tiles when present, else a generated image."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from deepliif.imageio import IMAGE_SUFFIXES, read_image
from deepliif.contract import NETWORK_TILE
from deepliif.tiling import is_empty_tile

from .checkout import SHARED_DIR

SAMPLE_DIR_ENV = "DEEPLIIF_SAMPLE_DIR"

MINI_MODEL = SHARED_DIR / "fixtures" / "deepliif" / "models" / "mini"


def sample_dir(environment: Mapping[str, str] | None = None) -> Path:
    """`DEEPLIIF_SAMPLE_DIR` of the given environment (the CLI passes its own), else `../shared/data/ihc`
    beside the project checkout."""
    override = (environment or {}).get(SAMPLE_DIR_ENV)
    if override:
        return Path(override)
    return SHARED_DIR / "data" / "ihc"


def mini_model_dir() -> Path | None:
    """The small trained DeepLIIF of `../shared` (finds cells on the sample tiles; a demo and test model,
    not a clinical one), when that folder is beside the checkout."""
    return MINI_MODEL if (MINI_MODEL / "train_opt.txt").is_file() else None


def sample_images(directory: Path | None = None) -> list[Path]:
    """The images in `directory` (default: `sample_dir()`), sorted; none when it is absent."""
    directory = directory or sample_dir()
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def synthetic_ihc(height: int = NETWORK_TILE, width: int = NETWORK_TILE, seed: int = 0) -> np.ndarray:
    """A stand-in IHC image: pale background with brown (positive) and blue (negative) nuclei."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = (228, 222, 230)
    image += rng.normal(0, 6, size=image.shape)
    for _ in range(max(1, height * width // 2500)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(4, 10, size=2)
        colour = (150, 95, 60) if rng.random() < 0.3 else (95, 100, 165)
        top, left = max(0, int(cy - ry) - 1), max(0, int(cx - rx) - 1)  # the nucleus's bounding box
        yy, xx = np.mgrid[top:min(height, int(cy + ry) + 2), left:min(width, int(cx + rx) + 2)]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        window = image[top:top + inside.shape[0], left:left + inside.shape[1]]
        window[inside] = colour + rng.normal(0, 8, size=(int(inside.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def benchmark_tiles(count: int, images: Path | Sequence[Path] | None = None) -> tuple[np.ndarray, str]:
    """`count` non-empty 512x512 tiles (cycled when there are fewer) and a note saying where from.

    From `images` when given (one path or several), else from the shared sample tiles.
    """
    if isinstance(images, (str, Path)):
        images = [Path(images)]
    sources = list(images) if images else sample_images()
    tiles = []
    for path in sources:
        picture = read_image(path)
        for y in range(0, picture.shape[0] - NETWORK_TILE + 1, NETWORK_TILE):
            for x in range(0, picture.shape[1] - NETWORK_TILE + 1, NETWORK_TILE):
                tile = picture[y: y + NETWORK_TILE, x: x + NETWORK_TILE]
                if not is_empty_tile(tile):
                    tiles.append(tile)
    note = ", ".join(p.name for p in sources) if tiles else "a generated image"
    if not tiles:
        tiles = [synthetic_ihc(seed=i) for i in range(min(count, 4))]
    return np.stack([tiles[i % len(tiles)] for i in range(count)]), note
