"""The result writer: a finished inference as the EDI response, its images inline (base64 input) or
written to the volume, all outputs of a request published together."""
from __future__ import annotations

import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from deepliif.cell_data import cell_data_file_name, encode_cell_data
from deepliif.imageio import encode_png
from deepliif.inference import InferenceResult

from .layout import DeploymentLayout
from .reader import LOCAL_STEM, LoadedImage
from .requests import InferenceRequest
from .storage import Volume

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ResultWriter:
    """`engine` describes what ran the request (for the response's log line)."""

    def __init__(self, volume: Volume, layout: DeploymentLayout, engine: str) -> None:
        self.volume, self.layout, self.engine = volume, layout, engine
        self._encoders = ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0))), thread_name_prefix="edi-png")

    def response(self, request: InferenceRequest, image: LoadedImage, result: InferenceResult, started: float,
                 to_volume: bool) -> dict:
        io_start = time.perf_counter()
        response = {"request_id": request.request_id, "status": "finished", "scoring": result.scoring,
                    "log": [*request.warnings, f"{result.tiles} tiles ({result.empty_tiles} empty) on {self.engine}"]}
        if request.image_path is not None or to_volume:
            location = self.write_outputs(request, image, result)
            response.update(output_dir=location, output_location=self.volume.describe(location))
        else:
            response["images"] = self.inline_images(image, result)
            if result.cell_data is not None:
                response["cell_data"] = result.cell_data
        total = time.perf_counter() - started
        engine = result.timings.get("total_seconds", 0.0)  # the engine's image path, waits for a turn included
        response["timings"] = {"read_decode_seconds": round(image.decode_seconds, 4),
                               "engine_seconds": round(engine, 4),
                               "network_seconds": round(result.timings.get("inference_seconds", 0.0), 4),
                               "write_seconds": round(time.perf_counter() - io_start, 4),
                               "total_seconds": round(total, 4), "overhead_seconds": round(total - engine, 4)}
        response["msg"] = (f"finished: {result.scoring['num_total']} cells, {result.scoring['percent_pos']}% "
                           f"positive, {total:.2f} s")
        return response

    def encode(self, images: dict[str, np.ndarray]) -> dict[str, bytes]:
        """PNG-encode the outputs on every core (zlib releases the GIL): the bulk of the kernel's overhead."""
        return dict(zip(images, self._encoders.map(encode_png, images.values())))

    def inline_images(self, image: LoadedImage, result: InferenceResult) -> dict[str, str]:
        original = image.data if image.data.startswith(PNG_MAGIC) else encode_png(image.array)
        images = {f"{LOCAL_STEM}.png": original}
        images.update({f"{LOCAL_STEM}_{name}.png": data for name, data in self.encode(result.images).items()})
        return {name: base64.b64encode(data).decode("ascii") for name, data in images.items()}

    def write_outputs(self, request: InferenceRequest, image: LoadedImage, result: InferenceResult) -> str:
        """All outputs appear together (one rename on a mounted volume); the input is kept beside them."""
        final = self.layout.output_dir(request.request_id)
        staging = self.volume.begin_dir(final)
        for name, data in self.encode(result.images).items():
            self.volume.write_bytes(f"{staging}/{image.stem}_{name}.png", data)
        self.volume.write_bytes(f"{staging}/{image.stem}_scoring.json", json.dumps(result.scoring, indent=1).encode())
        if result.cell_data is not None:
            self.volume.write_bytes(f"{staging}/{cell_data_file_name(image.stem)}", encode_cell_data(result.cell_data))
        self.volume.write_bytes(f"{self.layout.input_dir(request.request_id)}/{image.name}", image.data)
        self.volume.publish_dir(staging, final)
        return final

    def read_back_images(self, output_dir: str) -> dict[str, str]:
        """A finished base64 request's images again, for a status request."""
        return {name: base64.b64encode(self.volume.read_bytes(f"{output_dir}/{name}", 1 << 31)).decode("ascii")
                for name in self.volume.list(output_dir) if name.endswith(".png")}

    def close(self) -> None:
        self._encoders.shutdown()
