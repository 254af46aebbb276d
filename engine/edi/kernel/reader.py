"""The request reader: an inference request's image from its body or the volume, decoded and checked
against what it would allocate, and its run time estimated (which decides sync or async)."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from deepliif.imageio import read_image
from deepliif.inference import check_working_size, tile_count
from deepliif.slides import SlideInfo, is_slide, open_slide

from ...slide_inference import slide_stem

from .requests import InferenceRequest, RequestError
from .settings import KernelSettings
from .storage import NotFoundError, StorageError, Volume

LOCAL_STEM = "local"


@dataclass
class LoadedImage:
    array: np.ndarray | None  # None while queued: decoded when its job starts
    data: bytes   # the file as received (empty while a path request is queued: read again at start)
    name: str     # input file name (for input_dir)
    stem: str     # output names: <stem>_<Name>.png
    decode_seconds: float = 0.0
    slide: SlideInfo | None = None  # a whole slide on the volume: streamed by its async job, never decoded

    def queued(self, from_volume: bool) -> LoadedImage:
        """What waits in the async queue: a reference, not pixels (a queued 10 000² image would otherwise
        hold 300 MB until its turn); a volume file is read again when its job starts."""
        return replace(self, array=None, data=b"" if from_volume else self.data)


class RequestReader:
    def __init__(self, settings: KernelSettings, volume: Volume | None) -> None:
        self.settings = settings
        self.volume = volume

    def load(self, request: InferenceRequest) -> LoadedImage:
        start = time.perf_counter()
        if request.image_path is not None:
            if self.volume is None:
                raise RequestError("img_path_on_pvc needs a storage volume, and this deployment has none "
                                   "(set DEEPLIIF_VOLUME_ROOT or the DEEPLIIF_CPD_* variables)")
            slide = self._slide_on_volume(request.image_path)
            if slide is not None:
                name = PurePosixPath(request.image_path).name
                return LoadedImage(None, b"", name, slide_stem(Path(name)), time.perf_counter() - start, slide)
            data = self.volume.read_bytes(request.image_path, self.settings.max_request_bytes)
            name = PurePosixPath(request.image_path).name
            stem = PurePosixPath(name).stem or "image"
        else:
            data, name, stem = request.decode_image_bytes(), f"{LOCAL_STEM}.png", LOCAL_STEM
        label = request.image_path or "local_input_image"
        if is_slide(data):
            raise RequestError(f"{label} is a whole slide (tiled or pyramidal TIFF) on a volume read over REST: "
                               "slides are streamed from a mounted volume (DEEPLIIF_VOLUME_ROOT)"
                               if request.image_path else "a whole slide cannot come as base64 (it is far over the "
                               "body limit): put it on the volume and send img_path_on_pvc; it runs async")
        array = read_image(data, max_pixels=self.settings.max_pixels, name=label)
        check_working_size(array.shape[1], array.shape[0], request.image_tile_size, self.settings.max_pixels, label)
        return LoadedImage(array, data, name, stem, time.perf_counter() - start)

    def _slide_on_volume(self, path: str) -> SlideInfo | None:
        """The slide's description when `path` is a whole slide on a mounted volume (told by content)."""
        try:
            with self.volume.local_file(path) as local:
                if not is_slide(local):
                    return None
                with open_slide(local) as slide:
                    return slide.info
        except StorageError as exc:
            if isinstance(exc, NotFoundError):
                raise
            return None  # a volume read over REST: the bytes are read and checked as for any image

    def decoded(self, request: InferenceRequest, queued: LoadedImage) -> LoadedImage:
        """A queued request's image when its job starts (a slide stays on the volume: it is streamed)."""
        if queued.slide is not None:
            return queued
        if request.image_path is not None:
            return self.load(request)
        array = read_image(queued.data, max_pixels=self.settings.max_pixels, name="local_input_image")
        return replace(queued, array=array)

    @staticmethod
    def estimate_tiles(request: InferenceRequest, image: LoadedImage) -> int:
        if image.slide is not None:
            return tile_count(image.slide.width, image.slide.height, request.tile_size or image.slide.tile_size())
        height, width = image.array.shape[:2]
        return tile_count(width, height, request.image_tile_size)

    def estimate(self, request: InferenceRequest, image: LoadedImage, seconds_per_tile: float) -> float:
        return self.estimate_tiles(request, image) * seconds_per_tile
