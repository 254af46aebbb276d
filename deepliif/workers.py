"""How many CPU threads a stage may use, and running its independent parts on them.

The kernel's share of the machine is what its cgroup's CPU quota and its affinity mask allow, not the
host's core count: a WMLA kernel given 4 CPUs of a 64-core node that started 64 threads would thrash.
NumPy, SciPy and imagecodecs release the GIL in their heavy loops, so threads (no pickling, shared
arrays) are enough for the CPU stages around the network.
"""
from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .errors import ArgumentError

Item = TypeVar("Item")
Result = TypeVar("Result")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (`cpu.max`) when set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here: the affinity mask is the limit
    return max(1, cpus)


def resolve_threads(threads: int | None) -> int:
    """`threads` if given (checked), else every CPU the process may use."""
    if threads is None:
        return available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ArgumentError(f"threads must be a positive integer; got {threads!r}")
    return threads


def opencv(threads: int | None = None):
    """cv2, imported on first use; with `threads`, its process-wide thread pool sized to them (every entry
    point resolves the same count, so in a kernel it is set once). OpenCV releases the GIL, and a parallel
    loop it is asked for while its pool is busy runs in the calling thread, so band threads may call it."""
    import cv2
    if threads is not None and cv2.getNumThreads() != threads:
        cv2.setNumThreads(threads)
    return cv2


def parallel_map(function: Callable[[Item], Result], items: Iterable[Item], threads: int) -> list[Result]:
    """`[function(item) for item in items]`, on up to `threads` threads; the first error is re-raised
    after every started part has finished (no part is left running on shared buffers)."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="cpu-stage") as pool:
        futures = [pool.submit(function, item) for item in items]
    return [future.result() for future in futures]


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], threads: int) -> Iterator[Result]:
    """`function(item)` for each item, yielded in order, with at most `threads` parts running or waiting to
    be taken, so a stream of large items (slide bands) stays bounded. With several threads the items are
    produced on a thread of their own (`read_ahead`), so reading the next band overlaps the caller's work
    on the last. An error is raised in order; parts not yet started are cancelled and started ones finish.
    A consumer that may fail between items closes it (`contextlib.closing`), so its threads end with it."""
    if threads <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cpu-stage") as pool:
        pending: deque = deque()
        ahead = read_ahead(items)
        try:
            for item in ahead:
                pending.append(pool.submit(function, item))
                if len(pending) >= threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            ahead.close()
            for future in pending:
                future.cancel()


_END = object()


def hand_to(consumer: threading.Thread, hand_off: queue.Queue, item: object, poll: float = 0.2) -> bool:
    """Puts `item` for a consumer thread, waiting for room while it lives; False once it has ended (it
    failed or finished), so a producer never blocks forever on a queue nobody reads."""
    while consumer.is_alive():
        try:
            hand_off.put(item, timeout=poll)
            return True
        except queue.Full:
            continue
    return False


def read_ahead(items: Iterable[Item], depth: int = 1) -> Iterator[Item]:
    """`items` as they are, produced on a thread of their own at most `depth` ahead of the consumer.
    The source's error is raised where the consumer would have met it; a consumer that stops early (or
    fails) stops the producer and waits for it, and the source is closed on the producer's thread."""
    hand_off: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                hand_off.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not offer((item, None)):
                    return
            offer((_END, None))
        except BaseException as exc:  # handed to the consumer
            offer((_END, exc))
        finally:
            getattr(source, "close", lambda: None)()

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item, error = hand_off.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        while producer.is_alive():
            with contextlib.suppress(queue.Empty):
                hand_off.get(timeout=0.1)
        producer.join()


def row_bands(height: int, parts: int) -> Sequence[tuple[int, int]]:
    """`parts` consecutive (top, bottom) row ranges covering `height` rows, as equal as can be."""
    parts = max(1, min(parts, height))
    edges = [round(height * k / parts) for k in range(parts + 1)]
    return [(edges[k], edges[k + 1]) for k in range(parts) if edges[k + 1] > edges[k]]


def for_row_bands(function: Callable[[slice], None], height: int, threads: int) -> None:
    """`function(rows)` for consecutive row slices covering `height` rows, one band per thread: for
    whole-image steps whose rows are independent (per-pixel rules, lookups)."""
    parallel_map(lambda band: function(slice(*band)), row_bands(height, threads), threads)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit
_ARENAS = 2


def keep_freed_memory() -> bool:
    """Ask glibc to serve blocks up to 32 MiB from its heap and keep freed memory for reuse, in at most
    two heaps (arenas).

    Whole-image steps allocate and free many 16–48 MB temporaries per image; by default glibc maps each
    afresh and unmaps it on free, so every call faults its pages in again (measured: 30–45k page faults
    and 0.2–1.2 s of system time per 4096² postprocess on this VM, against 9k and 0.1–0.2 s with this).
    What is kept is kept per arena, and glibc gives threads up to eight arenas per CPU: a slide's band
    threads, read-ahead and writers then each held their own high-water mark (a 16k slide peaked at
    1.85 GiB against 1.26 GiB with two arenas, at the same speed). Called once by each entry point at its
    start (the CLI, the EDI kernel), never by library code; False where the C library is not glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) \
        and bool(mallopt(_M_ARENA_MAX, _ARENAS))
