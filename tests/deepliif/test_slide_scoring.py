"""Slide scoring in row bands equals whole-image postprocessing of the same pixels, cell for cell."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepliif.imageio import read_image
from deepliif.label_stats import UnionFind
from deepliif.postprocessing import postprocess
from deepliif.scoring_rules import PostprocessOptions
from deepliif.slide_overlays import draw_slide
from deepliif.slide_scoring import percentile_from_histogram, score_slide

from .bands import array_bands

from .test_postprocessing import ARGUMENT_SETS, _load, _tiles


def on_glass(deepliif_fixtures: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real DeepLIIF outputs of every fixture tile placed at unaligned offsets on a larger canvas; the
    rest is no cell (black Seg), as glass around tissue is."""
    tiles = [_load(tile) for tile in _tiles(deepliif_fixtures)]
    height, width = 1210, 1105
    orig = np.full((height, width, 3), 240, np.uint8)
    seg, marker = np.zeros_like(orig), np.zeros_like(orig)
    for (ihc, tile_seg, tile_marker), (y, x) in zip(tiles, [(37, 61), (611, 533)]):
        h, w = tile_seg.shape[:2]
        orig[y: y + h, x: x + w], seg[y: y + h, x: x + w], marker[y: y + h, x: x + w] = ihc, tile_seg, tile_marker
    return orig, seg, marker


@pytest.mark.parametrize("variant", sorted(ARGUMENT_SETS))
@pytest.mark.parametrize("rows, threads", [(97, 1), (97, 3), (512, 2)])
def test_band_scoring_equals_whole_image_postprocessing(deepliif_fixtures: Path, variant: str, rows: int,
                                                       threads: int) -> None:
    orig, seg, marker = on_glass(deepliif_fixtures)
    options = PostprocessOptions(**ARGUMENT_SETS[variant])
    whole = postprocess(orig, seg, marker, 512, options)
    score = score_slide(array_bands(seg, marker, rows), seg.shape[1], seg.shape[0], 512, True, options, threads)
    assert score.scoring == whole.scoring and whole.scoring["num_total"] > 100
    assert score.cells == whole.cells  # every counted cell: centroid, box, area, class, marker


def test_fixture_counts_survive_band_edges_through_every_cell(deepliif_fixtures: Path) -> None:
    """Bands of 5 rows cut through nearly every cell: the merged counts still equal DeepLIIF's own."""
    tile = _tiles(deepliif_fixtures)[0]
    _, seg, marker = _load(tile)
    expected = json.loads((tile / "scoring_marker_thresh_default.json").read_text())["scoring"]
    score = score_slide(array_bands(seg, marker, 5), seg.shape[1], seg.shape[0], 512, True,
                        PostprocessOptions(marker_thresh="default"))
    assert score.scoring == expected


def test_background_joins_across_bands_only_through_touching_pixels() -> None:
    """A ring of cell pixels encloses no-cell pixels that are not background (they do not reach the border)."""
    seg = np.zeros((40, 40, 3), np.uint8)
    seg[5:35, 5:35, 0] = 255   # a square of positive cell pixels ...
    seg[10:30, 10:30] = 0      # ... with a hole: no-cell pixels enclosed by it
    seg[18:22, 18:22, 2] = 255  # and a negative cell inside the hole
    whole = postprocess(np.full_like(seg, 255), seg, None, 512, PostprocessOptions(size_thresh=0))
    for rows in (1, 3, 7, 40):
        score = score_slide(array_bands(seg, None, rows), 40, 40, 512, False, PostprocessOptions(size_thresh=0))
        assert score.scoring == whole.scoring and score.cells == whole.cells, rows
    assert whole.scoring["num_total"] == 1  # the hole is not background: ring, hole and inner cell are one


def test_percentiles_from_a_histogram_equal_numpys() -> None:
    values = np.random.default_rng(4).integers(1, 256, 5001)
    counts = np.bincount(values, minlength=256)
    for q in (0.1, 50, 99.9):
        assert percentile_from_histogram(counts, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-9)


def test_union_find_grows_and_joins() -> None:
    sets = UnionFind()
    first = sets.grow(3000)
    sets.union_pairs(np.array([first + 5, first + 2999]), np.array([first + 2999, first + 7]))
    roots = sets.roots()
    assert roots[first + 7] == roots[first + 5] == first + 5 and roots[first + 6] == first + 6


def test_reading_the_real_seg_as_a_slide_matches(deepliif_fixtures: Path) -> None:
    tile = _tiles(deepliif_fixtures)[1]
    seg, marker = read_image(tile / "Seg.png"), read_image(tile / "Marker.png")
    whole = postprocess(read_image(tile / "IHC.png"), seg, marker, 512)
    assert score_slide(array_bands(seg, marker, 64), 512, 512, 512, True).scoring == whole.scoring


def test_scoring_read_back_from_written_pyramids_equals_the_whole_image(deepliif_fixtures: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from deepliif import slide_scoring
    from deepliif.slide_scoring import slide_bands

    from .test_slides import write_ome_pyramid
    orig, seg, marker = on_glass(deepliif_fixtures)
    write_ome_pyramid(tmp_path / "s_Seg.ome.tif", seg)
    write_ome_pyramid(tmp_path / "s_Marker.ome.tif", marker)
    monkeypatch.setattr(slide_scoring, "BAND_PIXELS", 150 * seg.shape[1])  # bands of 150 rows
    bands = slide_bands(tmp_path / "s_Seg.ome.tif", tmp_path / "s_Marker.ome.tif")
    assert [len(band[1]) for band in bands()][:2] == [150, 150]
    options = PostprocessOptions(marker_thresh="default")
    whole = postprocess(orig, seg, marker, 512, options)
    score = score_slide(bands, seg.shape[1], seg.shape[0], 512, True, options)
    assert (score.scoring, score.cells) == (whole.scoring, whole.cells)


def drawn(orig: np.ndarray, seg: np.ndarray, marker: np.ndarray | None, rows: int,
          options: PostprocessOptions, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """SegOverlaid and SegRefined drawn band by band, stitched back to whole images for comparison."""
    height, width = seg.shape[:2]
    bands = array_bands(seg, marker, rows)
    score = score_slide(bands, width, height, 512, marker is not None, options, threads)
    overlaid, refined, tops = np.zeros_like(orig), np.zeros_like(orig), []

    def sink(top: int, overlaid_rows: np.ndarray, refined_rows: np.ndarray) -> None:
        tops.append(top)
        overlaid[top: top + len(overlaid_rows)], refined[top: top + len(refined_rows)] = overlaid_rows, refined_rows
    draw_slide(lambda top, count: orig[top: top + count], score, width, height, sink, threads)
    assert tops == sorted(tops) and tops[0] == 0  # handed over top to bottom
    return overlaid, refined


@pytest.mark.parametrize("variant", sorted(ARGUMENT_SETS))
@pytest.mark.parametrize("rows, threads", [(5, 1), (97, 3), (512, 2)])
def test_band_overlays_equal_whole_image_overlays(deepliif_fixtures: Path, variant: str, rows: int,
                                                  threads: int) -> None:
    """Outlines that cross band edges, meet other cells' outlines or start at a seed in a halo row are
    drawn as the whole image draws them: pixel for pixel."""
    orig, seg, marker = on_glass(deepliif_fixtures)
    options = PostprocessOptions(**ARGUMENT_SETS[variant])
    whole = postprocess(orig, seg, marker, 512, options)
    overlaid, refined = drawn(orig, seg, marker, rows, options, threads)
    assert np.count_nonzero(whole.refined[..., 1]) > 10_000  # plenty of outline pixels to get wrong
    np.testing.assert_array_equal(overlaid, whole.overlaid)
    np.testing.assert_array_equal(refined, whole.refined)


def test_band_overlays_of_touching_cells_and_one_row_bands() -> None:
    """Two cells whose outlines meet on a band edge, and bands of one row (shorter than the halo)."""
    seg = np.zeros((30, 30, 3), np.uint8)
    seg[8:13, 5:12, 0] = 255
    seg[15:20, 5:12, 2] = 255
    orig = np.full_like(seg, 200)
    options = PostprocessOptions(size_thresh=0)
    whole = postprocess(orig, seg, None, 512, options)
    for rows in (1, 2, 3, 4, 14):
        overlaid, refined = drawn(orig, seg, None, rows, options)
        np.testing.assert_array_equal(overlaid, whole.overlaid, err_msg=f"rows={rows}")
        np.testing.assert_array_equal(refined, whole.refined, err_msg=f"rows={rows}")


def test_a_failing_read_in_the_overlay_pass_stops_it_and_leaves_no_thread() -> None:
    """The input's rows are read ahead on their own thread: a read that fails is raised where the pass
    would have used it, and neither the read-ahead thread nor a band thread is left behind."""
    import threading
    seg = np.zeros((60, 40, 3), np.uint8)
    for top in range(4, 56, 8):
        seg[top: top + 4, 5:30, 0] = 255
    orig = np.full_like(seg, 200)
    bands = array_bands(seg, None, 7)
    score = score_slide(bands, 40, 60, 512, False, PostprocessOptions(size_thresh=0), 2)
    drawn_rows = []

    def rows(top: int, count: int) -> np.ndarray:
        if top >= 30:
            raise OSError(f"rows {top}-{top + count} of the input are unreadable")
        return orig[top: top + count]
    with pytest.raises(OSError, match="unreadable"):
        draw_slide(rows, score, 40, 60, lambda top, overlaid, refined: drawn_rows.append(top), 2)
    assert drawn_rows and max(drawn_rows) < 30  # what was drawn came before the failure
    assert not [t for t in threading.enumerate() if t.name.startswith(("cpu-stage", "read-ahead"))]


def test_pass_two_keeps_each_bands_labels_and_a_failed_pass_releases_them(monkeypatch, tmp_path: Path) -> None:
    """The overlay pass reads pass two's labels back instead of the Seg: what is stored (in the run's own
    folder, as a file nobody else sees) is exactly the band's labelling, and a pass that fails part-way
    closes its store."""
    from deepliif import slide_scoring
    from deepliif.label_stats import components
    seg = np.zeros((60, 40, 3), np.uint8)
    for top in range(4, 56, 8):
        seg[top: top + 4, 5:30, 0] = 255
    score = score_slide(array_bands(seg, None, 7), 40, 60, 512, False, PostprocessOptions(size_thresh=0),
                        scratch=tmp_path)
    assert not list(tmp_path.iterdir())
    stored = list(score.labels.stored.read())
    assert [band[0] for band in stored] == list(range(0, 60, 7))
    for index, (top, shape, count, data) in enumerate(stored):
        labels, cell_of = score.labels.band_labels(index, shape, count, data)
        expected = components(seg[top: top + shape[0], :, 0] > 0)
        np.testing.assert_array_equal(labels, expected.labels)
        assert count == expected.count and len(cell_of) == count + 1
    score.labels.close()

    closed = []
    original_close = slide_scoring.BandLabels.close
    monkeypatch.setattr(slide_scoring.BandLabels, "close", lambda self: (closed.append(self), original_close(self)))
    bands = array_bands(seg, None, 7)

    def failing(measuring: bool = True):
        for band in bands(measuring):
            if measuring and band.top >= 28:
                raise OSError("band unreadable")
            yield band
    with pytest.raises(OSError, match="unreadable"):
        score_slide(failing, 40, 60, 512, False, PostprocessOptions(size_thresh=0), 2)
    assert len(closed) == 1
