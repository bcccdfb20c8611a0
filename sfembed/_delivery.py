"""The last stage: rows settled in the reorder ring leave as ordered batches, to the caller.

Intake and the dispatch workers each hold a :class:`RowWriter`: they reserve rows in the ring,
say how many parts a row is made of, and settle rows there (vectors or failures). Settling never
waits (the ring's room was reserved before the row's request was made) and wakes
:meth:`Delivery.run`, the one task that takes contiguous runs from the ring and sends them on.
Writers close like the send sides of a stream: once all are closed, delivery hands over the last
run that has every row before it and closes its own output, which ends the caller's stream. A
stopped job thus ends after its last contiguous row, a shorter output and never a gap.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
from types import TracebackType
from typing import Self

from ._exceptions import SFEmbedError
from ._reorder import ReorderBuffer
from ._streams import SendStream
from ._types import Chunk, EmbeddedBatch, FloatArray, IntArray, JobStats, MetaArray

__all__ = ["Delivery", "RowWriter"]

log = logging.getLogger("sfembed")


class RowWriter:
    """One producer's handle on the ring; :meth:`close` it when the producer is done."""

    __slots__ = ("_closed", "_delivery", "_ring")

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._ring = delivery.ring
        self._closed = False

    @property
    def dims(self) -> int:
        """Floats per row."""
        return self._ring.dims

    def has_room(self, units: int) -> bool:
        """True when ``units`` more rows fit in the ring now."""
        return self._ring.has_room(units)

    async def reserve(self, units: int) -> int:
        """Wait for room for ``units`` rows; returns the first of them (see ReorderBuffer)."""
        return await self._ring.reserve(units)

    def expect_parts(self, unit: int, parts: int) -> None:
        """Row ``unit`` is made of ``parts`` more parts than planned (pooled when all arrived)."""
        self._ring.expect_parts(unit, parts)

    def describe(self, units: IntArray, meta: MetaArray) -> None:
        """(position, chunk number, start, end) of each of ``units``, in ``chunks`` mode."""
        self._ring.describe(units, meta)

    def put(self, chunks: list[Chunk], rows: FloatArray) -> None:
        """Settle ``chunks`` with their vectors. ``rows`` is handed over: it may leave the ring
        as the very array given, so the caller must not change it afterwards."""
        self._ring.put(chunks, rows)
        self._delivery.changed.set()

    def fail(self, chunk: Chunk, reason: str, error: SFEmbedError | None = None) -> None:
        """Settle ``chunk``'s row as failed: NaN, and ``reason`` reported with it, and ``error``,
        the error that failed it (see ``Failure``): None for an input refused before any
        request was made of it (an empty text), whatever error is being handled at the call."""
        # The caller names the record (a job logs its id and line); a position alone is only
        # for debugging, and restarts at 0 in a resumed job.
        log.debug("input %d failed: %s", chunk.position, reason)
        self._ring.fail(chunk, reason, _detached(error) if error is not None else None)
        self._delivery.changed.set()

    def close(self) -> None:
        """This producer settles nothing more (idempotent)."""
        if not self._closed:
            self._closed = True
            self._delivery.writers -= 1
            self._delivery.changed.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Delivery:
    """Takes finished contiguous runs from ``ring`` and sends them to ``batches`` in order."""

    def __init__(
        self, ring: ReorderBuffer, stats: JobStats, batches: SendStream[EmbeddedBatch]
    ) -> None:
        self.ring = ring
        self.stats = stats
        self.batches = batches
        self.writers = 0  # writers still open
        self.changed = asyncio.Event()  # a row was settled, or a writer closed

    def writer(self) -> RowWriter:
        """A new writer; delivery ends only once every writer is closed."""
        self.writers += 1
        return RowWriter(self)

    async def run(self) -> None:
        """Send runs as they finish, until every writer is closed and the last run is sent; the
        output is closed however this ends."""
        with self.batches:
            while self.writers or self.changed.is_set():
                await self.changed.wait()
                self.changed.clear()
                await self._release()

    async def _release(self) -> None:
        taken = self.ring.take_each()
        if not taken:
            return
        for batch, failures in taken:
            self.stats.rows += len(batch)
            if failures:  # the usual batch has none, and its default, (), says so
                self.stats.failures.extend(failures)
                batch = dataclasses.replace(batch, failures=tuple(failures))
            await self.batches.send(batch)
        await self.ring.notify_room()


def _detached(error: SFEmbedError) -> SFEmbedError:
    """A copy of ``error`` without its traceback, cause or context: kept with a failure until
    the job ends, it must hold none of the job's frames (nor the texts they reference). Its
    class, message and attributes are the error's (it is rebuilt as pickling rebuilds it)."""
    return copy.copy(error)
