"""Whole slides: read by content, streamed through the engine, written as pyramidal OME-TIFF."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from deepliif.errors import ImageError
from deepliif.imageio import read_image, write_png
from deepliif.model_dir import Layout
from deepliif.slides import is_slide, open_slide
from engine.cli import main
from engine.samples import synthetic_ihc

NETWORK_OUTPUTS = ("Hema", "DAPI", "Lap2", "Marker", "Seg")
SLIDE_OUTPUTS = (*NETWORK_OUTPUTS, "SegOverlaid", "SegRefined")


def glass_with_tissue(height: int = 1300, width: int = 1500) -> np.ndarray:
    """IHC-like patches at unaligned offsets on near-white glass (some tiles empty, some straddling)."""
    canvas = np.full((height, width, 3), 236, np.uint8)
    for seed, (y, x) in enumerate([(37, 61), (610, 877), (820, 150)]):
        patch = synthetic_ihc(430, 520, seed=seed)
        canvas[y: y + 430, x: x + 520] = patch[: height - y, : width - x]
    return canvas


def write_ome_pyramid(path: Path, image: np.ndarray, mpp: float = 0.25) -> Path:
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tiff:
        tiff.write(image, tile=(256, 256), photometric="rgb", subifds=1,
                   metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
        tiff.write(image[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    return path


@pytest.fixture(scope="module")
def slide_image() -> np.ndarray:
    return glass_with_tissue()


def test_slides_are_told_by_content_and_bad_ones_refused(slide_image: np.ndarray, tmp_path: Path) -> None:
    ome = write_ome_pyramid(tmp_path / "a.ome.tif", slide_image)
    tiled = tmp_path / "b.tif"
    tifffile.imwrite(tiled, slide_image, tile=(256, 256), photometric="rgb")
    strips = tmp_path / "c.tif"
    tifffile.imwrite(strips, slide_image, photometric="rgb")
    write_png(tmp_path / "d.png", slide_image)
    assert [is_slide(p) for p in (ome, tiled, strips, tmp_path / "d.png")] == [True, True, False, False]
    with open_slide(ome) as slide:
        assert (slide.info.width, slide.info.height, slide.info.mpp) == (1500, 1300, 0.25)
        assert slide.info.level_dimensions == ((1500, 1300), (750, 650))
        assert np.array_equal(slide.read_region(61, 37, 300, 200), slide_image[37:237, 61:361])
        with pytest.raises(ImageError, match="outside the 1500x1300 slide"):
            slide.read_region(1400, 0, 200, 10)
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(ome.read_bytes()[: 4000])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        with open_slide(truncated) as slide:
            slide.read_region(0, 0, 1500, 1300)
    with pytest.raises(ImageError, match="not a slide this engine reads"):
        open_slide(tmp_path / "d.png")
    with pytest.raises(ImageError, match="no such slide"):
        open_slide(tmp_path / "absent.svs")


@pytest.mark.parametrize("power, tile", [(40, 512), (20, 256), (10, 128), (None, 512)])
def test_the_tile_size_follows_the_magnification(power, tile) -> None:
    from deepliif.slides import SlideInfo
    assert SlideInfo(Path("x"), "tiff", 1, 1, ((1, 1),), None, power).tile_size() == tile


def test_a_slide_infers_exactly_like_the_same_pixels_as_an_image(generated_models: dict[Layout, Path],
                                                                 slide_image: np.ndarray, tmp_path: Path) -> None:
    model = str(generated_models[Layout.TORCHSCRIPT])
    write_ome_pyramid(tmp_path / "slide.ome.tif", slide_image, mpp=0.25)
    tifffile.imwrite(tmp_path / "tiled.tif", slide_image, tile=(256, 256), photometric="rgb")
    write_png(tmp_path / "image.png", slide_image)
    common = ["infer", "--model-dir", model, "--backend", "onnxruntime", "--device", "cpu",
              "--tile-size", "384", "-q"]
    assert main([*common, "--out", str(tmp_path / "slides"), str(tmp_path / "slide.ome.tif"),
                 str(tmp_path / "tiled.tif"), "--pyramid-compression", "zstd"]) == 0  # lossless, to compare
    assert main([*common, "--out", str(tmp_path / "image"), str(tmp_path / "image.png")]) == 0
    for stem in ("slide", "tiled"):
        record = json.loads((tmp_path / "slides" / f"{stem}.json").read_text())
        assert record["tile_size"] == 384 and record["tile_size_from"] == "given"
        assert record["tiles"] == record["empty_tiles"] + record["run_tiles"] and record["empty_tiles"] > 0
        for name in SLIDE_OUTPUTS:
            with tifffile.TiffFile(tmp_path / "slides" / f"{stem}_{name}.ome.tif") as tiff:
                assert tiff.is_ome and len(tiff.series[0].levels) == record["outputs"][name]["levels"] >= 3
                streamed = tiff.series[0].levels[0].asarray().astype(int)
            whole = read_image(tmp_path / "image" / f"image_{name}.png").astype(int)
            assert np.abs(streamed - whole).max() <= 1, (stem, name)
    assert json.loads((tmp_path / "slides" / "slide.json").read_text())["slide"]["mpp"] == 0.25
    assert not list((tmp_path / "slides").glob(".*"))  # no temporaries left
    image_record = json.loads((tmp_path / "image" / "image.json").read_text())
    for stem in ("slide", "tiled"):  # the slide-wide scoring and cells equal the whole image's
        assert json.loads((tmp_path / "slides" / f"{stem}.json").read_text())["scoring"] == image_record["scoring"]
        slide_cells = (tmp_path / "slides" / f"{stem}_cells.csv").read_text().splitlines()
        image_cells = (tmp_path / "image" / "image_cells.csv").read_text().splitlines()
        assert [row.rsplit(",", 2)[0] for row in slide_cells] == [row.rsplit(",", 2)[0] for row in image_cells]


def test_an_svs_style_slide_gives_its_magnification_the_tile_size_and_infers_like_the_image(
        generated_models: dict[Layout, Path], slide_image: np.ndarray, tmp_path: Path, write_svs_style) -> None:
    svs = write_svs_style(tmp_path / "case.svs", slide_image, mpp=0.5, power=20)
    assert is_slide(svs)
    with open_slide(svs) as slide:
        assert (slide.info.format, slide.info.mpp, slide.info.objective_power) == ("aperio", 0.5, 20.0)
        assert slide.info.tile_size() == 256
        assert np.array_equal(slide.read_region(700, 500, 333, 211), slide_image[500:711, 700:1033])
    model = str(generated_models[Layout.TORCHSCRIPT])
    common = ["infer", "--model-dir", model, "--backend", "onnxruntime", "--device", "cpu", "-q",
              "--outputs", "Seg"]
    assert main([*common, "--out", str(tmp_path / "slide"), str(svs)]) == 0  # tile size from the magnification
    write_png(tmp_path / "case.png", slide_image)
    assert main([*common, "--tile-size", "256", "--out", str(tmp_path / "image"), str(tmp_path / "case.png")]) == 0
    record = json.loads((tmp_path / "slide" / "case.json").read_text())
    assert record["tile_size"] == 256 and record["tile_size_from"] != "given"
    assert record["slide"]["objective_power"] == 20.0
    with tifffile.TiffFile(tmp_path / "slide" / "case_Seg.ome.tif") as tiff:
        streamed = tiff.series[0].levels[0].asarray().astype(int)
        assert 'PhysicalSizeX="0.5"' in tiff.ome_metadata
    assert np.abs(streamed - read_image(tmp_path / "image" / "case_Seg.png").astype(int)).max() <= 1


def test_openslide_reads_what_tiffslide_reads_and_composites_unscanned_areas(slide_image: np.ndarray,
                                                                              tmp_path: Path) -> None:
    """The OpenSlide reader (MIRAX and other non-TIFF formats come through it) on a generic tiled TIFF,
    which both libraries read: the same size and pixels. Transparent (unscanned) pixels become glass."""
    from deepliif.slides import OpenSlideSlide, composite, openslide_format
    tiled = tmp_path / "b.tif"
    tifffile.imwrite(tiled, slide_image, tile=(256, 256), photometric="rgb", compression="zlib")
    assert openslide_format(tiled) == "generic-tiff" and openslide_format(tmp_path / "absent.mrxs") is None
    with OpenSlideSlide(tiled, "generic-tiff") as slide:
        assert (slide.info.width, slide.info.height, slide.info.format) == (1500, 1300, "generic-tiff")
        assert np.array_equal(slide.read_region(700, 500, 333, 211), slide_image[500:711, 700:1033])
        with pytest.raises(ImageError, match="outside the 1500x1300 slide"):
            slide.read_region(1400, 0, 200, 10)
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 0, 128]]], np.uint8)
    assert composite(rgba, (255, 255, 255)).tolist() == [[[10, 20, 30], [255, 255, 255], [227, 177, 127]]]  # 200·128 + 255·127 = 57 985 → 227.4
    assert composite(rgba, (230, 231, 232))[0, 1].tolist() == [230, 231, 232]


def test_a_file_openslide_knows_is_a_slide_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a TIFF, but a format OpenSlide detects (as it detects MIRAX): routed to the OpenSlide reader, and
    its damage reported with the format's name."""
    from deepliif import slides
    index = tmp_path / "case.mrxs"
    index.write_text("[GENERAL]\nSLIDE_VERSION = 01.02\n")
    assert not is_slide(index)  # OpenSlide itself does not take this for a MIRAX slide (no Data folder)
    monkeypatch.setattr(slides, "openslide_format", lambda path: "mirax")
    assert is_slide(index)
    with pytest.raises(ImageError, match="cannot read the mirax slide.*companion files"):
        open_slide(index)


def _spoil_tile(path: Path, tile: int) -> None:
    """Garbage over one compressed tile of level 0; the headers and the reduced levels stay readable."""
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        offset, count = page.dataoffsets[tile], page.databytecounts[tile]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * count)


def test_a_pyramid_whose_level_0_cannot_be_read_is_refused(generated_models: dict[Layout, Path],
                                                           slide_image: np.ndarray, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first.ome.tif"
    tifffile.imwrite(first, slide_image, tile=(256, 256), photometric="rgb", compression="zlib")
    _spoil_tile(first, 0)
    with pytest.raises(ImageError, match="cannot read level 0 at 0,0"):
        open_slide(first)  # refused when opened, before any model loads
    middle = tmp_path / "middle.ome.tif"
    tifffile.imwrite(middle, slide_image, tile=(256, 256), photometric="rgb", compression="zlib")
    _spoil_tile(middle, 17)  # row 2, column 5: found only when the run reaches it
    args = ["infer", "--model-dir", str(generated_models[Layout.TORCHSCRIPT]), "--backend", "onnxruntime",
            "--device", "cpu", "-q", "--outputs", "Seg", "--out", str(tmp_path / "out"), str(middle)]
    assert main(args) == 2
    assert "middle.ome.tif: cannot read level 0 at 0," in capsys.readouterr().err
    assert not [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]  # nothing looks done


@pytest.mark.parametrize("reader", ["tiffslide", "openslide"])
def test_bands_of_rows_decode_each_stored_tile_row_once(slide_image: np.ndarray, tmp_path: Path, reader: str) -> None:
    """Full-width bands that do not end on the file's 256-row tiles (37-row bands, tile rows of 512)
    read back exactly, while the file is read in whole tile rows, each once."""
    from deepliif.slides import OpenSlideSlide
    tiled = tmp_path / "b.tif"
    tifffile.imwrite(tiled, slide_image, tile=(256, 256), photometric="rgb", compression="zlib")
    with (open_slide(tiled) if reader == "tiffslide" else OpenSlideSlide(tiled, "generic-tiff")) as slide:
        assert slide.row_step == 256
        reads, read_region = [], slide.read_region
        slide.read_region = lambda x, y, width, height: reads.append((y, height)) or read_region(x, y, width, height)
        for band in (37, 512):
            for top in range(0, 1300, band):
                rows = slide.read_rows(top, min(band, 1300 - top))
                assert np.array_equal(rows, slide_image[top: top + band]) and not rows.flags.writeable
            assert sum(height for _, height in reads) == 1300 and all(y % 256 == 0 for y, _ in reads)
            reads.clear()
            slide._rows = None  # the next pass starts afresh, as a new reader would
