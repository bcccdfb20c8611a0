"""A job's file work, done in order on one thread of its own.

Appending rows to the output and syncing it at a checkpoint block the thread that does them: an
``fsync`` takes milliseconds to tens of milliseconds, a direct write of a 1 MiB stage about one.
On the event loop nothing is sent or read meanwhile, and on a large quota the client is then
the bottleneck. Here each piece of work goes to a single worker thread, which does the pieces in
the order given; the loop goes on at once, and waits only when ``depth`` pieces are waiting or
running (so memory holds at most that many batches, whatever the disk's speed).

The first piece that fails ends the work: every later one is skipped, since nothing after a
torn write may be made durable or vouched for, and its error is raised by the next
:meth:`DiskThread.put`, :meth:`DiskThread.room` or :meth:`DiskThread.check`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["DiskThread"]


class DiskThread:
    """One worker thread doing file work in order, at most ``depth`` pieces at a time.

    A context manager: leaving it waits for every piece handed over and joins the thread (it
    does not raise their error: :meth:`check` does).
    """

    def __init__(self, *, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self.depth = depth
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfembed-disk")
        self._pending: deque[Future[None]] = deque()
        # Set by the worker thread only, before the future of the failed piece is done.
        self._error: BaseException | None = None

    @property
    def failed(self) -> bool:
        """True once a piece has failed (its error is, or will be, raised by :meth:`check`)."""
        return self._error is not None

    def put(self, work: Callable[[], None]) -> None:
        """Hand ``work`` over to be done after everything handed before. Raises the error of
        earlier work, if any failed (``work`` is then not taken)."""
        self.check()
        self._pending.append(self._executor.submit(self._do, work))

    async def room(self) -> None:
        """Return once at most ``depth`` pieces are waiting or running. Raises the error of
        earlier work. A cancelled wait leaves the work to go on (see :meth:`close`)."""
        self.check()  # also when there is room: a failed piece ends the job at once
        while len(self._pending) > self.depth:
            await _done(self._pending[0])
            self.check()

    async def drained(self) -> None:
        """Return once every piece handed over is done. Raises as :meth:`room`."""
        while self._pending:
            await _done(self._pending[-1])
            self.check()

    def check(self) -> None:
        """Forget the pieces done; raise the error of the first that failed, if one did."""
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait (blocking) for every piece handed over, then join the thread; idempotent."""
        self._executor.shutdown(wait=True)
        self._pending.clear()

    def __enter__(self) -> DiskThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _do(self, work: Callable[[], None]) -> None:
        # On the worker thread.
        if self._error is not None:
            return  # an earlier piece failed: skipped
        try:
            work()
        except BaseException as error:
            self._error = error
            raise


async def _done(future: Future[None]) -> None:
    """Wait for ``future`` without tying it to the waiting task: cancelling the wait must not
    cancel work that is queued (``asyncio.wrap_future`` would), which would lose a write."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: Future[None]) -> None:
        loop.call_soon_threadsafe(_settle, waiter)

    future.add_done_callback(wake)
    await waiter


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # a cancelled wait is done already
        waiter.set_result(None)
