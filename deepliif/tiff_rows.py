"""Full-width rows of one tiled TIFF page, decoded tile by tile with tifffile's own codecs.

Slide passes read whole rows of tiles, top to bottom. Through zarr (tiffslide's `read_region`, tifffile's
`aszarr`) every tile pays for a chunk key, its parsing and a selection; reading the page's tiles by their
offsets and decoding each with `TiffPage.decode` (which applies the page's compression, predictor and JPEG
tables) gives the same pixels about 1.5x faster on a 16 384-wide zstd band (measured 0.40 s against
0.59 s for 67 megapixels), which is seconds over the several passes of a slide.
"""
from __future__ import annotations

import numpy as np

from .errors import ImageError


class TiledPageRows:
    """Rows [low, high) of a tiled, chunky (interleaved), 8-bit page of `samples` channels."""

    def __init__(self, page, handle) -> None:
        self.page, self.handle = page, handle
        self.height, self.width = page.imagelength, page.imagewidth
        self.tile_height, self.tile_width = page.tilelength, page.tilewidth
        self.samples = page.samplesperpixel
        self.across = -(-self.width // self.tile_width)

    @staticmethod
    def readable(page) -> bool:
        """Whether `TiledPageRows` reads this page: tiled, one plane of interleaved 8-bit samples."""
        if not (page.is_tiled and page.imagedepth == 1 and page.dtype == np.uint8):
            return False
        tiles = -(-page.imagelength // page.tilelength) * -(-page.imagewidth // page.tilewidth)
        return (page.samplesperpixel == 1 or page.planarconfig == 1) and len(page.dataoffsets) == tiles

    def read(self, low: int, high: int) -> np.ndarray:
        """Rows [low, high) as a new (rows, width, samples) array; tiles past the edges are cropped."""
        if not 0 <= low <= high <= self.height:
            raise ImageError(f"rows {low}..{high} are outside a page of {self.height} rows")
        out = np.empty((high - low, self.width, self.samples), np.uint8)
        page, th, tw = self.page, self.tile_height, self.tile_width
        for row in range(low // th, -(-high // th)):
            indices = list(range(row * self.across, (row + 1) * self.across))
            offsets = [page.dataoffsets[i] for i in indices]
            counts = [page.databytecounts[i] for i in indices]
            top, bottom = max(low, row * th), min(high, (row + 1) * th)
            for data, index in self.handle.read_segments(offsets, counts, indices, sort=False,
                                                         lock=self.handle.lock):
                if data is None:
                    raise ImageError(f"{self.handle.name}: tile {index} has no data")
                segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
                left = (index % self.across) * tw
                tile = segment.reshape(th, tw, self.samples)
                out[top - low: bottom - low, left: left + tw] = \
                    tile[top - row * th: bottom - row * th, : self.width - left]
        return out
