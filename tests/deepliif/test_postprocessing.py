from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from deepliif.errors import ArgumentError, DeepLIIFError
from deepliif.imageio import read_image
from deepliif.postprocessing import (default_marker_threshold, default_size_threshold, find_cells, gaussian_sums,
                                     kernel_density, label_cells, measure_cells, postprocess)
from deepliif.seg_rows import SegRows
from deepliif.scoring_rules import PostprocessOptions, Resolution

ARGUMENT_SETS = {
    "default": {},
    "marker_thresh_default": {"marker_thresh": "default"},
    "size_100_upper_2000": {"size_thresh": 100, "size_thresh_upper": 2000},
}


def _tiles(fixtures: Path) -> list[Path]:
    tiles = sorted((fixtures / "postprocess").iterdir())
    assert tiles, "no postprocess fixtures"
    return tiles


def _load(tile: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return read_image(tile / "IHC.png"), read_image(tile / "Seg.png"), read_image(tile / "Marker.png")


@pytest.mark.parametrize("variant", sorted(ARGUMENT_SETS))
def test_counts_and_thresholds_identical_to_deepliif(deepliif_fixtures: Path, variant: str) -> None:
    for tile in _tiles(deepliif_fixtures):
        expected = json.loads((tile / f"scoring_{variant}.json").read_text())
        assert expected["resolution"] == Resolution.from_tile_size(512).value
        result = postprocess(*_load(tile), 512, PostprocessOptions(**ARGUMENT_SETS[variant]))
        assert result.scoring == expected["scoring"], tile.name


def assert_overlays_match(overlaid: np.ndarray, refined: np.ndarray, folder: Path, prefix: str = "") -> None:
    """DeepLIIF's SegOverlaid/SegRefined in `folder` (`<prefix>SegOverlaid.png`, ...), except at under 0.2%
    of pixels, every one of them next to an outline."""
    theirs_refined = read_image(folder / f"{prefix}SegRefined.png")
    outline = np.all(refined == (0, 255, 0), axis=2) | np.all(theirs_refined == (0, 255, 0), axis=2)
    for name, ours in (("SegOverlaid", overlaid), ("SegRefined", refined)):
        theirs = read_image(folder / f"{prefix}{name}.png")
        differs = np.any(ours != theirs, axis=2)
        assert differs.mean() < 0.002, (folder.name, prefix, name, int(differs.sum()))
        assert not (differs & ~ndimage.binary_dilation(outline)).any(), "a difference away from outlines"


def test_overlay_images_match_except_at_a_few_outline_pixels(deepliif_fixtures: Path) -> None:
    for tile in _tiles(deepliif_fixtures):
        result = postprocess(*_load(tile), 512)
        assert_overlays_match(result.overlaid, result.refined, tile)


def _seg_with(cells: list[tuple[slice, slice, tuple[int, int, int]]], size: int = 40) -> np.ndarray:
    seg = np.zeros((size, size, 3), np.uint8)
    for rows, cols, colour in cells:
        seg[rows, cols] = colour
    return seg


def test_enclosed_unknown_pixels_belong_to_the_cell() -> None:
    seg = _seg_with([(slice(5, 15), slice(5, 15), (200, 0, 0))])
    seg[9:11, 9:11] = 0  # a hole: unknown, enclosed by the cell
    cells = find_cells(seg, None, PostprocessOptions())
    assert not cells.background[9:11, 9:11].any()
    assert cells.sizes[1] == 100


def test_classification_rules() -> None:
    seg = _seg_with([
        (slice(2, 8), slice(2, 8), (200, 0, 100)),  # R >= B: positive
        (slice(2, 8), slice(20, 26), (60, 0, 200)),  # R < B: negative
        (slice(20, 26), slice(2, 8), (200, 90, 0)),  # G > 80: not a cell pixel
        (slice(20, 26), slice(20, 26), (60, 0, 60)),  # R + B = 120: not above the threshold
        (slice(35, 37), slice(35, 37), (200, 0, 0)),  # 4 pixels: noise
    ])
    result = postprocess(np.full_like(seg, 255), seg, None, 512, PostprocessOptions(size_thresh=0))
    assert (result.scoring["num_pos"], result.scoring["num_neg"]) == (1, 1)
    assert result.scoring["marker_thresh"] is None
    assert tuple(result.refined[5, 5]) == (255, 0, 0) and tuple(result.refined[5, 23]) == (0, 0, 255)
    assert tuple(result.overlaid[1, 5]) == (255, 0, 0) and tuple(result.overlaid[1, 23]) == (0, 0, 255)


def test_marker_threshold_makes_cells_positive() -> None:
    seg = _seg_with([(slice(2, 8), slice(2, 8), (60, 0, 200))])
    marker = np.zeros_like(seg)
    marker[4, 4] = (0, 250, 0)  # grey value of Marker is the channel maximum
    base = postprocess(np.full_like(seg, 255), seg, marker, 512, PostprocessOptions(size_thresh=0))
    forced = postprocess(np.full_like(seg, 255), seg, marker, 512, PostprocessOptions(size_thresh=0, marker_thresh=200))
    assert base.scoring["num_pos"] == 0 and forced.scoring["num_pos"] == 1


@pytest.mark.parametrize("threads", [1, 3])
def test_the_size_density_is_summed_value_after_value_as_deepliif_does(threads: int) -> None:
    """Each point's sum is the terms added one after another in the values' order (DeepLIIF's loop), bit
    for bit, over more values than one chunk holds; a pairwise or reordered sum differs in the last bits."""
    values = np.sqrt(np.random.default_rng(3).integers(1, 2500, size=9000).astype(np.float64))
    at = np.arange(40) * 1.3
    sums = gaussian_sums(values, at, threads=threads)
    for point in range(40):
        terms = np.exp(-((at[point] - values) ** 2 / 2)) * (1 / np.sqrt(2 * np.pi))
        total = 0.0
        for term in terms.tolist():
            total += term
        assert sums[point] == total
    density, step = kernel_density(values, points=40, threads=threads)
    assert step == (values.max() + 1) / 40
    assert np.array_equal(density, (gaussian_sums(values, np.arange(40) * step) / len(values)).astype(np.float32))


def test_default_thresholds() -> None:
    assert default_size_threshold(np.array([50]), Resolution.X40) == 0
    sizes = np.array([5] * 30 + [120] * 30)
    assert 16 <= default_size_threshold(sizes, Resolution.X40) <= 100
    assert default_size_threshold(np.array([5, 6]), Resolution.X10) == 4  # below the min clamps to min
    marker = np.zeros((10, 10, 3), np.uint8)
    assert default_marker_threshold(marker) == 0
    marker[0, :] = np.arange(10, 110, 10)[:, None]
    assert default_marker_threshold(marker) == round((100 - 10) * 0.9) + 10


def test_resolution_from_tile_size() -> None:
    assert [Resolution.from_tile_size(s).value for s in (512, 385, 384, 193, 192)] == ["40x", "40x", "20x", "20x", "10x"]


@pytest.mark.parametrize("options", [{"seg_thresh": -1}, {"seg_thresh": "120"}, {"size_thresh": "big"},
                                     {"marker_thresh": 1.5}, {"size_thresh_upper": -3}])
def test_bad_options_are_named(options: dict) -> None:
    name = next(iter(options))
    with pytest.raises(ArgumentError, match=name):
        PostprocessOptions(**options)


def test_marker_default_needs_a_marker_and_sizes_must_agree() -> None:
    seg = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ArgumentError, match="needs the Marker image"):
        postprocess(seg, seg, None, 512, PostprocessOptions(marker_thresh="default"))
    with pytest.raises(ArgumentError, match="image sizes differ"):
        postprocess(seg, np.zeros((9, 8, 3), np.uint8), None, 512)


def test_seg_without_any_background_pixel() -> None:
    """No label-0 pixel at all (found by the export validation on synthetic outputs): cells are still
    indexed by their own label."""
    seg = np.zeros((64, 64, 3), np.uint8)
    seg[:, :32] = (200, 0, 0)
    seg[:, 32:] = (0, 0, 200)
    result = postprocess(np.full_like(seg, 255), seg, None, 512, PostprocessOptions(size_thresh=0))
    assert (result.scoring["num_pos"], result.scoring["num_neg"]) == (1, 0)  # one 8-connected cell, ties positive
    assert result.refined.any()


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_threads_give_the_same_cells_scoring_and_images(deepliif_fixtures: Path, threads: int) -> None:
    """Bands of background labelling, of outline drawing (with their halos) and of polygon tracing meet
    exactly: a mosaic of real DeepLIIF outputs postprocessed on several threads equals one thread, pixel
    for pixel and vertex for vertex."""
    tiles = [_load(tile) for tile in _tiles(deepliif_fixtures)]
    ihc, seg, marker = (np.concatenate([np.concatenate([t[k] for t in tiles], axis=1)] * 2) for k in range(3))
    for options in (PostprocessOptions(), PostprocessOptions(marker_thresh="default")):
        one = postprocess(ihc, seg, marker, 512, options, threads=1, outlines=True)
        many = postprocess(ihc, seg, marker, 512, options, threads=threads, outlines=True)
        assert many.scoring == one.scoring and many.cells == one.cells
        assert np.array_equal(many.overlaid, one.overlaid) and np.array_equal(many.refined, one.refined)
        assert one.outlines.keys() == many.outlines.keys() == {cell.id for cell in one.cells}
        for cell_id, rings in one.outlines.items():
            assert len(many.outlines[cell_id]) == len(rings)
            assert all(np.array_equal(a, b) for a, b in zip(rings, many.outlines[cell_id])), cell_id


def test_overlays_not_asked_for_are_not_drawn(deepliif_fixtures: Path) -> None:
    tile = _tiles(deepliif_fixtures)[0]
    drawn = postprocess(*_load(tile), 512)
    scored = postprocess(*_load(tile), 512, overlays=False)
    assert scored.overlaid is None and scored.refined is None
    assert scored.scoring == drawn.scoring and scored.cells == drawn.cells


class _RecordingSink:
    """A `PostprocessSink` that assembles the overlay bands and takes the cells on a thread of its own,
    noting for each cell whether its outline was there when it was handed out."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.overlaid, self.refined = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
        self.rows_heard = np.zeros(shape[0], np.int64)
        self.taken: list = []
        self.failure: list[BaseException] = []
        self.thread: threading.Thread | None = None

    def overlay_rows(self, top: int, overlaid: np.ndarray, refined: np.ndarray) -> None:
        self.overlaid[top: top + len(overlaid)], self.refined[top: top + len(refined)] = overlaid, refined
        self.rows_heard[top: top + len(overlaid)] += 1

    def cells(self, cells, outlines) -> None:
        def take() -> None:
            try:
                for cell in cells:
                    self.taken.append((cell, None if outlines is None else outlines.get(cell.id)))
            except DeepLIIFError as exc:
                self.failure.append(exc)
        self.thread = threading.Thread(target=take, name="test-cells-taker")
        self.thread.start()


def _mosaic(fixtures: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four real tiles side by side and stacked (1024²), so bands and cells cross tile seams."""
    tiles = ([_load(tile) for tile in _tiles(fixtures)] * 4)[:4]
    return tuple(np.vstack([np.hstack([tiles[0][k], tiles[1][k]]), np.hstack([tiles[2][k], tiles[3][k]])])
                 for k in range(3))


def test_a_sink_hears_every_overlay_band_once_and_each_cell_with_its_whole_outline(
        deepliif_fixtures: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepliif import cell_outlines, postprocessing
    monkeypatch.setattr(cell_outlines, "TRACE_BAND_ROWS", 64)
    monkeypatch.setattr(postprocessing, "OVERLAY_BAND_ROWS", 64)
    orig, seg, marker = _mosaic(deepliif_fixtures)
    sink = _RecordingSink(orig.shape)
    result = postprocess(orig, seg, marker, 512, threads=2, outlines=True, sink=sink)
    sink.thread.join(10)
    assert (sink.rows_heard == 1).all(), "every row of the overlays is handed on exactly once"
    assert np.array_equal(sink.overlaid, result.overlaid) and np.array_equal(sink.refined, result.refined)
    assert [cell for cell, _ in sink.taken] == result.cells and not sink.failure
    for cell, rings in sink.taken:
        assert rings is not None and len(rings) == len(result.outlines[cell.id]), cell.id
        for ring, final in zip(rings, result.outlines[cell.id]):
            np.testing.assert_array_equal(ring, final)
    plain = postprocess(orig, seg, marker, 512, threads=1, outlines=True)
    assert plain.cells == result.cells and plain.scoring == result.scoring
    assert all(np.array_equal(a, b) for cell_id, rings in plain.outlines.items()
               for a, b in zip(rings, result.outlines[cell_id]))


def test_a_failure_while_drawing_stops_the_cells_stream_and_leaves_no_thread(
        deepliif_fixtures: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cells are handed out while the overlays are drawn; a failure in the drawing while cells are
    still being traced ends the stream at the first cell not complete (the tracing here is held back
    until the drawing has failed, so it cannot finish first)."""
    from deepliif import cell_outlines, postprocessing
    failed = threading.Event()
    trace_band = cell_outlines.OutlineTracer.trace_band

    def broken(*args, **kwargs):
        failed.set()
        raise MemoryError("overlays")

    def held_back(self, *args, **kwargs):
        failed.wait(10)
        time.sleep(0.3)  # the failure reaches the stream first
        return trace_band(self, *args, **kwargs)

    monkeypatch.setattr(postprocessing, "draw_overlays", broken)
    monkeypatch.setattr(cell_outlines.OutlineTracer, "trace_band", held_back)
    orig, seg, marker = _load(_tiles(deepliif_fixtures)[0])
    sink = _RecordingSink(orig.shape)
    with pytest.raises(MemoryError, match="overlays"):
        postprocess(orig, seg, marker, 512, threads=2, outlines=True, sink=sink)
    sink.thread.join(10)
    assert not sink.thread.is_alive() and sink.failure, "the taker stops at the first cell not complete"
    assert "outline pass stopped" in str(sink.failure[0])
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("outlines", "cpu-stage"))]


def _hand_over(rows: SegRows, seg: np.ndarray, marker: np.ndarray, finals: list[int]) -> None:
    for final in finals:
        rows.rows_final({"Seg": seg, "Marker": marker}, final)


@pytest.mark.parametrize("finals", [[1, 2, 300, 300, 301, 512, 1000], [700], [64 * k for k in range(1, 17)], []])
@pytest.mark.parametrize("options", [PostprocessOptions(), PostprocessOptions(seg_thresh=100, od_thresh_lower=10)],
                         ids=["default", "od"])
def test_seg_rows_in_any_bands_measure_the_cells_of_the_whole_seg(deepliif_fixtures: Path, finals: list[int],
                                                                   options: PostprocessOptions) -> None:
    """Rows handed over as the tile loop makes them final, in uneven bands (one row, repeats, one long
    band, none before the end), give the same background, labels and per-cell figures as the whole Seg
    labelled and measured at once."""
    orig, seg, marker = _mosaic(deepliif_fixtures)
    rows = SegRows(orig, options, 512)
    _hand_over(rows, seg, marker, finals)
    banded = rows.cells(seg, marker, threads=2)
    whole = measure_cells(label_cells(seg, options.seg_thresh, 2), marker, options, 2, orig=orig)
    assert np.array_equal(banded.background, whole.background)
    assert banded.components.count == whole.components.count > 100
    assert np.array_equal(banded.labels, whole.labels)
    for name in ("sizes", "sum_x", "sum_y"):
        assert np.array_equal(getattr(banded.components, name), getattr(whole.components, name)), name
    for name in ("x0", "y0", "x1", "y1"):  # label 0's box (the unlabelled pixels') is not made
        assert np.array_equal(getattr(banded.components, name)[1:], getattr(whole.components, name)[1:]), name
    for name in ("positive", "marker", "marker_sum", "od", "first_pixel", "kept"):
        assert np.array_equal(getattr(banded, name), getattr(whole, name)), name
    assert banded.od is not None if options.uses_optical_density else banded.od is None


def test_a_band_waits_until_its_background_is_settled(deepliif_fixtures: Path) -> None:
    """An unknown region closed off from the border only by rows below it is not background; its band is
    measured only once those rows arrive, and then as the whole image labels it."""
    orig, seg, marker = _mosaic(deepliif_fixtures)
    seg, marker = seg[:300].copy(), marker[:300]
    seg[:, :] = (255, 0, 0)  # every pixel a positive cell ...
    seg[100:200, 100:200] = 0  # ... but a square of unknown pixels ...
    seg[150:250, 150] = 0  # ... with a tail down to row 249, still open at row 200
    rows = SegRows(orig[:300], PostprocessOptions(), 512)
    _hand_over(rows, seg, marker, [100, 200])
    assert rows.settled_rows == 100, "the band of rows 100-199 waits for the rows below"
    banded = rows.cells(seg, marker)
    whole = measure_cells(label_cells(seg, 120), marker, PostprocessOptions(), orig=orig[:300])
    assert not banded.background.any() and banded.components.count == whole.components.count == 1
    assert np.array_equal(banded.labels, whole.labels) and np.array_equal(banded.sizes, whole.sizes)


@pytest.mark.parametrize("finals", [[512, 1000], [1, 2, 300, 301, 700], []])
@pytest.mark.parametrize("traced", [True, False], ids=["traced-in-bands", "traced-after"])
@pytest.mark.parametrize("threads", [None, 2], ids=["inline", "band-threads"])
def test_postprocess_of_seg_rows_equals_postprocess_of_the_seg(deepliif_fixtures: Path, finals: list[int],
                                                               traced: bool, threads: int | None) -> None:
    """The same cells, files and outlines, ring for ring, whether the cells were found and traced band by
    band (cells inside a band traced there, those crossing band edges once the bands are merged; on the
    caller's thread or on band threads) or the whole image at once."""
    orig, seg, marker = _mosaic(deepliif_fixtures)
    rows = SegRows(orig, PostprocessOptions(), 512, threads, outlines=traced)
    try:
        _hand_over(rows, seg, marker, finals)
        banded = postprocess(orig, seg, marker, 512, threads=2, outlines=True, cell_data=6,
                             measured=rows.cells(seg, marker, 2))
    finally:
        rows.close()
    whole = postprocess(orig, seg, marker, 512, threads=2, outlines=True, cell_data=6)
    assert banded.scoring == whole.scoring and banded.cells == whole.cells and banded.cell_data == whole.cell_data
    assert np.array_equal(banded.overlaid, whole.overlaid) and np.array_equal(banded.refined, whole.refined)
    assert banded.outlines.keys() == whole.outlines.keys()
    assert all(len(banded.outlines[c]) == len(whole.outlines[c]) for c in whole.outlines)
    assert all(np.array_equal(a, b) for c in whole.outlines for a, b in zip(banded.outlines[c], whole.outlines[c]))


def test_cells_measured_with_other_options_size_or_marker_are_refused(deepliif_fixtures: Path) -> None:
    orig, seg, marker = _load(_tiles(deepliif_fixtures)[0])
    other = SegRows(orig, PostprocessOptions(seg_thresh=100), 512).cells(seg, marker)
    with pytest.raises(ArgumentError, match=r"measured with .*seg_thresh=100.*this asks .*seg_thresh=120"):
        postprocess(orig, seg, marker, 512, measured=other)
    with pytest.raises(ArgumentError, match=r"X40.*this asks .*X20"):
        postprocess(orig, seg, marker, 256, measured=SegRows(orig, PostprocessOptions(), 512).cells(seg, marker))
    with pytest.raises(ArgumentError, match=r"size \(512, 512\).*size \(256, 512\)"):
        postprocess(orig[:256], seg[:256], marker[:256], 512,
                    measured=SegRows(orig, PostprocessOptions(), 512).cells(seg, marker))
    with pytest.raises(ArgumentError, match=r"Marker True.*Marker False"):
        postprocess(orig, seg, None, 512, measured=SegRows(orig, PostprocessOptions(), 512).cells(seg, marker))