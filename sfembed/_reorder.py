"""Chunk vectors -> output rows in input order, through a bounded ring buffer.

Requests finish in any order; rows leave only as contiguous runs from the oldest unfinished one.
The ring holds at most ``capacity`` rows, and intake waits for room, so when one request is slow
the job runs at most ``capacity`` rows ahead of it and memory stays flat. Its arrays are sized by
the rows answered ahead of the oldest unfinished one, not by the rows reserved nor by
``capacity``: they start small and double when an answer lands beyond them (a job of a hundred
records with a high concurrency allocates a hundred rows, not the gigabytes its capacity would
take). Intake reserves rows well before their requests are sent (records read, counted and
queued for packing), so the rows answered span less than those reserved: at the default
concurrency, about 1,024 against 3,000, 4 MiB of rows instead of 16. An answer whose rows are a
run of units (as nearly every answer's are) is kept as the array it came in, and leaves as it
is or joined to its neighbours by one copy: not copied into the ring and out of it again. Other
rows are scattered into the ring with one numpy assignment per request. Units made of several
parts (an over-long record's chunks) are pooled in a side table until their last part arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from ._chunker import pool
from ._types import Chunk, EmbeddedBatch, Failure, FloatArray, IntArray, MetaArray

__all__ = ["ReorderBuffer"]

_FIRST_SIZE = 256  # rows the ring's arrays start with: 1 MiB at 1,024 dimensions
_UNIT = attrgetter("unit")


@dataclass(slots=True)
class _Pending:
    """A unit waiting for more parts: the running weighted sum and its weights."""

    parts: int
    vectors: list[FloatArray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)


class ReorderBuffer:
    """A ring of at most ``capacity`` rows of ``dims`` floats, released in unit order."""

    def __init__(self, *, dims: int, capacity: int, with_chunks: bool = False) -> None:
        self.capacity = capacity
        self.dims = dims
        # Rows the arrays hold now; a unit's slot is unit % size. Every unit placed (done) lies in
        # [emitted, emitted + size): each slot of that window is one unit's.
        self._size = min(capacity, _FIRST_SIZE)
        # A row is written before it is marked done, so the arrays need no fill (a page of
        # them is taken from the system only when a row lands on it).
        self._rows = np.empty((self._size, dims), dtype=np.float32)
        self._done = np.zeros(self._size, dtype=bool)
        # Runs of rows kept as they were put, by their first unit, instead of in the arrays.
        self._runs: dict[int, FloatArray] = {}
        # Chunk details are written when rows are reserved, so they are sized by the rows
        # reserved (32 bytes a row): slot = unit % meta size.
        self._meta_size = self._size
        self._meta = np.zeros((self._size, 4), dtype=np.int64) if with_chunks else None
        self._pending: dict[int, _Pending] = {}
        self._failed: dict[int, str] = {}
        self.emitted = 0  # units before this have left the ring
        self.created = 0  # units before this have been handed out
        self._room = asyncio.Condition()

    def has_room(self, units: int) -> bool:
        """True when ``units`` more fit in the ring now."""
        return self.created + units - self.emitted <= self.capacity

    async def reserve(self, units: int) -> int:
        """Wait until ``units`` more fit in the ring; returns the first of them. Raises ValueError
        when they can never fit."""
        if units > self.capacity:
            raise ValueError(f"{units} units exceed the reorder capacity of {self.capacity}")
        if not self.has_room(units):  # the usual case has room: no lock, no wait per record
            async with self._room:
                await self._room.wait_for(lambda: self.has_room(units))
        first, self.created = self.created, self.created + units
        if self._meta is not None and self.created - self.emitted > self._meta_size:
            self._grow_meta(first)
        return first

    def _larger(self, size: int, span: int) -> int:
        """``size`` doubled until it holds ``span`` rows, at most ``capacity``."""
        while size < span:
            size *= 2
        return min(size, self.capacity)

    def _grow(self, span: int) -> None:
        """Resize the row arrays to hold ``span`` rows from the oldest unfinished one, moving
        the rows placed (all within the present window) to their slots in the larger ring."""
        size = self._larger(self._size, span)
        units = np.arange(self.emitted, min(self.created, self.emitted + self._size))
        old, new = units % self._size, units % size
        rows = np.empty((size, self.dims), dtype=np.float32)
        rows[new] = self._rows[old]
        done = np.zeros(size, dtype=bool)
        done[new] = self._done[old]
        self._rows, self._done, self._size = rows, done, size

    def _grow_meta(self, reserved_before: int) -> None:
        """Resize the chunk details to hold every row reserved, moving those of the rows
        reserved before this reservation (units up to ``reserved_before``)."""
        assert self._meta is not None
        size = self._larger(self._meta_size, self.created - self.emitted)
        units = np.arange(self.emitted, reserved_before)
        meta = np.zeros((size, 4), dtype=np.int64)
        meta[units % size] = self._meta[units % self._meta_size]
        self._meta, self._meta_size = meta, size

    def expect_parts(self, unit: int, parts: int) -> None:
        """Unit ``unit`` is made of ``parts`` more parts than the one it was planned with."""
        if unit < self.emitted or unit in self._failed:
            return  # its row is settled: a stale entry would only slow every later put
        entry = self._pending.get(unit)
        if entry is None:
            self._pending[unit] = _Pending(parts=parts + 1)
        else:
            entry.parts += parts

    def describe(self, units: IntArray, meta: MetaArray) -> None:
        """Record (position, chunk number, start, end) for each unit, in ``chunks`` mode."""
        if self._meta is not None:
            self._meta[units % self._meta_size] = meta

    def put(self, chunks: Sequence[Chunk], rows: FloatArray) -> None:
        """Place the vectors of one answered request. ``rows`` is handed over: the ring may
        keep the array itself and release it as it is, so the caller must not change it."""
        count = len(chunks)
        if not count:
            return
        first = chunks[0].unit
        # The usual answer: units in a run from the oldest unfinished one on, nothing pending
        # or failed. The array is kept whole, not copied in (and out again at ``take``).
        if (
            not self._pending
            and not self._failed
            and first >= self.emitted
            and rows.shape == (count, self.dims)
            and rows.dtype == np.float32
            and list(map(_UNIT, chunks)) == list(range(first, first + count))
        ):
            if first + count - self.emitted > self._size:
                self._grow(first + count - self.emitted)
            self._runs[first] = rows
            self._done[self._slots(first, first + count, self._size)] = True
            return
        units = np.fromiter(map(_UNIT, chunks), dtype=np.int64, count=count)
        # A late part of a unit that failed and left already must not land in its old slot,
        # which a later unit takes over: such parts go the slow way, which drops them.
        if self._pending or self._failed or units.min() < self.emitted:
            self._put_mixed(chunks, units, rows)
            return
        span = int(units.max()) + 1 - self.emitted
        if span > self._size:
            self._grow(span)
        slots = units % self._size
        self._rows[slots] = rows
        self._done[slots] = True

    def _put_mixed(self, chunks: Sequence[Chunk], units: IntArray, rows: FloatArray) -> None:
        # Parts of a unit that failed, or left already, are dropped: their slot is not theirs.
        for index, unit in enumerate(units.tolist()):
            if unit < self.emitted or unit in self._failed:
                continue
            if unit in self._pending:
                self._add_part(chunks[index], rows[index])
            else:
                self._finish(unit, rows[index])

    def fail(self, chunk: Chunk, reason: str) -> None:
        """Mark the unit of ``chunk`` failed: its row stays NaN and ``reason`` is reported."""
        if chunk.unit < self.emitted or chunk.unit in self._failed:
            return  # another part failed it already; its slot may be a later unit's by now
        self._failed[chunk.unit] = reason
        self._pending.pop(chunk.unit, None)
        self._finish(chunk.unit, None)

    def take(self) -> tuple[EmbeddedBatch | None, list[Failure]]:
        """The contiguous finished rows from the oldest unfinished unit, and their failures."""
        start, end = self.emitted, self._contiguous_end()
        if end == start:
            return None, []
        slots = self._slots(start, end, self._size)
        batch = self._batch(np.arange(start, end), slots)
        self._done[slots] = False  # the rows stay: a slot is written before it is done again
        self.emitted = end
        return batch, self._failures(start, end, batch)

    def _slots(self, start: int, end: int, size: int) -> slice | IntArray:
        """The slots of units ``start`` to ``end`` in arrays of ``size`` rows: a slice unless
        they wrap around the end."""
        first = start % size
        if first + end - start <= size:
            return slice(first, first + end - start)
        return np.arange(start, end) % size

    async def notify_room(self) -> None:
        """Wake an intake waiting in ``reserve`` (call after ``take``)."""
        async with self._room:
            self._room.notify_all()

    def _add_part(self, chunk: Chunk, row: FloatArray) -> None:
        entry = self._pending[chunk.unit]
        entry.vectors.append(row)
        entry.weights.append(float(max(chunk.weight or chunk.tokens, 1)))
        entry.starts.append(chunk.start)
        if len(entry.vectors) == entry.parts:
            del self._pending[chunk.unit]
            # Pooled in text order, not arrival order: a float sum's last bits depend on its
            # order, and a record's vector must be the same in every run.
            order = np.argsort(entry.starts, kind="stable")
            vectors = np.stack(entry.vectors)[order]
            self._finish(chunk.unit, pool(vectors, [entry.weights[i] for i in order]))

    def _finish(self, unit: int, row: FloatArray | None) -> None:
        """Unit ``unit`` is done: its row is ``row``, or NaN (failed)."""
        if unit - self.emitted >= self._size:
            self._grow(unit + 1 - self.emitted)
        if self._runs:
            self._unkeep(unit)
        slot = unit % self._size
        self._rows[slot] = np.nan if row is None else row
        self._done[slot] = True

    def _unkeep(self, unit: int) -> None:
        """Move the run kept whole that holds ``unit``, if any, into the arrays, where its row
        can be settled again (as a later settling of a row always overwrote it)."""
        for first, run in self._runs.items():
            if first <= unit < first + len(run):
                del self._runs[first]
                self._rows[self._slots(first, first + len(run), self._size)] = run
                return

    def _contiguous_end(self) -> int:
        # Only the window of the arrays can be done: a unit beyond it has no row yet.
        end = min(self.created, self.emitted + self._size)
        if end == self.emitted:
            return self.emitted
        done = self._done[self._slots(self.emitted, end, self._size)]
        first = int(done.argmin())  # the first unfinished unit, if any is
        return end if done[first] else self.emitted + first

    def _batch(self, units: IntArray, slots: slice | IntArray) -> EmbeddedBatch:
        rows = self._taken(int(units[0]), int(units[-1]) + 1, slots)
        if self._meta is None:
            return EmbeddedBatch(units, rows)
        meta = self._meta[self._slots(int(units[0]), int(units[-1]) + 1, self._meta_size)]
        return EmbeddedBatch(meta[:, 0].copy(), rows, meta[:, 1].copy(), meta[:, 2:].copy())

    def _taken(self, start: int, end: int, slots: slice | IntArray) -> FloatArray:
        """The rows of units ``start`` to ``end``, all done: one copy of them at most (a slice
        is a view, and the ring's slots are written again), none for a single run kept whole."""
        if not self._runs:
            return self._rows[slots].copy() if isinstance(slots, slice) else self._rows[slots]
        parts: list[FloatArray] = []
        kept = 0  # parts that are runs kept whole
        at = start
        # A run lies wholly before ``end`` or after it: its rows were all done at once.
        for first in sorted(self._runs):
            if first >= end:
                break
            if first > at:
                parts.append(self._rows[self._slots(at, first, self._size)])
            run = self._runs.pop(first)
            parts.append(run)
            kept += 1
            at = first + len(run)
        if at < end:
            parts.append(self._rows[self._slots(at, end, self._size)])
        if kept == len(parts) == 1:
            return parts[0]
        return np.concatenate(parts)

    def _failures(self, start: int, end: int, batch: EmbeddedBatch) -> list[Failure]:
        found = [unit for unit in self._failed if start <= unit < end]
        failures = []
        for unit in sorted(found):
            reason = self._failed.pop(unit)
            offset = unit - start
            number = None if batch.chunk_numbers is None else int(batch.chunk_numbers[offset])
            failures.append(Failure(int(batch.positions[offset]), reason, number))
        return failures
