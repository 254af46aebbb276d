"""Whole-slide images behind one small interface: what a slide is (size, pixel size, magnification) and
level-0 pixels read region by region, never the whole slide.

Read with tiffslide (pure Python on tifffile: Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic tiled TIFF),
chosen over OpenSlide because it needs no native library, reads OME-TIFF (OpenSlide does not), and shares
tifffile with the writer of the pyramidal outputs. Formats are told by content (the TIFF header and its
tiling), not by extension. MRXS and other non-TIFF formats would come in as another `Slide`.
"""
from __future__ import annotations

import abc
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ImageError

logger = logging.getLogger("deepliif")

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
TILE_SIZE_BY_OBJECTIVE = {40: 512, 20: 256, 10: 128}  # DeepLIIF's tile size per magnification
DEFAULT_SLIDE_TILE = 512


@dataclass(frozen=True)
class SlideInfo:
    path: Path
    format: str
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    mpp: float | None  # microns per level-0 pixel (x); None when the slide does not say
    objective_power: float | None

    def as_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "width": self.width, "height": self.height,
                "levels": [list(d) for d in self.level_dimensions], "mpp": self.mpp,
                "objective_power": self.objective_power}

    def tile_size(self) -> int:
        """DeepLIIF's tile size for the slide's magnification (40x: 512, 20x: 256, 10x: 128)."""
        if self.objective_power is None:
            return DEFAULT_SLIDE_TILE
        nearest = min(TILE_SIZE_BY_OBJECTIVE, key=lambda power: abs(power - self.objective_power))
        return TILE_SIZE_BY_OBJECTIVE[nearest]


class Slide(abc.ABC):
    info: SlideInfo

    @abc.abstractmethod
    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Level-0 RGB uint8 pixels [height, width, 3] of the given rectangle (inside the slide)."""

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TiffSlide(Slide):
    def __init__(self, path: Path) -> None:
        import tiffslide  # only where a slide is read
        try:
            self._slide = tiffslide.TiffSlide(str(path))
            width, height = self._slide.dimensions
            properties = self._slide.properties
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types for damaged files
            raise ImageError(f"{path}: cannot read the slide ({type(exc).__name__}: {exc}); is it truncated or "
                             "corrupt?") from exc
        self.info = SlideInfo(Path(path), str(properties.get("tiffslide.vendor") or "tiff"), int(width), int(height),
                              tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
                              _number(properties.get("tiffslide.mpp-x")) or _ome_mpp(path),
                              _number(properties.get("tiffslide.objective-power")))

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        if x < 0 or y < 0 or x + width > self.info.width or y + height > self.info.height:
            raise ImageError(f"{self.info.path}: region {x},{y} {width}x{height} is outside the "
                             f"{self.info.width}x{self.info.height} slide")
        try:
            region = self._slide.read_region((x, y), 0, (width, height), as_array=True)
        except Exception as exc:  # noqa: BLE001
            raise ImageError(f"{self.info.path}: cannot read level 0 at {x},{y} {width}x{height} "
                             f"({type(exc).__name__}: {exc}); the file may be truncated") from exc
        return np.ascontiguousarray(_rgb(region))

    def close(self) -> None:
        self._slide.close()


def _ome_mpp(path: Path) -> float | None:
    """PhysicalSizeX (µm) from OME-XML, which tiffslide does not read for every writer."""
    import tifffile
    try:
        with tifffile.TiffFile(path) as tiff:
            found = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tiff.ome_metadata or "")
    except Exception:  # noqa: BLE001 - no pixel size is a valid answer
        return None
    return _number(found.group(1)) if found else None


def _rgb(region: np.ndarray) -> np.ndarray:
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=2)
    return region[..., :3] if region.shape[2] >= 3 else np.repeat(region[..., :1], 3, axis=2)


def _number(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def is_slide(source: Path | bytes) -> bool:
    """A tiled or multi-resolution TIFF, told by its content (a file, or bytes as received): such files go
    the whole-slide way (streamed, pyramidal outputs); a plain strip TIFF is an image like a PNG."""
    import tifffile
    try:
        if isinstance(source, bytes):
            if source[:4] not in TIFF_MAGICS:
                return False
            handle = io.BytesIO(source)
        else:
            with open(source, "rb") as probe:
                if probe.read(4) not in TIFF_MAGICS:
                    return False
            handle = source
    except OSError:
        return False
    try:
        with tifffile.TiffFile(handle) as tiff:
            first = tiff.pages.first
            return bool(first.is_tiled or len(tiff.series[0].levels) > 1 or tiff.is_svs or tiff.is_ndpi)
    except Exception:  # noqa: BLE001 - a damaged TIFF is reported when it is opened as a slide
        return not isinstance(source, bytes)


def open_slide(path: Path | str) -> Slide:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such slide file")
    with open(path, "rb") as handle:
        if handle.read(4) not in TIFF_MAGICS:
            raise ImageError(f"{path}: not a slide this engine reads (TIFF-based: SVS, NDPI, OME-TIFF, tiled "
                             "TIFF); its first bytes are not a TIFF header")
    slide = TiffSlide(path)
    logger.info("slide %s: %dx%d, %d levels, %s µm/px, %sx", path.name, slide.info.width, slide.info.height,
                len(slide.info.level_dimensions), slide.info.mpp, slide.info.objective_power)
    return slide
