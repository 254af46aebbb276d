"""Whole-slide images behind one small interface: what a slide is (size, pixel size, magnification) and
level-0 pixels read region by region, never the whole slide.

TIFF-based slides are read with tiffslide (pure Python on tifffile: Aperio SVS, Hamamatsu NDPI, OME-TIFF,
generic tiled TIFF), chosen first because it reads OME-TIFF (OpenSlide does not) and shares tifffile with the
writer of the pyramidal outputs. Everything else OpenSlide knows (MIRAX .mrxs, Hamamatsu VMS, Leica SCN
... ; openslide-bin ships the native library as a wheel, no system package) is read through OpenSlide.
Formats are told by content (the TIFF header and its tiling, or OpenSlide's own detection), not by extension.
"""
from __future__ import annotations

import abc
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ImageError
from .imageio import RowBlocks
from .logs import project_logger
from .tiff_rows import TiledPageRows
from .tiling import tile_size_for

logger = project_logger("deepliif")

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders


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
        return tile_size_for(self.objective_power)


class Slide(abc.ABC):
    info: SlideInfo
    row_step: int = 1  # level-0 rows the file stores together (its tile height), 1 where unknown
    _rows: RowBlocks | None = None

    @abc.abstractmethod
    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Level-0 RGB uint8 pixels [height, width, 3] of the given rectangle (inside the slide)."""

    def read_rows(self, top: int, count: int) -> np.ndarray:
        """Full-width level-0 rows [top, top + count), read-only. A slide is read in bands top to bottom
        (tile rows, scoring's bands) that rarely end on the file's tile rows; these reads go by whole
        stored tile rows and keep the last ones, so each stored tile is decoded once, not two or three times."""
        if self._rows is None:
            self._rows = RowBlocks(lambda low, high: self.read_region(0, low, self.info.width, high - low),
                                   self.info.height, self.row_step)
        return self._rows.rows(top, top + count)

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
        self.row_step = int(properties.get("tiffslide.level[0].tile-height") or 1)
        self._tiles = _level0_tiles(self._slide.ts_tifffile, int(width), int(height))
        self.info = SlideInfo(Path(path), str(properties.get("tiffslide.vendor") or "tiff"), int(width), int(height),
                              tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
                              _number(properties.get("tiffslide.mpp-x")) or _ome_mpp(path),
                              _number(properties.get("tiffslide.objective-power")))

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        _check_inside(self.info, x, y, width, height)
        try:
            if self._tiles is not None and (x, width) == (0, self.info.width):
                return np.ascontiguousarray(_rgb(self._tiles.read(y, y + height)))
            region = self._slide.read_region((x, y), 0, (width, height), as_array=True)
        except Exception as exc:  # noqa: BLE001
            raise ImageError(f"{self.info.path}: cannot read level 0 at {x},{y} {width}x{height} "
                             f"({type(exc).__name__}: {exc}); the file may be truncated") from exc
        return np.ascontiguousarray(_rgb(region))

    def close(self) -> None:
        self._slide.close()


def _level0_tiles(tiff, width: int, height: int) -> TiledPageRows | None:
    """Full-width rows of level 0 decoded tile by tile (faster than through zarr), where level 0 is one
    tiled page of the slide's size that `TiledPageRows` reads; None otherwise (tiffslide reads those)."""
    try:
        level = tiff.series[0].levels[0]
        page = level.pages[0] if len(level.pages) == 1 else None
    except (IndexError, AttributeError):
        return None
    if page is None or not hasattr(page, "dataoffsets") or (page.imagewidth, page.imagelength) != (width, height) \
            or not TiledPageRows.readable(page):
        return None
    return TiledPageRows(page, tiff.filehandle)


class OpenSlideSlide(Slide):
    """A slide OpenSlide reads. Its regions come as RGBA, transparent where nothing was scanned (MIRAX);
    they are composited onto the slide's background colour (white when it states none), as glass."""

    def __init__(self, path: Path, vendor: str) -> None:
        import openslide
        try:
            self._slide = openslide.OpenSlide(str(path))
            properties = self._slide.properties
        except Exception as exc:  # noqa: BLE001 - OpenSlideError, or OSError for a file it cannot open
            raise ImageError(f"{path}: cannot read the {vendor} slide ({type(exc).__name__}: {exc}); is it truncated "
                             "or are its companion files missing?") from exc
        width, height = self._slide.dimensions
        self.row_step = int(properties.get("openslide.level[0].tile-height") or 1)
        self.background = _hex_colour(properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR))
        self.info = SlideInfo(Path(path), vendor, int(width), int(height),
                              tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
                              _number(properties.get(openslide.PROPERTY_NAME_MPP_X)),
                              _number(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)))

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        _check_inside(self.info, x, y, width, height)
        try:
            rgba = np.asarray(self._slide.read_region((x, y), 0, (width, height)))
        except Exception as exc:  # noqa: BLE001
            raise ImageError(f"{self.info.path}: cannot read level 0 at {x},{y} {width}x{height} "
                             f"({type(exc).__name__}: {exc})") from exc
        return composite(rgba, self.background)

    def close(self) -> None:
        self._slide.close()


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGBA (OpenSlide's, not premultiplied) over an opaque background colour, rounded."""
    alpha = rgba[..., 3:].astype(np.uint16)
    composed = (rgba[..., :3] * alpha + np.array(background, np.uint16) * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(composed.astype(np.uint8))


def _hex_colour(text: str | None) -> tuple[int, int, int]:
    try:
        return tuple(int(text[i: i + 2], 16) for i in (0, 2, 4)) if text and len(text) == 6 else (255, 255, 255)
    except ValueError:
        return (255, 255, 255)


def _check_inside(info: SlideInfo, x: int, y: int, width: int, height: int) -> None:
    if x < 0 or y < 0 or x + width > info.width or y + height > info.height:
        raise ImageError(f"{info.path}: region {x},{y} {width}x{height} is outside the {info.width}x{info.height} "
                         "slide")


def openslide_format(path: Path) -> str | None:
    """OpenSlide's name for the file's format, or None when OpenSlide does not read it (or is absent)."""
    try:
        import openslide
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - ImportError or a library that cannot load: not a slide we read
        return None


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
                    return openslide_format(Path(source)) is not None
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
        is_tiff = handle.read(4) in TIFF_MAGICS
    vendor = None if is_tiff else openslide_format(path)
    if not is_tiff and vendor is None:
        raise ImageError(f"{path}: not a slide this engine reads (TIFF-based: SVS, NDPI, OME-TIFF, tiled TIFF; "
                         "or a format OpenSlide reads, such as MIRAX .mrxs); neither a TIFF header nor a format "
                         "OpenSlide knows")
    slide = TiffSlide(path) if is_tiff else OpenSlideSlide(path, vendor)
    try:
        slide.read_region(0, 0, 1, 1)  # a pyramid whose level 0 cannot be read is refused at once
    except ImageError:
        slide.close()
        raise
    logger.info("slide %s: %dx%d, %d levels, %s µm/px, %sx", path.name, slide.info.width, slide.info.height,
                len(slide.info.level_dimensions), slide.info.mpp, slide.info.objective_power)
    return slide


def fits_in_a_tile(info: SlideInfo, tile_size: int) -> bool:
    """A slide narrower or lower than one tile has no tile grid of its own: it is inferred as an image."""
    return info.width < tile_size or info.height < tile_size


def read_whole_slide(path: Path | str, max_pixels: int) -> np.ndarray:
    """Level 0 of a small slide as one RGB array (a DICOM or SVS smaller than a tile goes through the
    image path); refused above `max_pixels`, as images are."""
    with open_slide(path) as slide:
        width, height = slide.info.width, slide.info.height
        if width * height > max_pixels:
            raise ImageError(f"{path}: a {width}x{height} slide is over the {max_pixels}-pixel image limit")
        return slide.read_region(0, 0, width, height)
