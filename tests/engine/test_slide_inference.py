"""A slide run killed midway resumes from its last whole region and ends with the outputs of a run that
was never killed; nothing it leaves behind looks complete."""
from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from deepliif import slide_checkpoint
from deepliif.model_dir import Layout
from engine.session import Session
from engine.slide_inference import infer_slide

from ..deepliif.test_slides import SLIDE_OUTPUTS, glass_with_tissue, write_ome_pyramid
from ..qupath_rules import assert_outlines_trace_the_cells, assert_qupath_imports, read_geojson

TILE = 256  # 6 tile rows of 224 on a 1300-row slide; regions of 2 tile rows: 3 regions


class Killed(Exception):
    """Stands for the process dying mid-slide."""


@pytest.fixture
def session(generated_models: dict[Layout, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(slide_checkpoint, "REGION_PIXELS", 1500 * 224 * 2)
    with Session(generated_models[Layout.TORCHSCRIPT], backend="onnxruntime", device="cpu",
                 cache_dir=tmp_path / "cache", batch_size=4) as live:
        yield live


def counting(session: Session, tiles: list[int]):
    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        tiles.append(len(batch))
        return session.run(batch)
    return run


@contextlib.contextmanager
def killed_after(regions: int):
    """The run dies once `regions` regions are listed: in the merger, right after the listing, whatever
    how far the network has run ahead."""
    listed = slide_checkpoint.SlideCheckpoint.row_done

    def dying(self, position) -> None:
        listed(self, position)
        if len(self.regions) >= regions:
            raise Killed()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        patch.setattr(slide_checkpoint.SlideCheckpoint, "row_done", dying)
        yield


def listed_regions(folder: Path) -> int:
    try:
        return len(json.loads((folder / "checkpoint.json").read_text())["regions"])
    except FileNotFoundError:
        return 0


def level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tiff:
        return tiff.series[0].levels[0].asarray()


def every_level(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tiff:
        return [level.asarray() for level in tiff.series[0].levels]


def test_a_killed_slide_run_resumes_from_its_last_region_with_identical_outputs(session: Session,
                                                                                tmp_path: Path) -> None:
    slide = write_ome_pyramid(tmp_path / "slide.ome.tif", glass_with_tissue())
    whole_tiles: list[int] = []
    infer_slide(session, slide, tmp_path / "whole", TILE, run=counting(session, whole_tiles))

    out, folder = tmp_path / "killed", tmp_path / "killed" / ".slide.resume"
    with killed_after(1):
        infer_slide(session, slide, out, TILE)
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # nothing looks complete
    assert listed_regions(folder) == 1

    resumed_tiles: list[int] = []
    progress: list[int] = []
    stages: list[str] = []
    record = json.loads(infer_slide(session, slide, out, TILE, progress.append, run=counting(session, resumed_tiles),
                                    stage=stages.append).read_text())
    assert stages == ["tiles", "pyramids", "scoring", "overlays"]
    assert record["resumed"]["from_row"] > 0 and record["resumed"]["tiles_done_before"] == 14  # two rows of 7
    assert 0 < sum(resumed_tiles) < sum(whole_tiles)  # the first region was not run again
    assert sum(progress) == record["tiles"] == 42  # the bar starts where the killed run stopped
    whole = json.loads((tmp_path / "whole" / "slide.json").read_text())
    assert (record["scoring"], record["empty_tiles"]) == (whole["scoring"], whole["empty_tiles"])
    for name in SLIDE_OUTPUTS:
        resumed, uninterrupted = (every_level(folder / f"slide_{name}.ome.tif") for folder in (out, tmp_path / "whole"))
        assert len(resumed) == len(uninterrupted) > 1
        for level, (ours, theirs) in enumerate(zip(resumed, uninterrupted)):
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} level {level}")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the checkpoint is gone


def test_a_damaged_region_or_a_changed_slide_is_not_reused(session: Session, tmp_path: Path) -> None:
    slide = write_ome_pyramid(tmp_path / "slide.ome.tif", glass_with_tissue())
    out, folder = tmp_path / "out", tmp_path / "out" / ".slide.resume"
    with killed_after(2):
        infer_slide(session, slide, out, TILE)
    region = json.loads((folder / "checkpoint.json").read_text())["regions"][1]
    damaged = folder / region["files"]["Seg"][1]["file"]  # a reduced level's file counts as much as level 0's
    damaged.write_bytes(damaged.read_bytes()[:-100])  # cut short: the second region is redone
    record = json.loads(infer_slide(session, slide, out, TILE).read_text())
    assert record["resumed"]["tiles_done_before"] == 14

    with killed_after(1):
        infer_slide(session, slide, out, TILE)
    slide.touch()  # the slide changed since: every region is stale
    record = json.loads(infer_slide(session, slide, out, TILE).read_text())
    assert record["resumed"] is None


def test_a_second_run_on_the_same_outputs_is_refused_while_the_first_holds_them(session: Session,
                                                                                  tmp_path: Path) -> None:
    from deepliif.slide_checkpoint import CheckpointBusyError, SlideCheckpoint
    slide = write_ome_pyramid(tmp_path / "slide.ome.tif", glass_with_tissue())
    with SlideCheckpoint(tmp_path / "out" / ".slide.resume", {}, ("Seg",), 1500, [1300]):
        with pytest.raises(CheckpointBusyError, match="another run is writing"):
            infer_slide(session, slide, tmp_path / "out", TILE)


def test_postprocess_of_real_outputs_on_a_slide_over_the_image_limit_equals_the_whole_image(
        deepliif_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DeepLIIF's own Seg and Marker of the fixture tiles, placed on a slide larger than `--max-pixels`:
    the same counts, thresholds, cells and overlays as postprocessing the pixels as one image."""
    from deepliif.imageio import write_png
    from deepliif.postprocessing import postprocess
    from deepliif.scoring_rules import PostprocessOptions
    from engine.cli import main

    from ..deepliif.test_slide_scoring import on_glass
    orig, seg, marker = on_glass(deepliif_fixtures)  # 1105 x 1210: 1.34 megapixels
    for name, image in (("case", orig), ("case_Seg", seg), ("case_Marker", marker)):
        write_ome_pyramid(tmp_path / f"{name}.ome.tif", image, mpp=0.5)
        write_png(tmp_path / f"{name}.png", image)
    limit = ["--max-pixels", "1000000", "--marker-thresh", "default", "-q"]
    assert main(["postprocess", "--image", str(tmp_path / "case.png"), "--seg", str(tmp_path / "case_Seg.png"),
                 "--out", str(tmp_path / "png"), *limit]) == 2
    assert "over the limit of 1000000" in capsys.readouterr().err  # as an image it is refused
    assert main(["postprocess", "--image", str(tmp_path / "case.ome.tif"), "--seg", str(tmp_path / "case_Seg.ome.tif"),
                 "--marker", str(tmp_path / "case_Marker.ome.tif"), "--tile-size", "512", "--out",
                 str(tmp_path / "out"), "--pyramid-compression", "zstd", *limit]) == 0  # lossless: compared exactly
    whole = postprocess(orig, seg, marker, 512, PostprocessOptions(marker_thresh="default"))
    record = json.loads((tmp_path / "out" / "case.json").read_text())
    assert record["scoring"] == whole.scoring and whole.scoring["num_total"] > 100
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == whole.scoring
    rows = (tmp_path / "out" / "case_cells.csv").read_text().splitlines()
    assert len(rows) == 1 + whole.scoring["num_total"] and rows[1].startswith(f"1,{whole.cells[0].centroid_x},")
    np.testing.assert_array_equal(level0(tmp_path / "out" / "case_SegOverlaid.ome.tif"), whole.overlaid)
    np.testing.assert_array_equal(level0(tmp_path / "out" / "case_SegRefined.ome.tif"), whole.refined)
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_postprocess_of_a_slide_by_optical_density_writes_the_images_cell_data(
        deepliif_fixtures: Path, tmp_path: Path) -> None:
    """Optical-density thresholds and DeepLIIF's cell data (v5, the density per cell) on a slide: the
    scoring and every cell record equal postprocessing the same pixels as one image."""
    from deepliif.cell_data import read_cell_data
    from deepliif.postprocessing import postprocess
    from deepliif.scoring_rules import PostprocessOptions
    from engine.cli import main

    from ..deepliif.test_slide_scoring import on_glass
    orig, seg, marker = on_glass(deepliif_fixtures)
    for name, image in (("case", orig), ("case_Seg", seg), ("case_Marker", marker)):
        write_ome_pyramid(tmp_path / f"{name}.ome.tif", image, mpp=0.5)
    assert main(["-q", "postprocess", "--image", str(tmp_path / "case.ome.tif"), "--seg",
                 str(tmp_path / "case_Seg.ome.tif"), "--marker", str(tmp_path / "case_Marker.ome.tif"),
                 "--tile-size", "512", "--od-thresh-lower", "40", "--od-thresh-upper", "140", "--cell-data", "5",
                 "--pyramid-compression", "zstd", "--out", str(tmp_path / "out")]) == 0
    options = PostprocessOptions(od_thresh_lower=40, od_thresh_upper=140)
    whole = postprocess(orig, seg, marker, 512, options, cell_data=5)
    record = json.loads((tmp_path / "out" / "case.json").read_text())
    assert record["scoring"] == whole.scoring and 0 < whole.scoring["num_pos"] < whole.scoring["num_total"]
    assert record["cells"]["cell_data"] == "case_cells.json.gz"
    cells, settings, version = read_cell_data(tmp_path / "out" / "case_cells.json.gz")
    assert version == 5 and settings == whole.cell_data["settings"]
    assert json.loads(json.dumps(cells)) == json.loads(json.dumps(whole.cell_data["cells"]))
    np.testing.assert_array_equal(level0(tmp_path / "out" / "case_SegOverlaid.ome.tif"), whole.overlaid)


def test_a_slide_is_rescored_from_its_cell_data_alone_as_the_image_is(deepliif_fixtures: Path,
                                                                       tmp_path: Path) -> None:
    """`postprocess --cell-data 4` of a slide, then `rescore` of the slide from its .json.gz with other
    thresholds: the scoring and both pyramids equal re-scoring the same pixels as one image."""
    from deepliif.cell_data import decode_cell
    from deepliif.postprocessing import postprocess
    from deepliif.rescore import rescore
    from deepliif.scoring_rules import PostprocessOptions
    from engine.cli import main

    from ..deepliif.test_slide_scoring import on_glass
    orig, seg, marker = on_glass(deepliif_fixtures)
    for name, image in (("case", orig), ("case_Seg", seg), ("case_Marker", marker)):
        write_ome_pyramid(tmp_path / f"{name}.ome.tif", image, mpp=0.5)
    assert main(["-q", "postprocess", "--image", str(tmp_path / "case.ome.tif"), "--seg",
                 str(tmp_path / "case_Seg.ome.tif"), "--marker", str(tmp_path / "case_Marker.ome.tif"),
                 "--tile-size", "512", "--cell-data", "4", "--out", str(tmp_path / "post")]) == 0
    assert main(["-q", "rescore", "--cells", str(tmp_path / "post" / "case_cells.json.gz"), "--image",
                 str(tmp_path / "case.ome.tif"), "--size-thresh", "40", "--marker-thresh", "default",
                 "--pyramid-compression", "deflate", "--out", str(tmp_path / "again")]) == 0
    document = postprocess(orig, seg, marker, 512, cell_data=4).cell_data
    cells = [decode_cell(cell, "marker") for cell in document["cells"]]
    whole = rescore(cells, document["settings"], 4, orig, PostprocessOptions(size_thresh=40, marker_thresh="default"))
    record = json.loads((tmp_path / "again" / "case.json").read_text())
    assert record["scoring"] == whole.scoring and whole.scoring["num_total"] > 100
    assert set(record["outputs"]) == {"SegOverlaid", "SegRefined"}
    np.testing.assert_array_equal(level0(tmp_path / "again" / "case_SegOverlaid.ome.tif"), whole.overlaid)
    np.testing.assert_array_equal(level0(tmp_path / "again" / "case_SegRefined.ome.tif"), whole.refined)
    assert not [p.name for p in (tmp_path / "again").iterdir() if p.name.startswith(".")]


def test_postprocess_refuses_mixed_or_mismatched_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepliif.imageio import write_png
    from engine.cli import main
    image = glass_with_tissue()[:600, :700]
    write_ome_pyramid(tmp_path / "a.ome.tif", image)
    write_ome_pyramid(tmp_path / "small.ome.tif", image[:500])
    write_png(tmp_path / "a.png", image)
    common = ["postprocess", "--out", str(tmp_path / "out"), "-q"]
    for image_file, seg_file, extra, message in [
            ("a.ome.tif", "a.png", [], "is not a slide but the image"),
            ("a.png", "a.ome.tif", [], "is a slide but the image"),
            ("a.ome.tif", "small.ome.tif", [], "700x500, but the slide"),
            ("a.ome.tif", "a.ome.tif", ["--marker-thresh", "default"], "needs the Marker slide")]:
        assert main([*common, "--image", str(tmp_path / image_file), "--seg", str(tmp_path / seg_file), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.slow
def test_a_slide_of_real_tissue_through_the_trained_mini_model_scores_its_cells_as_the_image_does(
        deepliif_fixtures: Path, sample_dir: Path, tmp_path: Path) -> None:
    """With a model that finds cells, the slide path's scoring and per-cell table equal whole-image
    inference of the same pixels (the random-weight models elsewhere make 0 cells, a trivial match)."""
    from deepliif.imageio import read_image
    from deepliif.inference import InferenceOptions
    canvas = np.full((700, 1100, 3), 236, np.uint8)
    canvas[100:612, 30:542] = read_image(sample_dir / "22_2.png")
    canvas[150:662, 560:1072] = read_image(sample_dir / "Lung1.png")
    slide_path = tmp_path / "tissue.tif"
    tifffile.imwrite(slide_path, canvas, tile=(256, 256), photometric="rgb")
    with Session(deepliif_fixtures / "models" / "mini", backend="torch", device="cpu", batch_size=4) as mini:
        record = json.loads(infer_slide(mini, slide_path, tmp_path / "slide", cell_data=4).read_text())
        image = mini.infer(canvas, InferenceOptions(tile_size=record["tile_size"], batch_size=4, cell_data=4))
    assert record["scoring"] == image.scoring and image.scoring["num_total"] > 50
    cell_data = gzip.decompress((tmp_path / "slide" / record["cells"]["cell_data"]).read_bytes())
    assert json.loads(cell_data) == json.loads(json.dumps(image.cell_data))  # DeepLIIF's v4, cell for cell
    rows = (tmp_path / "slide" / "tissue_cells.csv").read_text().splitlines()[1:]
    assert len(rows) == image.scoring["num_total"]
    assert [tuple(row.split(",")[1:9]) for row in rows] == [
        tuple(str(v) for v in (c.centroid_x, c.centroid_y, c.bbox_x0, c.bbox_y0, c.bbox_x1, c.bbox_y1, c.area_px,
                               c.positive)) for c in image.cells]
    # the QuPath file: outlines traced band by band across the slide equal the whole image's, cell for cell
    features = assert_qupath_imports(read_geojson(tmp_path / "slide" / "tissue_cells.geojson.gz"), record["scoring"])
    assert_outlines_trace_the_cells(features)
    assert [f["geometry"]["coordinates"] for f in features] == \
        [[ring.tolist() for ring in image.outlines[c.id]] for c in image.cells]


def test_every_output_opens_in_openslide_with_all_levels_in_the_codec_asked_for(session: Session,
                                                                               tmp_path: Path) -> None:
    """Each `--pyramid-compression`: every output opens in OpenSlide with every level; the default writes
    only the display outputs as JPEG (within 4 grey levels) and the rest as zstd, equal to deflate's."""
    import openslide
    from deepliif.pyramid import PyramidCompression
    slide = write_ome_pyramid(tmp_path / "slide.ome.tif", glass_with_tissue())
    records = {mode: json.loads(infer_slide(session, slide, tmp_path / mode.value, TILE, compression=mode).read_text())
               for mode in PyramidCompression}
    assert PyramidCompression.default() is PyramidCompression.JPEG
    assert len({json.dumps(record["scoring"]) for record in records.values()}) == 1
    lossless = {PyramidCompression.DEFLATE: ("ADOBE_DEFLATE", "zlib")}
    for name in SLIDE_OUTPUTS:
        display = name in ("Hema", "DAPI", "Lap2", "SegOverlaid")
        for mode, record in records.items():
            path = tmp_path / mode.value / f"slide_{name}.ome.tif"
            with tifffile.TiffFile(path) as tiff:
                levels = [level.shape[:2] for level in tiff.series[0].levels]
                codec = tiff.pages[0].compression
            with openslide.OpenSlide(str(path)) as opened:
                assert [(h, w) for w, h in opened.level_dimensions] == levels, (mode, name)
                smallest = opened.read_region((0, 0), len(levels) - 1, opened.level_dimensions[-1])
                assert smallest.size == opened.level_dimensions[-1]  # OpenSlide decodes the codec
            assert len(levels) == record["outputs"][name]["levels"] == 4  # 1300x1500 down to one 256 tile
            tag, written = ("JPEG", "jpeg") if mode is PyramidCompression.JPEG and display else \
                lossless.get(mode, ("ZSTD", "zstd"))
            assert codec == tifffile.COMPRESSION[tag] and record["outputs"][name]["compression"] == written, (mode, name)
        exact = level0(tmp_path / "deflate" / f"slide_{name}.ome.tif")
        assert np.array_equal(level0(tmp_path / "zstd" / f"slide_{name}.ome.tif"), exact), name
        error = np.abs(exact.astype(int) - level0(tmp_path / "jpeg" / f"slide_{name}.ome.tif")).mean()
        assert 0 < error < 4 if display else error == 0, (name, error)


def test_a_failing_overlay_pass_leaves_no_cells_file_no_temporary_and_no_thread(
        deepliif_fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cells files are written beside the overlay pass, as it completes cells: when the pass fails
    part-way, the writer stops, removes what it had begun, and its thread ends with the pass's."""
    import threading

    from deepliif import slide_overlays
    from engine.slide_inference import postprocess_slide

    from ..deepliif.test_slide_scoring import on_glass
    orig, seg, marker = on_glass(deepliif_fixtures)
    for name, image in (("case", orig), ("case_Seg", seg), ("case_Marker", marker)):
        write_ome_pyramid(tmp_path / f"{name}.ome.tif", image, mpp=0.5)
    from deepliif import slide_scoring
    monkeypatch.setattr(slide_scoring, "BAND_PIXELS", 100 * seg.shape[1])  # bands of 100 rows
    drawn = []
    draw = slide_overlays._draw

    def failing(window, pixels, score, first, stop, width, sink) -> None:
        if first >= 600:
            raise OSError("disk gone")
        drawn.append(first)
        draw(window, pixels, score, first, stop, width, sink)
    monkeypatch.setattr(slide_overlays, "_draw", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk gone"):
        postprocess_slide(tmp_path / "case.ome.tif", tmp_path / "case_Seg.ome.tif", tmp_path / "case_Marker.ome.tif",
                          out, 512)
    assert drawn and max(drawn) < 600
    assert sorted(p.name for p in out.iterdir()) == []  # no cells file, no overlay, no temporary
    assert not [t.name for t in threading.enumerate()
                if t.name.startswith(("cells-file", "read-ahead", "cpu-stage", "background-pass"))]
