"""The calibration set: which tiles of which images the INT8 scales are measured on.

Tiles are cut exactly as inference cuts them (DeepLIIF's grid and overlap, resized to the network tile),
empty tiles are dropped as inference drops them (they never reach the network, so they must not shape the
scales), and N are drawn with a seeded generator. The list (source file, its sha256, position) is kept in
`calibration.json`, so a calibration can be repeated, audited and kept apart from the held-out images.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deepliif.errors import ArgumentError, ImageError
from deepliif.imageio import DEFAULT_MAX_PIXELS, file_sha256, read_image, write_json
from deepliif.contract import NETWORK_TILE
from deepliif.tiling import TileGrid, check_tile_size, extend_by_mirroring, is_empty_tile, resize_tile

from . import logger

CALIBRATION_FILE = "calibration.json"
DEFAULT_SEED = 0


@dataclass(frozen=True)
class CalibrationTile:
    """One tile of one source image: its top-left corner in the (mirror-extended) image."""

    source: str
    sha256: str
    x: int
    y: int
    tile_size: int


@dataclass(frozen=True)
class CalibrationSet:
    tiles: tuple[CalibrationTile, ...]
    seed: int
    candidates: int  # non-empty tiles the sample was drawn from

    def write(self, path: Path) -> None:
        write_json(path, {"seed": self.seed, "candidates": self.candidates,
                          "tiles": [asdict(t) for t in self.tiles]})

    @classmethod
    def read(cls, path: Path) -> CalibrationSet:
        try:
            record = json.loads(Path(path).read_text())
            tiles = tuple(CalibrationTile(**entry) for entry in record["tiles"])
            return cls(tiles, int(record["seed"]), int(record["candidates"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArgumentError(f"{path}: not a readable calibration list ({exc})") from exc

    @property
    def sources(self) -> set[str]:
        return {t.sha256 for t in self.tiles}

    def arrays(self) -> np.ndarray:
        """The tiles as a `[N, 512, 512, 3]` uint8 batch, re-read from their sources (checked by sha256)."""
        images: dict[str, np.ndarray] = {}
        batch = []
        for tile in self.tiles:
            if tile.source not in images:
                if file_sha256(Path(tile.source)) != tile.sha256:
                    raise ImageError(f"{tile.source}: changed since it was chosen for calibration")
                images[tile.source] = extend_by_mirroring(read_image(tile.source), tile.tile_size)
            crop = images[tile.source][tile.y: tile.y + tile.tile_size, tile.x: tile.x + tile.tile_size]
            batch.append(resize_tile(crop, NETWORK_TILE))
        return np.stack(batch)


def non_empty_tiles(path: Path, tile_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[CalibrationTile]:
    """Every tile of one image that inference would run (empty ones left out)."""
    image = extend_by_mirroring(read_image(path, max_pixels=max_pixels), tile_size)
    digest = file_sha256(path)
    grid = TileGrid(image.shape[1], image.shape[0], tile_size)
    return [CalibrationTile(str(path), digest, t.x, t.y, tile_size) for t in grid
            if not is_empty_tile(grid.crop(image, t))]


def choose_tiles(images: Sequence[Path], count: int, seed: int = DEFAULT_SEED, tile_size: int = NETWORK_TILE
                 ) -> CalibrationSet:
    """Draw `count` non-empty tiles (all of them when there are fewer) from `images`, reproducibly."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ArgumentError(f"the number of calibration tiles must be a positive integer; got {count!r}")
    check_tile_size(tile_size)
    if not images:
        raise ArgumentError("no calibration images given")
    candidates = [tile for path in images for tile in non_empty_tiles(Path(path), tile_size)]
    if not candidates:
        raise ArgumentError(f"no non-empty tiles in {len(images)} calibration image(s) "
                            f"({', '.join(str(p) for p in images)}): every tile is blank or uniform")
    chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
    if len(chosen) < count:
        logger.warning("only %d non-empty tiles available; calibrating on all of them (asked for %d)",
                       len(chosen), count)
    return CalibrationSet(tuple(chosen), seed, len(candidates))
