"""The disk thread: a job's file work in order on one thread, bounded, failures kept."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable

import pytest

from sfembed._diskthread import DiskThread


def recorder(
    done: list[int], number: int, gate: threading.Event | None = None
) -> Callable[[], None]:
    """Work that waits for ``gate`` (if any), then records ``number`` and its thread."""

    def work() -> None:
        if gate is not None:
            assert gate.wait(30), "the test never opened the gate"
        done.append(number)

    return work


async def yields(count: int = 20) -> None:
    """Let the loop run other tasks a few turns (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_work_is_done_in_order_on_one_other_thread() -> None:
    threads: set[int] = set()
    done: list[int] = []

    def work(number: int) -> Callable[[], None]:
        def run() -> None:
            threads.add(threading.get_ident())
            done.append(number)

        return run

    with DiskThread(depth=2) as disk:
        for number in range(50):
            disk.put(work(number))
            await disk.room()
        await disk.drained()
        assert done == list(range(50))
    assert len(threads) == 1
    assert threading.get_ident() not in threads
    assert not [t for t in threading.enumerate() if t.name.startswith("sfembed-disk")]


async def test_the_caller_waits_while_more_than_depth_pieces_are_pending() -> None:
    gate = threading.Event()
    done: list[int] = []
    with DiskThread(depth=3) as disk:
        for number in range(3):
            disk.put(recorder(done, number, gate))
        await disk.room()  # three pending: room at once
        disk.put(recorder(done, 3, gate))
        waiting = asyncio.create_task(disk.room())
        await yields()
        assert not waiting.done()  # four pending, the first held by the gate
        gate.set()
        await waiting
        await disk.drained()
    assert done == [0, 1, 2, 3]


async def test_a_failure_skips_later_work_and_is_raised_by_the_next_call() -> None:
    done: list[int] = []
    gate = threading.Event()
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out.npy")

    def fails() -> None:
        assert gate.wait(30)
        raise full

    disk = DiskThread(depth=8)
    try:
        disk.put(recorder(done, 0))
        disk.put(fails)
        disk.put(recorder(done, 2))  # after the failure: never done
        gate.set()
        with pytest.raises(OSError, match="No space") as raised:
            await disk.drained()
        assert raised.value is full
        assert raised.value.filename == "/data/out.npy"
        assert disk.failed
        with pytest.raises(OSError, match="No space"):
            disk.put(recorder(done, 3))  # refused: not taken
        with pytest.raises(OSError, match="No space"):
            disk.check()
    finally:
        disk.close()
    assert done == [0]


async def test_a_cancelled_wait_leaves_the_work_handed_over_to_be_done() -> None:
    gate = threading.Event()
    done: list[int] = []
    disk = DiskThread(depth=1)
    try:
        for number in range(4):
            disk.put(recorder(done, number, gate))
        waiting = asyncio.create_task(disk.room())
        await yields()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
    finally:
        disk.close()  # waits for every piece, then joins
    assert done == [0, 1, 2, 3]
    assert not disk.failed
    disk.check()


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        DiskThread(depth=0)
