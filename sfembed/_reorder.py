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
is, a batch of its own (:meth:`ReorderBuffer.take_each`): not copied into the ring and out of it
again. Other rows are scattered into the ring with one numpy assignment per request. Units made
of several parts (an over-long record's chunks) are pooled in a side table until their last part
arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from ._chunker import pool
from ._exceptions import SFEmbedError
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
        self._runs = _Runs()
        self._meta = _Details(self._size) if with_chunks else None
        self._pending: dict[int, _Pending] = {}
        self._failed: dict[int, tuple[str, SFEmbedError | None]] = {}  # reason, error
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
        if self._meta is not None and self.created - self.emitted > self._meta.size:
            self._meta.grow(self.emitted, first, self.created, self.capacity)
        return first

    def _grow(self, span: int) -> None:
        """Resize the row arrays to hold ``span`` rows from the oldest unfinished one, moving
        the rows placed (all within the present window) to their slots in the larger ring."""
        size = _larger(self._size, span, self.capacity)
        units = np.arange(self.emitted, min(self.created, self.emitted + self._size))
        old, new = units % self._size, units % size
        rows = np.empty((size, self.dims), dtype=np.float32)
        rows[new] = self._rows[old]
        done = np.zeros(size, dtype=bool)
        done[new] = self._done[old]
        self._rows, self._done, self._size = rows, done, size

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
            self._meta.rows[units % self._meta.size] = meta

    def put(self, chunks: Sequence[Chunk], rows: FloatArray) -> None:
        """Place the vectors of one answered request. ``rows`` is handed over: the ring may
        keep the array itself and release it as it is, so the caller must not change it."""
        count = len(chunks)
        if not count:
            return
        first = chunks[0].unit
        # The usual answer: units in a run from the oldest unfinished one on, nothing pending
        # or failed. The array is kept whole, not copied in (and out again at ``take``).
        usual = not (self._pending or self._failed) and first >= self.emitted
        if usual and _is_run(chunks, rows, self.dims):
            if first + count - self.emitted > self._size:
                self._grow(first + count - self.emitted)
            self._runs.by_first[first] = rows
            for part in _spans(first, first + count, self._size):
                self._done[part] = True
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

    def fail(self, chunk: Chunk, reason: str, error: SFEmbedError | None = None) -> None:
        """Mark the unit of ``chunk`` failed: its row stays NaN and ``reason`` is reported, with
        ``error`` (see ``Failure``)."""
        if chunk.unit < self.emitted or chunk.unit in self._failed:
            return  # another part failed it already; its slot may be a later unit's by now
        self._failed[chunk.unit] = (reason, error)
        self._pending.pop(chunk.unit, None)
        self._finish(chunk.unit, None)

    def take(self) -> tuple[EmbeddedBatch | None, list[Failure]]:
        """The contiguous finished rows from the oldest unfinished unit as one batch, and their
        failures (see :meth:`take_each`, which copies no run kept whole)."""
        taken = self.take_each()
        if len(taken) <= 1:
            return taken[0] if taken else (None, [])
        return _joined(taken)

    def take_each(self) -> list[_Taken]:
        """The contiguous finished rows from the oldest unfinished unit, in order, and the
        failures of each batch: a run kept whole leaves as the array that was put, other rows
        are copied out of the arrays (whose slots are written again), so no row is copied twice."""
        start, end = self.emitted, self._contiguous_end()
        if end == start:
            return []
        taken = []
        for first, last, rows in self._parts(start, end):
            batch = self._batch(first, last, rows)
            taken.append((batch, _failures(self._failed, first, last, batch)))
        for part in _spans(start, end, self._size):
            self._done[part] = False  # the rows stay: a slot is written before it is done again
        self.emitted = end
        return taken

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
        # A row of a run kept whole, settled again (as a later settling always overwrote it):
        # the run moves into the arrays first.
        held = self._runs.holding(unit) if self._runs else None
        if held is not None:
            self._rows[_slots(held[0], held[0] + len(held[1]), self._size)] = held[1]
        slot = unit % self._size
        self._rows[slot] = np.nan if row is None else row
        self._done[slot] = True

    def _contiguous_end(self) -> int:
        # Only the window of the arrays can be done: a unit beyond it has no row yet.
        end = min(self.created, self.emitted + self._size)
        at = self.emitted
        for part in _spans(at, end, self._size):
            done = self._done[part]  # a view: no copy, and no index array for a wrap
            first = int(done.argmin())  # the first unfinished unit, if any is
            if not done[first]:
                return at + first
            at += len(done)
        return end

    def _batch(self, first: int, last: int, rows: FloatArray) -> EmbeddedBatch:
        if self._meta is None:
            return EmbeddedBatch(np.arange(first, last), rows)
        meta = self._meta.rows[_slots(first, last, self._meta.size)]
        return EmbeddedBatch(meta[:, 0].copy(), rows, meta[:, 1].copy(), meta[:, 2:].copy())

    def _parts(self, start: int, end: int) -> list[tuple[int, int, FloatArray]]:
        """(first unit, end unit, rows) of the runs kept whole from ``start`` to ``end`` (all
        done), and of the rows between them, copied out of the arrays."""
        parts = []
        at = start
        # A run lies wholly before ``end`` or after it: its rows were all done at once.
        for first, run in self._runs.before(end) if self._runs else ():
            if first > at:
                parts.append((at, first, self._copied(at, first)))
            parts.append((first, first + len(run), run))
            at = first + len(run)
        if at < end:
            parts.append((at, end, self._copied(at, end)))
        return parts

    def _copied(self, start: int, end: int) -> FloatArray:
        slots = _slots(start, end, self._size)
        # One copy (a slice is a view; an array of slots copies already).
        return self._rows[slots].copy() if isinstance(slots, slice) else self._rows[slots]


_Taken = tuple[EmbeddedBatch, list[Failure]]


def _joined(taken: list[_Taken]) -> _Taken:
    """Consecutive batches and their failures as one batch (one copy of their rows)."""
    batches = [batch for batch, _ in taken]
    numbers = [batch.chunk_numbers for batch in batches if batch.chunk_numbers is not None]
    spans = [batch.spans for batch in batches if batch.spans is not None]
    joined = EmbeddedBatch(
        np.concatenate([batch.positions for batch in batches]),
        np.concatenate([batch.embeddings for batch in batches]),
        np.concatenate(numbers) if numbers else None,  # chunks mode: every batch has them
        np.concatenate(spans) if spans else None,
    )
    return joined, [failure for _, failures in taken for failure in failures]


def _is_run(chunks: Sequence[Chunk], rows: FloatArray, dims: int) -> bool:
    """Whether ``chunks`` are units in a run, one float32 row of ``dims`` each in ``rows``."""
    first = chunks[0].unit
    return (
        rows.shape == (len(chunks), dims)
        and rows.dtype == np.float32
        and list(map(_UNIT, chunks)) == list(range(first, first + len(chunks)))
    )


class _Runs:
    """Answers' rows kept as they were put, by their first unit, instead of in the ring."""

    __slots__ = ("by_first",)

    def __init__(self) -> None:
        self.by_first: dict[int, FloatArray] = {}

    def __bool__(self) -> bool:
        return bool(self.by_first)

    def before(self, end: int) -> list[tuple[int, FloatArray]]:
        """(first unit, rows) of the runs that start before ``end``, in order, taken out."""
        firsts = [first for first in sorted(self.by_first) if first < end]
        return [(first, self.by_first.pop(first)) for first in firsts]

    def holding(self, unit: int) -> tuple[int, FloatArray] | None:
        """(first unit, rows) of the run that holds ``unit``, if any, taken out."""
        for first, run in self.by_first.items():
            if first <= unit < first + len(run):
                del self.by_first[first]
                return first, run
        return None


def _slots(start: int, end: int, size: int) -> slice | IntArray:
    """The slots of units ``start`` to ``end`` in arrays of ``size`` rows: a slice unless they
    wrap around the end."""
    first = start % size
    if first + end - start <= size:
        return slice(first, first + end - start)
    return np.arange(start, end) % size


def _spans(start: int, end: int, size: int) -> tuple[slice, ...]:
    """The slots of units ``start`` to ``end`` in arrays of ``size`` rows as slices: one, two
    when they wrap around the end, none when ``end`` is ``start``."""
    if end <= start:
        return ()
    first = start % size
    if first + end - start <= size:
        return (slice(first, first + end - start),)
    return slice(first, size), slice(0, end - start - (size - first))


def _larger(size: int, span: int, capacity: int) -> int:
    """``size`` doubled until it holds ``span`` rows, at most ``capacity``."""
    while size < span:
        size *= 2
    return min(size, capacity)


class _Details:
    """Each unit's (position, chunk number, start, end), in ``chunks`` mode. They are written
    when rows are reserved, so they are sized by the rows reserved (32 bytes a row): a unit's
    slot is unit % size."""

    __slots__ = ("rows", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows = np.zeros((size, 4), dtype=np.int64)

    def grow(self, emitted: int, reserved_before: int, created: int, capacity: int) -> None:
        """Resize to hold every unit from ``emitted`` to ``created``, moving those reserved
        before this reservation (units up to ``reserved_before``)."""
        size = _larger(self.size, created - emitted, capacity)
        units = np.arange(emitted, reserved_before)
        rows = np.zeros((size, 4), dtype=np.int64)
        rows[units % size] = self.rows[units % self.size]
        self.rows, self.size = rows, size


def _failures(
    failed: dict[int, tuple[str, SFEmbedError | None]], start: int, end: int, batch: EmbeddedBatch
) -> list[Failure]:
    """The failures of units ``start`` to ``end`` (``batch``'s), taken out of ``failed``."""
    failures = []
    for unit in sorted(unit for unit in failed if start <= unit < end):
        offset = unit - start
        number = None if batch.chunk_numbers is None else int(batch.chunk_numbers[offset])
        reason, error = failed.pop(unit)
        failures.append(Failure(int(batch.positions[offset]), reason, number, error))
    return failures
