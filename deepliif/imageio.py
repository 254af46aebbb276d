"""Reading input images into RGB uint8 arrays, and writing results without half-written files.

Conversions (documented in the README):
- RGB: as is. Greyscale (`L`, `1`), palette (`P`), CMYK, YCbCr: converted to RGB.
- With alpha (`RGBA`, `LA`, `PA`): composited over white, the colour of glass without tissue.
- 16-bit greyscale (`I;16*`, `I`): scaled to 8 bits (value * 255 / 65535, rounded), then RGB.
- Floating-point (`F`) images are refused: they carry no defined intensity range.
- Images over `max_pixels` (default 100 megapixels) are refused before they are decoded.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import imagecodecs
import numpy as np
from PIL import Image

from .errors import ArgumentError, ImageError
from .png_bands import encode_png

DEFAULT_MAX_PIXELS = 100_000_000
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


# What Pillow may open: raster formats it decodes itself. EPS, PDF and the like make it run external
# interpreters (Ghostscript) on request bytes, which no server should do.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "PPM")


def read_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes into an `[H, W, 3]` uint8 RGB array."""
    label = name or (str(source) if not isinstance(source, bytes) else "image data")
    with _opened(source, max_pixels, label) as image:
        if image.format == "PNG" and image.mode == "RGB":
            fast = _decode_rgb_png(source)
            if fast is not None:
                return fast
        image.load()
        return to_rgb_array(image, label)


def _decode_rgb_png(source: str | Path | bytes) -> np.ndarray | None:
    """An 8-bit RGB PNG (the header already checked) through libpng: twice Pillow's speed on a 4096²
    image, and it frees the GIL. None for anything else (16-bit samples), which Pillow then decodes."""
    try:
        decoded = imagecodecs.png_decode(source if isinstance(source, bytes) else Path(source).read_bytes())
    except imagecodecs.PngError:
        return None
    ok = decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3
    return decoded if ok else None


@contextlib.contextmanager
def _opened(source: str | Path | bytes, max_pixels: int, label: str) -> Iterator[Image.Image]:
    """The image opened (header read, size checked, nothing decoded yet), with every failure an ImageError."""
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise ImageError(f"{label}: no such file")
    try:
        with warnings.catch_warnings():
            # Our own limit (checked before decoding) replaces PIL's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS) as image:
                _check_size(image.size, max_pixels, label)
                yield image
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: image is over the limit of {max_pixels} pixels and too large to decode "
                         f"safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as exc:
        raise ImageError(f"{label}: not a readable image ({exc}; accepted: {', '.join(IMAGE_FORMATS)})") from exc


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def probe_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header, with every check `read_image` makes before decoding: commands
    open all their inputs this way before loading a model or creating an output folder."""
    with _opened(path, max_pixels, str(path)) as image:
        return image.size


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the images directly inside it, sorted by name."""
    files: list[Path] = []
    for path in paths:
        if Path(path).is_dir():
            found = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(Path(path))
    return files


def _check_size(size: tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{label}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{label}: image has {width}x{height} = {width * height} pixels, over the "
                         f"limit of {max_pixels} (raise it with --max-pixels if this is intended)")


def to_rgb_array(image: Image.Image, label: str = "image") -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode == "F":
        raise ImageError(f"{label}: floating-point images (mode F) are not supported; save as 8-bit RGB")
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values * 255.0 / 65535.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if "A" in mode or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as exc:
        raise ImageError(f"{label}: images of mode {mode} cannot be converted to RGB") from exc


@contextlib.contextmanager
def open_atomically(path: Path) -> Iterator:
    """A binary file at a temporary name in the same directory, renamed to `path` once the block ends
    without error and removed otherwise: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and artifacts are shared with other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_stream(path: Path) -> Iterator:
    """`open_atomically`, gzip-compressed when `path` ends in .gz (large results written as they are made:
    a slide's cells). ISA-L's gzip (isal) at level 1: on a slide's 108 MB of cell outlines 4x faster than
    zlib's level 1 (0.28 s against 1.17 s) for a smaller file (23 MB against 26 MB); any gzip reader
    reads it."""
    with open_atomically(path) as raw:
        if Path(path).suffix != ".gz":
            yield raw
            return
        from isal import igzip
        with igzip.IGzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as stream:
            yield stream


def write_atomically(path: Path, data: bytes | Iterable[bytes]) -> None:
    """`data`, or its pieces one after another, published whole under `path` (temporary name, then rename)."""
    with open_atomically(path) as handle:
        if isinstance(data, (bytes, bytearray, memoryview)):
            handle.write(data)
        else:
            handle.writelines(data)


def write_json(path: Path, record: dict) -> None:
    write_atomically(path, (json.dumps(record, indent=2, default=str) + "\n").encode())


def prepare_out_dir(out: Path) -> Path:
    """Create an output directory, or say why it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"cannot create output directory {out}: {exc}") from exc
    if not os.access(out, os.W_OK):
        raise ArgumentError(f"output directory {out} is not writable")
    return out


def update_digest(digest, path: Path) -> None:
    """Feed a file to a hashlib digest in chunks (artifacts reach 1.5 GB)."""
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)


class RememberedDigests(Protocol):
    """Something that knows files' sha256 without rereading them (the engine's `HashMemo`)."""

    def sha256(self, file: Path) -> str: ...


def file_sha256(path: Path, memo: RememberedDigests | None = None) -> str:
    if memo is not None:
        return memo.sha256(path)
    digest = hashlib.sha256()
    update_digest(digest, path)
    return digest.hexdigest()


def write_png(path: Path, image: np.ndarray) -> None:
    write_atomically(path, encode_png(image))


class RowBlocks:
    """Full-width rows of an image whose file stores them in blocks of `step` rows (its tile rows, which
    are decoded whole): rows are read by whole blocks and the last ones read are kept, so consecutive
    bands that do not end on a block's edge decode each block once. `read(top, bottom)` reads rows of the
    file; rows handed out are read-only views of what is kept."""

    def __init__(self, read: Callable[[int, int], np.ndarray], height: int, step: int) -> None:
        self.read, self.height, self.step = read, height, max(1, step)
        self._first, self._kept = 0, None

    def rows(self, low: int, high: int) -> np.ndarray:
        start, stop = low // self.step * self.step, min(-(-high // self.step) * self.step, self.height)
        kept, first = self._kept, self._first
        if kept is not None and first <= start < first + len(kept):
            end = first + len(kept)
            block = np.concatenate([kept[start - first:], self.read(end, stop)]) if stop > end else kept[start - first:]
        else:
            block = self.read(start, stop)
        block.flags.writeable = False
        self._first, self._kept = start, block
        return block[low - start: high - start]

    def forget(self) -> None:
        """Drop the rows kept (a reader of several images keeps only the one it reads)."""
        self._kept = None
