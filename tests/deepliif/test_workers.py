from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deepliif.errors import ArgumentError
from deepliif.workers import available_cpus, ordered_map, parallel_map, read_ahead, resolve_threads, row_bands


def test_the_cgroup_quota_caps_the_affinity(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs: two threads may run
    assert available_cpus(quota) == min(2, available_cpus(tmp_path / "absent"))
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == available_cpus(tmp_path / "absent") >= 1


def test_threads_are_checked() -> None:
    assert resolve_threads(3) == 3 and resolve_threads(None) >= 1
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ArgumentError, match="threads must be a positive integer"):
            resolve_threads(bad)


def test_row_bands_cover_every_row_once() -> None:
    for height, parts in ((10, 3), (2, 8), (4096, 4), (1, 1)):
        bands = row_bands(height, parts)
        assert bands[0][0] == 0 and bands[-1][1] == height
        assert all(a[1] == b[0] for a, b in zip(bands, bands[1:])) and all(t < b for t, b in bands)


def test_parallel_map_keeps_order_and_waits_for_every_part_before_raising() -> None:
    finished = []

    def part(index: int) -> int:
        if index == 0:
            raise ValueError("part 0 failed")
        finished.append(index)
        return index

    assert parallel_map(lambda i: i * i, range(6), 3) == [0, 1, 4, 9, 16, 25]
    with pytest.raises(ValueError, match="part 0"):
        parallel_map(part, range(4), 2)
    assert sorted(finished) == [1, 2, 3]  # nothing left running on shared buffers
    assert not [t for t in threading.enumerate() if t.name.startswith("cpu-stage")]


def test_ordered_map_yields_in_order_pulls_a_bounded_stream_and_stops_on_failure() -> None:
    pulled, running, most = [], [0], [0]
    lock = threading.Lock()

    def items():
        for index in range(20):
            pulled.append(index)
            yield index

    def part(index: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.002 * (index % 3))  # parts finish out of order
        with lock:
            running[0] -= 1
        return index * 10

    results = []
    for result in ordered_map(part, items(), 3):
        results.append(result)
        # never more than 3 parts ahead of the consumer, one item in the read-ahead hand-off and one being read
        assert len(pulled) <= len(results) + 3 + 2
    assert results == [i * 10 for i in range(20)] and most[0] <= 3

    def failing(index: int) -> int:
        if index == 4:
            raise ValueError("band 4 failed")
        return index
    pulled.clear()
    with pytest.raises(ValueError, match="band 4"):
        list(ordered_map(failing, items(), 2))
    assert len(pulled) <= 9  # the stream stopped soon after the failure
    assert not [t for t in threading.enumerate() if t.name.startswith(("cpu-stage", "read-ahead"))]


def test_read_ahead_produces_on_its_own_thread_in_order_and_raises_where_the_source_did() -> None:
    threads = []

    def source(fail_at: int | None = None):
        for index in range(6):
            threads.append(threading.current_thread().name)
            if index == fail_at:
                raise OSError(f"item {index} unreadable")
            yield index

    assert list(read_ahead(source())) == list(range(6)) and set(threads) == {"read-ahead"}
    seen = []
    with pytest.raises(OSError, match="item 3 unreadable"):
        for item in read_ahead(source(fail_at=3)):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_read_ahead_stopped_early_stops_its_producer_and_closes_the_source() -> None:
    produced, closed = [], threading.Event()

    def source():
        try:
            for index in range(1000):
                produced.append(index)
                yield index
        finally:
            closed.set()

    ahead = read_ahead(source(), depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()
    assert closed.is_set() and len(produced) <= 3 + 2 + 1  # taken, the hand-off's depth, one being offered
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]
