"""Tiled pyramidal OME-TIFF outputs written as rows arrive, in memory that does not grow with the image.

Level 0 of each output is streamed to a temporary tiled TIFF (or several, stacked top to bottom) while
the slide is inferred; tifffile pulls tiles from a bounded queue on its own thread. The reduced levels
are made from the same rows as they pass (2x2 area average, each level half the one above by floor
division), each into its own temporary. The final file is then assembled from tiles that are already
compressed: nothing is decoded or compressed twice. It carries the input's physical pixel size, and is
written under a temporary name and renamed into place, so a killed run never leaves a file that looks
complete.

Readers disagree on where a TIFF keeps its reduced levels: OME-TIFF readers (Bio-Formats, tifffile,
tiffslide) follow the SubIFDs of the first page, OpenSlide's generic-TIFF reader walks only the main
chain of pages. tifffile writes the SubIFDs of one page as a chain of their own; linking the first page
to the head of that chain puts every level in both places, so every one of those readers sees them all.
"""
from __future__ import annotations

import os
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from .errors import ImageError
from .imageio import RowBlocks
from .tiff_rows import TiledPageRows
from .workers import hand_to, opencv

TIFF_TILE = 256


@dataclass(frozen=True)
class Codec:
    """How tiles are compressed: tifffile's arguments, and the TIFF Compression values that mean it (a
    stored tile is copied into a pyramid only when its file used the same codec)."""
    compression: str
    level: int
    predictor: int | None
    tags: tuple[int, ...]

    def arguments(self) -> dict:
        extra = {} if self.predictor is None else {"predictor": self.predictor}
        return {"compression": self.compression, "compressionargs": {"level": self.level}, **extra}


# Lossless deflate at level 1 with the horizontal predictor: on a 4096² IHC-like image 2.2x faster to
# write than deflate's default level and 23% smaller; the TIFF codec every reader decodes.
DEFLATE = Codec("zlib", 1, 2, (8, 32946))
# Lossless Zstandard at level 1, chosen by measurement (benchmarks/tiff_codecs.py): on DeepLIIF's Seg and
# Marker 1.7-2x faster to write than DEFLATE and 1.7-1.8x faster to read, 1-6% larger. The horizontal
# predictor would make them 8-10% smaller but about 25% slower to write and 40% slower to read, and they
# are read back by every scoring pass. OpenSlide (openslide-bin's libtiff), tifffile/tiffslide (imagecodecs)
# and Bio-Formats (TIFF compression 50000) decode it; a libtiff built without zstd does not, which is what
# `PyramidCompression.DEFLATE` is for.
ZSTD = Codec("zstd", 1, None, (50000,))
# JPEG at quality 90 in RGB (no chroma subsampling, so coloured outlines keep their colour), 4-7x faster
# than DEFLATE and 7-9x smaller on DeepLIIF's display images, mean error 2-3.5 grey levels (measured).
JPEG = Codec("jpeg", 90, None, (7,))
# Outputs that are only looked at; the others (Seg, Marker, SegRefined) are read back for scoring and
# counting and stay lossless whatever is chosen.
DISPLAY_OUTPUTS = ("Hema", "DAPI", "Lap2", "SegOverlaid")


class PyramidCompression(str, Enum):
    """`--pyramid-compression`: how each output's pyramid is compressed. JPEG (the default) writes the
    display outputs as JPEG (q90, 4:4:4) and the rest as lossless ZSTD; ZSTD and DEFLATE write every
    output losslessly, DEFLATE in the codec that every TIFF reader decodes."""
    JPEG = "jpeg"
    ZSTD = "zstd"
    DEFLATE = "deflate"

    @classmethod
    def default(cls) -> PyramidCompression:
        return cls.JPEG

    def codec(self, output: str) -> Codec:
        if self is PyramidCompression.DEFLATE:
            return DEFLATE
        return JPEG if self is PyramidCompression.JPEG and output in DISPLAY_OUTPUTS else ZSTD


class StreamedLevel:
    """One image written tile row by tile row: `add(rows)` in order, then `close()`."""

    def __init__(self, path: Path, width: int, height: int, tile: int = TIFF_TILE, codec: Codec = ZSTD) -> None:
        self.path, self.width, self.height, self.tile, self.codec = Path(path), width, height, tile, codec
        self._row: np.ndarray | None = None  # the tile row being filled
        self._held = 0
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name=f"tiff-{self.path.name}", daemon=True)
        self._thread.start()

    def add(self, rows: np.ndarray) -> None:
        """The next rows, copied into tile rows (the caller may reuse its buffer once this returns)."""
        while len(rows):
            if self._row is None:
                self._row, self._held = np.empty((self.tile, self.width, 3), np.uint8), 0
            taken = min(len(rows), self.tile - self._held)
            self._row[self._held: self._held + taken] = rows[:taken]
            self._held, rows = self._held + taken, rows[taken:]
            if self._held == self.tile:
                self._put(self._row)
                self._row = None

    def close(self) -> None:
        if self._row is not None:
            self._put(self._row[: self._held])
            self._row = None
        self._put(None)
        self._thread.join()
        if self._error is not None:
            raise ImageError(f"cannot write {self.path}: {self._error}") from self._error

    def _put(self, band: np.ndarray | None) -> None:
        if not hand_to(self._thread, self._queue, band) and self._error is not None:
            raise ImageError(f"cannot write {self.path}: {self._error}") from self._error

    def _write(self) -> None:
        import tifffile
        try:
            with tifffile.TiffWriter(self.path, bigtiff=True) as tiff:
                tiff.write(self._tiles(), shape=(self.height, self.width, 3), dtype=np.uint8,
                           tile=(self.tile, self.tile), photometric="rgb", **self.codec.arguments())
        except BaseException as exc:  # handed to the caller in close()
            self._error = exc

    def _tiles(self) -> Iterator[np.ndarray]:
        while (band := self._queue.get()) is not None:
            yield from band_tiles(band, self.tile)


def band_tiles(band: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """A band of at most `tile` rows as full tiles, left to right, padded with zeros at the edges."""
    for x in range(0, band.shape[1], tile):
        piece = band[:, x: x + tile]
        if piece.shape[:2] != (tile, tile):
            padded = np.zeros((tile, tile, 3), np.uint8)
            padded[: piece.shape[0], : piece.shape[1]] = piece
            piece = padded
        yield piece


def level_sizes(height: int, width: int, tile: int = TIFF_TILE) -> list[tuple[int, int]]:
    """(height, width) of every level: each half the one above by floor division, down to one tile."""
    sizes = [(height, width)]
    while max(sizes[-1]) > tile and min(sizes[-1]) >= 2:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes


def region_levels(top: int, bottom: int, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(height, width) at each of an image's levels `sizes` of its level-0 rows [top, bottom), for as many
    levels as they make rows. `top` must be a multiple of 2**(len(sizes) - 1): rows are then halved by
    floor division exactly as the whole image's are."""
    if top % (1 << (len(sizes) - 1)):
        raise ImageError(f"a region starting at row {top} does not halve evenly into {len(sizes)} levels")
    return [(rows, width) for k, (_, width) in enumerate(sizes) if (rows := (bottom >> k) - (top >> k)) > 0]


class ReducedLevels:
    """Levels 1.. of an image (or of a region of it: `region_levels`) made from its level-0 rows as they
    pass, each streamed to `<base>.level<k>.tif`. `sizes` are every level's (height, width), level 0 first."""

    def __init__(self, base: Path, sizes: list[tuple[int, int]], tile: int = TIFF_TILE, codec: Codec = ZSTD
                 ) -> None:
        self.sizes = sizes
        self.writers = [StreamedLevel(Path(f"{base}.level{k}.tif"), w, h, tile, codec)
                        for k, (h, w) in enumerate(self.sizes[1:], start=1)]
        self._pending = [np.zeros((0, w, 3), np.uint8) for _, w in self.sizes[:-1]]
        self._rows_in = [0] * len(self.writers)

    def add(self, rows: np.ndarray) -> None:
        """The next level-0 rows (not kept: the caller may reuse its buffer once this returns)."""
        for k, writer in enumerate(self.writers):
            wanted = 2 * writer.height - self._rows_in[k]  # the last odd row of a level makes no row below
            rows = rows[:wanted]
            self._rows_in[k] += len(rows)
            pairs = []
            if len(self._pending[k]) and len(rows):  # the odd row left over, with the first new one
                pairs.append(np.concatenate([self._pending[k], rows[:1]]))
                rows = rows[1:]
            even = len(rows) - len(rows) % 2
            self._pending[k] = rows[even:].copy()
            pairs += [rows[:even]] if even else []
            if not pairs:
                return
            halved = [average_2x2(pair[:, : 2 * writer.width]) for pair in pairs]
            rows = halved[0] if len(halved) == 1 else np.concatenate(halved)
            writer.add(rows)

    def close(self) -> list[Path]:
        errors = []
        for writer in self.writers:
            try:
                writer.close()
            except ImageError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return [writer.path for writer in self.writers]

    def remove(self) -> None:
        for writer in self.writers:
            writer.path.unlink(missing_ok=True)


def average_2x2(rows: np.ndarray) -> np.ndarray:
    """An even number of rows and columns averaged over 2x2 pixels, rounding halves up: OpenCV's area
    resampling at exactly half size computes `(a + b + c + d + 2) >> 2` in SIMD (measured 16x faster
    than the same sums in NumPy, and equal to them)."""
    if not rows.size:
        return np.zeros((len(rows) // 2, rows.shape[1] // 2, *rows.shape[2:]), np.uint8)
    height, width = rows.shape[:2]
    cv2 = opencv()
    halved = cv2.resize(np.ascontiguousarray(rows), (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    return halved.reshape(height // 2, width // 2, *rows.shape[2:])  # OpenCV drops a single channel's axis


class PyramidWriter:
    """One image written as rows arrive: level 0 and the reduced levels (`sizes`: every level's (height,
    width), level 0 first) stream to hidden temporaries `<base>.level<k>.tif`. `publish` assembles them
    into the final file; `close` finishes them and says where they are (a slide run's checkpoint keeps
    them per region); `discard` removes them."""

    def __init__(self, base: Path, sizes: list[tuple[int, int]], tile: int = TIFF_TILE, codec: Codec = ZSTD
                 ) -> None:
        (height, width) = sizes[0]
        self.level0 = StreamedLevel(Path(f"{base}.level0.tif"), width, height, tile, codec)
        self.reduced = ReducedLevels(base, sizes, tile, codec)
        self.tile, self.codec = tile, codec

    def add(self, rows: np.ndarray) -> None:
        self.level0.add(rows)
        self.reduced.add(rows)

    def close(self) -> list[Path]:
        """Every level's file, level 0 first, once written whole."""
        self.level0.close()
        return [self.level0.path, *self.reduced.close()]

    def publish(self, out: Path, mpp: float | None) -> int:
        try:
            return assemble_pyramid([[path] for path in self.close()], out, mpp, self.tile, self.codec)
        finally:
            self.discard()

    def discard(self) -> None:
        for step in (self.level0.close, self.reduced.close):
            try:
                step()
            except ImageError:
                pass
        self.level0.path.unlink(missing_ok=True)
        self.reduced.remove()


class LevelRows:
    """Rows of one image stored as regions (tiled TIFFs stacked top to bottom), decoded by whole tile rows
    (`TiledPageRows`, kept by `RowBlocks`): slide scoring's bands of about 4 megapixels decode each tile once."""

    def __init__(self, paths: list[Path]) -> None:
        import tifffile
        self.files, self.blocks, self.tops = [], [], []
        top = 0
        try:
            for path in paths:
                self.files.append(tifffile.TiffFile(path))
                page = self.files[-1].pages[0]
                if not TiledPageRows.readable(page) or page.samplesperpixel != 3:
                    raise ImageError(f"{path}: not a tiled RGB level this engine wrote")
                tiles = TiledPageRows(page, self.files[-1].filehandle)
                self.blocks.append(RowBlocks(tiles.read, tiles.height, tiles.tile_height))
                self.tops.append(top)
                top += tiles.height
        except BaseException:
            self.close()
            raise
        self.height, self.width = top, tiles.width

    def rows(self, y: int, count: int) -> np.ndarray:
        parts = []
        for top, blocks in zip(self.tops, self.blocks):
            low, high = max(y, top), min(y + count, top + blocks.height)
            if low < high:
                parts.append(blocks.rows(low - top, high - top))
            else:
                blocks.forget()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        for tiff in self.files:
            tiff.close()

    def __enter__(self) -> LevelRows:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def assemble_pyramid(levels: list[list[Path]], out: Path, mpp: float | None, tile: int = TIFF_TILE,
                     codec: Codec = ZSTD) -> int:
    """The pyramidal OME-TIFF at `out` from every level given as tiled TIFF regions, top to bottom, largest
    level first; returns the number of levels. The regions are the caller's to remove."""
    import tifffile
    shapes = []
    for paths in levels:
        with LevelRows(paths) as rows:
            shapes.append((rows.height, rows.width))
    metadata = {"axes": "YXS"}
    if mpp:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    staging = out.with_name(f".{out.name}.partial")
    try:
        with tifffile.TiffWriter(staging, bigtiff=True, ome=True) as tiff:
            for factor, (paths, (height, width)) in enumerate(zip(levels, shapes)):
                extra = {"subifds": len(levels) - 1, "metadata": metadata} if factor == 0 else {"subfiletype": 1}
                tiles = _stored_tiles(paths) if _copyable(paths, tile, codec) else _level_tiles(paths, tile)
                tiff.write(tiles, shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                           **codec.arguments(), **extra, **_resolution(mpp, 2 ** factor))
        _chain_subifds(staging)
        os.replace(staging, out)
        return len(levels)
    finally:
        staging.unlink(missing_ok=True)


def _copyable(paths: list[Path], tile: int, codec: Codec) -> bool:
    """Whether the regions' stored tiles are the final file's as they are: the same tiling, compression and
    predictor, and every region but the last a whole number of tile rows."""
    import tifffile
    for index, path in enumerate(paths):
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            if (page.tilewidth, page.tilelength) != (tile, tile) or page.compression not in codec.tags or \
                    (page.predictor or 1) != (codec.predictor or 1) or page.samplesperpixel != 3 or \
                    (index < len(paths) - 1 and page.imagelength % tile):
                return False
    return True


def _stored_tiles(paths: list[Path]) -> Iterator[bytes]:
    """The regions' compressed tiles in the final file's order (tifffile writes bytes as they are)."""
    import tifffile
    for path in paths:
        with tifffile.TiffFile(path) as tiff:
            page, handle = tiff.pages[0], tiff.filehandle
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                handle.seek(offset)
                yield handle.read(count)


def _level_tiles(paths: list[Path], tile: int) -> Iterator[np.ndarray]:
    with LevelRows(paths) as level:
        for y in range(0, level.height, tile):
            yield from band_tiles(level.rows(y, tile), tile)


def _chain_subifds(path: Path) -> None:
    """Links the first page to its SubIFDs' chain, so readers that walk only the main chain see every level."""
    import tifffile
    with tifffile.TiffFile(path) as tiff:
        if not tiff.is_bigtiff:
            raise ImageError(f"{path}: expected a BigTIFF")
        first, subifds = tiff.pages[0].offset, tiff.pages[0].subifds
    if not subifds:
        return
    with open(path, "r+b") as handle:
        handle.seek(first)
        (tags,) = struct.unpack("<Q", handle.read(8))
        next_field = first + 8 + 20 * tags  # BigTIFF: 8-byte tag count, 20-byte entries, 8-byte next offset
        handle.seek(next_field)
        (following,) = struct.unpack("<Q", handle.read(8))
        if following not in (0, subifds[0]):
            raise ImageError(f"{path}: its first page already has a next page")
        handle.seek(next_field)
        handle.write(struct.pack("<Q", subifds[0]))


def _resolution(mpp: float | None, factor: int) -> dict:
    """TIFF resolution tags in pixels per centimetre, so viewers that ignore OME metadata scale too."""
    if not mpp:
        return {}
    per_cm = 1e4 / (mpp * factor)
    return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
