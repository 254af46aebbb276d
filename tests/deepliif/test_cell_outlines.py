"""`CellsInOrder`: a slide's cells handed to the cells-file writer as the overlay pass completes them."""
from __future__ import annotations

import threading

import pytest

from deepliif.cell_outlines import CellsInOrder
from deepliif.cells import Cell
from deepliif.errors import DeepLIIFError


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
