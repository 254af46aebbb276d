"""`CellsInOrder`: cells handed to the cells-file writer as the outline pass completes them; `LabelOutlines`:
an image's labels traced on a thread of their own."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from deepliif import cell_outlines
from deepliif.cell_outlines import CellsInOrder, LabelOutlines, OutlineTracer
from deepliif.cells import Cell
from deepliif.errors import DeepLIIFError
from deepliif.label_stats import components


def cell(number: int, top: int, bottom: int) -> Cell:
    return Cell(number, 1.0, float(top), 0, top, 4, bottom, 10, True, 0, 0.0)


def consumed(cells: CellsInOrder, seen: list[int], failed: list[BaseException]) -> threading.Thread:
    def consume() -> None:
        try:
            for item in cells:
                seen.append(item.id)
        except DeepLIIFError as exc:
            failed.append(exc)
    thread = threading.Thread(target=consume)
    thread.start()
    return thread


def wait_for(seen: list[int], count: int) -> None:
    for _ in range(200):
        if len(seen) >= count:
            return
        threading.Event().wait(0.01)


def test_cells_are_handed_out_in_order_once_the_rows_below_them_have_passed() -> None:
    """Cell 2 is tall (rows 0-50): cells 3 and 4, complete earlier, wait for it, and none jumps ahead."""
    cells = CellsInOrder([cell(1, 0, 5), cell(2, 0, 50), cell(3, 10, 15), cell(4, 20, 25), cell(5, 60, 70)])
    seen: list[int] = []
    thread = consumed(cells, seen, [])
    cells.passed(30)
    wait_for(seen, 1)
    threading.Event().wait(0.05)
    assert seen == [1]  # 3 and 4 are complete, but 2 is not
    cells.passed(50)
    wait_for(seen, 4)
    assert seen == [1, 2, 3, 4]
    cells.passed(70)
    thread.join(timeout=5)
    assert seen == [1, 2, 3, 4, 5] and not thread.is_alive()


def test_an_abandoned_pass_stops_the_consumer_at_the_first_incomplete_cell() -> None:
    cells = CellsInOrder([cell(1, 0, 5), cell(2, 10, 20)])
    seen, failed = [], []
    thread = consumed(cells, seen, failed)
    cells.passed(8)
    wait_for(seen, 1)
    cells.abandon()
    thread.join(timeout=5)
    assert seen == [1] and not thread.is_alive()
    with pytest.raises(DeepLIIFError, match="before cell 2"):
        raise failed[0]


def _random_labels(seed: int = 7, size: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((size, size)) < 0.35  # many small components, tall ones crossing band edges


def _outline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("outlines", "cpu-stage", "read-ahead"))]


def test_label_outlines_in_bands_on_threads_equal_one_pass_over_the_whole_image(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cell_outlines, "TRACE_BAND_ROWS", 16)
    found = components(_random_labels())
    whole = OutlineTracer(found.x0[1:], found.y0[1:], found.x1[1:], found.y1[1:])
    whole.add(0, found.labels)
    passed: list[int] = []
    with LabelOutlines(found, threads=2) as traced:
        traced.follow(passed.append)
        banded = traced.wait()
    assert sorted(banded) == sorted(whole.outlines) == list(range(1, found.count + 1))
    for label, rings in whole.outlines.items():
        assert len(banded[label]) == len(rings), label
        for ring, other in zip(rings, banded[label]):
            np.testing.assert_array_equal(other, ring, err_msg=str(label))
    assert passed == sorted(passed) and passed[-1] == 200, "rows are heard in order, down to the last"
    assert _outline_threads() == []


def test_leaving_label_outlines_early_or_on_a_failed_band_ends_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cell_outlines, "TRACE_BAND_ROWS", 8)
    found = components(_random_labels(size=400))
    with LabelOutlines(found, threads=2):
        pass  # left before waiting: the tracing stops at the next band
    assert _outline_threads() == []
    real = OutlineTracer.trace_band

    def failing(self, top: int, owner: np.ndarray):
        if top >= 200:
            raise MemoryError("band at row 200")
        return real(self, top, owner)

    monkeypatch.setattr(OutlineTracer, "trace_band", failing)
    passed: list[int] = []
    with pytest.raises(MemoryError, match="row 200"), LabelOutlines(found, threads=2) as traced:
        traced.follow(passed.append)
        traced.wait()
    assert max(passed) <= 200, "no row past the failed band is heard"
    assert _outline_threads() == []
