"""The embedding cache's files: vectors appended to a file of their own, and an SQLite index of
where each one is.

``<cache>`` is an SQLite database (WAL mode, ``synchronous=NORMAL``) and ``<cache>-vectors``
beside it holds the vectors as little-endian float32 rows, appended and never rewritten. Tables::

    meta(name TEXT PRIMARY KEY, value TEXT)               -- format name and schema version
    scopes(id INTEGER PRIMARY KEY, model TEXT, dims INTEGER, UNIQUE (model, dims))
    entries(scope INTEGER, key BLOB, offset INTEGER, checksum INTEGER,
            PRIMARY KEY (scope, key)) WITHOUT ROWID

``offset`` is where the row starts in the vectors file and ``checksum`` the sum of its 64-bit
words (see :func:`checksums`). A row is only served when it is whole and its checksum agrees: a
torn tail after a crash, a vectors file cut short or replaced, is a miss, never a vector.

Why the vectors left SQLite: a store of 4 KiB rows into SQLite cost about 15 s of CPU per million
rows, most of it copying each row into B-tree pages and again into the WAL. Rows are now copied
once, into a block of ``write_rows`` (512) that starts on a 4 KiB boundary, and each block is
written with one ``write``, their checksums made by one numpy sum. A block whose size is a multiple
of 4 KiB (every full one, at an even number of dims) is written with ``O_DIRECT``: the device takes
it from our memory, where a write through the page cache costs the CPU a copy and 1-7 us of system
time per 4 KiB row on a loaded machine (and fills the page cache with rows read back only by a later
job). A partial block, or a file system that refuses direct writes, goes through the page cache as
before. The index is written in transactions of ``index_rows`` (32,768) keys, sorted: a key is
random, so each transaction touches pages all over the index, and few large ones touch each page
once rather than many times (at a million entries: 16 us per row in transactions of 2,048, 5 us in
those of 65,536). The transactions run on a thread and a connection of their own (:class:`Indexer`):
the next blocks are written and lookups answered meanwhile, the entries of a transaction under
way found in its sorted arrays until it commits.

Crash safety: rows are appended with ``O_APPEND`` (a second process appends after them, never
over them), and synced to disk before the index that points at them is committed. A crash loses
the rows not yet indexed (they stay in the file, unreferenced), never corrupts the index, and
never makes a row that is not whole look like a vector. Before a direct write, zeros pad the
file to a 4 KiB boundary if a partial block left it elsewhere: the padding is never indexed.
Lookups: a key is looked for among the rows not yet indexed, then in the index. A new job's
keys are almost all new, and each probe of the index cost 1-4 us, more as it grew: while every
entry of a (model, dims) in the index is one this process wrote (it had none when the cache was
opened, and the indexer's connection has seen no other commit since, see
:meth:`Indexer.untouched`), only the keys a filter of those written (:class:`Written`) may hold
are asked for. A commit by anyone else, or a target that had entries, and every key is asked.

Schema version 1 kept the vectors in a ``vectors`` table: such a file is upgraded in place (the
new tables added, the old rows read where the index has no entry), so a nightly job's cache
keeps serving.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ._direct import ALIGN, RawBuffer, aligned_buffer, open_direct, refused
from ._exceptions import ConfigError
from ._types import FloatArray

__all__ = [
    "SCHEMA_VERSION",
    "Block",
    "CacheFiles",
    "Entries",
    "Indexer",
    "Pending",
    "VectorsFile",
    "Written",
    "checksums",
    "store_files",
    "vectors_path",
]

#: Version of the tables, the files and the key rule; a cache of a higher version is refused.
SCHEMA_VERSION = 2


class Block:
    """Rows waiting to be written for one (model, dims), copied into one buffer of ``capacity``
    rows that starts on a 4 KiB boundary (so that it can be written directly, see
    :class:`VectorsFile`), under their keys (a key stored twice is written twice; the later
    row is indexed)."""

    __slots__ = ("_where", "buffer", "count", "dims", "keys", "model", "rows")

    def __init__(
        self, model: str, dims: int, capacity: int, spare: RawBuffer | None = None
    ) -> None:
        size = capacity * dims * _VECTOR.itemsize
        buffer = spare if spare is not None and spare.nbytes >= size else aligned_buffer(size)
        self.model = model
        self.dims = dims
        self.buffer = buffer
        self.rows: FloatArray = buffer[:size].view(_VECTOR).reshape(capacity, dims)
        self.count = 0
        self.keys: list[bytes] = []
        # key -> its last row, made only when a row is asked for (a repeat found here, rare):
        # a dict entry per row stored cost more than the lookups' searches of ``keys``.
        self._where: dict[bytes, int] | None = None

    def room(self) -> int:
        """Rows that still fit."""
        return len(self.rows) - self.count

    def add(self, keys: Sequence[bytes], rows: FloatArray) -> None:
        """Copy ``rows`` (at most :meth:`room`) in, under ``keys``."""
        first, end = self.count, self.count + len(keys)
        self.rows[first:end] = rows  # converted to little-endian float32 on the way
        self.keys.extend(keys)
        self._where = None
        self.count = end

    def held(self, keys: set[bytes]) -> set[bytes]:
        """Those of ``keys`` that have a row here (in C, a hash probe per row gathered)."""
        return keys.intersection(self.keys)

    def row(self, key: bytes) -> FloatArray:
        """A copy of the last row gathered under ``key`` (the buffer is used again once
        written). Raises KeyError when there is none."""
        if self._where is None:
            # The last row of a key wins.
            self._where = dict(zip(self.keys, range(self.count), strict=True))
        found: FloatArray = self.rows[self._where[key]].astype(np.float32)
        return found

    def filled(self) -> FloatArray:
        """The rows gathered, in order."""
        return self.rows[: self.count]

    def data(self) -> memoryview:
        """The bytes of the rows gathered."""
        return self.buffer[: self.count * self.dims * _VECTOR.itemsize].data


_FORMAT = "sfembed embedding cache"  # meta 'format': tells our file from any other SQLite file
_VECTOR = np.dtype("<f4")  # stored byte order, whatever the machine's
_KEY = np.dtype("S16")  # a key as numpy sorts and compares it: bytewise
_KEY_BYTES = np.dtype("V16")  # the same bytes, given back whole (S16 drops trailing zeros)
_ROWS_PER_INSERT = 256  # index rows per INSERT: 768 variables, below the 999 of old SQLite
_INDEXER_CACHE_KIB = 512  # the indexer's SQLite page cache
_IN_KEYS = 500  # keys per SELECT: with the scope, 501 variables, below the 999 of old SQLite
_WRITTEN_BITS = 1 << 23  # the filter of keys written (1 MiB): 3 in 1,000 false at 500,000 keys
_BUSY_TIMEOUT_S = 30.0  # how long to wait for another process's write transaction
_RETRY_FIRST_S = 0.002  # opening: the first pause before trying again a step found busy
_RETRY_MOST_S = 0.1  # and the longest, the pauses doubling in between
_VECTORS_SUFFIX = "-vectors"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS scopes (id INTEGER PRIMARY KEY, model TEXT NOT NULL, "
    "dims INTEGER NOT NULL, UNIQUE (model, dims))",
    "CREATE TABLE IF NOT EXISTS entries (scope INTEGER NOT NULL, key BLOB NOT NULL, "
    "offset INTEGER NOT NULL, checksum INTEGER NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID",
)
_SELECT = "SELECT key, offset, checksum FROM entries WHERE scope = ? AND key IN "
# REPLACE: a fresh row also mends an entry whose bytes were damaged.
_INSERT = "INSERT OR REPLACE INTO entries (scope, key, offset, checksum) VALUES "
_LEGACY_SELECT = "SELECT key, vector FROM vectors WHERE model = ? AND dims = ? AND key IN "
_FILLED = "SELECT model, dims FROM scopes WHERE EXISTS (SELECT 1 FROM entries WHERE scope = id)"

log = logging.getLogger("sfembed")


def vectors_path(path: Path) -> Path:
    """The vectors file of the cache at ``path``."""
    return path.with_name(path.name + _VECTORS_SUFFIX)


def store_files(path: Path) -> tuple[Path, ...]:
    """Every file of the cache at ``path``: its index, SQLite's two WAL files, its vectors."""
    return (path, Path(f"{path}-wal"), Path(f"{path}-shm"), vectors_path(path))


def checksums(rows: FloatArray) -> npt.NDArray[np.int64]:
    """Each row's checksum: the sum, modulo 2**64, of its 64-bit words (32-bit ones for an odd
    width), as a signed integer for SQLite. A row cut short, zeroed, or another's disagrees."""
    data = np.ascontiguousarray(rows, dtype=_VECTOR)
    if data.shape[1] % 2:
        sums = data.view(np.uint32).sum(axis=1, dtype=np.uint64)
    else:
        sums = data.view(np.uint64).sum(axis=1, dtype=np.uint64)  # wraps, with no conversion
    signed: npt.NDArray[np.int64] = sums.view(np.int64)
    return signed


class VectorsFile:
    """The vectors file, used from one thread only: rows appended, read back by offset.

    Two descriptors on it: one for reads and buffered appends, and one opened with ``O_DIRECT``
    (-1 when the system or file system refuses it) for the appends that suit it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.direct = open_direct(path, os.O_WRONLY | os.O_APPEND)

    def append(self, data: memoryview) -> int:
        """Append ``data``; returns the offset of its first byte. Raises OSError when the disk
        refuses, or takes only a part (a full disk: that part is never indexed)."""
        if self.direct >= 0 and len(data) % ALIGN == 0:
            try:
                return self._append_direct(data)
            except OSError as error:  # an alignment the device does not take: buffered then
                if not refused(error):
                    raise
        return self._write(self.fd, data)

    def _append_direct(self, data: memoryview) -> int:
        end = os.fstat(self.fd).st_size
        if end % ALIGN:  # a partial block before (ours or another process's): pad it
            self._write(self.fd, memoryview(bytes(ALIGN - end % ALIGN)))
        return self._write(self.direct, data)

    def _write(self, fd: int, data: memoryview) -> int:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(
                f"embedding cache {str(self.path)!r}: {written} of {len(data)} bytes written"
            )
        return os.lseek(fd, 0, os.SEEK_CUR) - written  # O_APPEND: just after our own bytes

    def read(self, size: int, offsets: Sequence[int]) -> list[bytes]:
        """``size`` bytes at each of ``offsets`` (fewer where the file ends first)."""
        fd = self.fd
        return [os.pread(fd, size, offset) for offset in offsets]

    def sync(self) -> None:
        os.fdatasync(self.fd)  # the file's data, whichever descriptor wrote it

    def close(self) -> None:
        if self.direct >= 0:
            os.close(self.direct)
        os.close(self.fd)


class Pending:
    """Rows written but not yet indexed, for one (model, dims): their keys in the order written,
    and each one's offset and checksum in two integer arrays rather than an object per row.
    Which row is a key's latest is worked out only when asked: by a lookup that may find the
    key here (a dict of the keys added since the last such lookup), and by one stable sort
    when the entries are sealed."""

    __slots__ = ("_seen", "checksums", "keys", "offsets", "where")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.offsets = array("q")
        self.checksums = array("q")
        self.where: dict[bytes, int] = {}  # key -> its latest entry, of the first _seen keys
        self._seen = 0

    def __bool__(self) -> bool:
        """Whether any row is here, without the sort :meth:`__len__` makes."""
        return bool(self.keys)

    def __len__(self) -> int:
        """The keys here, each counted once (a sort of them all: not for the hot path)."""
        return len(self._latest(b"".join(self.keys)))

    def add(self, keys: list[bytes], start: int, size: int, sums: npt.NDArray[np.int64]) -> None:
        """Rows of ``keys``, ``size`` bytes each, written from ``start`` on."""
        offsets = np.arange(start, start + size * len(keys), size, dtype=np.int64)
        self.offsets.frombytes(offsets.tobytes())
        self.checksums.frombytes(sums.astype(np.int64, copy=False).tobytes())
        self.keys.extend(keys)

    def places(self, keys: list[bytes]) -> dict[bytes, tuple[int, int]]:
        """(offset, checksum) of each of ``keys`` that is here, by key. Give it only the keys
        that may be here (:meth:`Written.possible`): the dict it searches is brought up to date
        first, a cost a new job's lookups, whose keys are not here, never pay."""
        if not keys:
            return {}
        if self._seen < len(self.keys):
            added = range(self._seen, len(self.keys))
            self.where.update(zip(self.keys[self._seen :], added, strict=True))
            self._seen = len(self.keys)
        entries = list(map(self.where.get, keys))
        if entries.count(None) == len(entries):
            return {}
        offsets, sums = self.offsets, self.checksums
        return {
            key: (offsets[entry], sums[entry])
            for key, entry in zip(keys, entries, strict=True)
            if entry is not None
        }

    def sealed(self) -> Entries:
        """The entries, sorted by key (SQLite's order, bytewise), each key once with its
        latest row."""
        joined = b"".join(self.keys)
        rows = self._latest(joined)
        return Entries(
            np.frombuffer(joined, _KEY)[rows],
            np.frombuffer(self.offsets, np.int64)[rows],
            np.frombuffer(self.checksums, np.int64)[rows],
        )

    @staticmethod
    def _latest(joined: bytes) -> npt.NDArray[np.intp]:
        """The entry of each key's latest row, in key order, of the keys ``joined``."""
        words = np.frombuffer(joined, ">u8").reshape(-1, 2)
        order = np.lexsort((words[:, 1], words[:, 0]))  # stable: a key's rows in written order
        ordered = words[order]
        last = np.ones(len(order), np.bool_)  # the last of each run of one key
        np.any(ordered[1:] != ordered[:-1], axis=1, out=last[:-1])
        latest: npt.NDArray[np.intp] = order[last]
        return latest


class Entries:
    """Index entries of one (model, dims) sorted by key, each key once: a transaction's
    worth, held as three arrays (32 bytes a key, no Python object per key) until it is
    committed, and looked up by binary search meanwhile."""

    __slots__ = ("checksums", "keys", "offsets")

    def __init__(
        self,
        keys: npt.NDArray[np.bytes_],
        offsets: npt.NDArray[np.int64],
        checksums: npt.NDArray[np.int64],
    ) -> None:
        self.keys = keys
        self.offsets = offsets
        self.checksums = checksums

    def __len__(self) -> int:
        return len(self.keys)

    def places(self, keys: list[bytes]) -> dict[bytes, tuple[int, int]]:
        """(offset, checksum) of each of ``keys`` (16 bytes each) that is here, by key."""
        if not keys or not len(self.keys):
            return {}
        query = np.frombuffer(b"".join(keys), _KEY)
        at = np.searchsorted(self.keys, query)
        np.minimum(at, len(self.keys) - 1, out=at)
        hits = np.flatnonzero(self.keys[at] == query)
        rows = at[hits]
        places = zip(self.offsets[rows].tolist(), self.checksums[rows].tolist(), strict=True)
        return dict(zip([keys[i] for i in hits.tolist()], places, strict=True))

    def values(self) -> Iterator[list[bytearray | int]]:
        """Key, offset and checksum of each entry, in key order, flat: the values of one INSERT
        of ``_ROWS_PER_INSERT`` rows at a time (the last may hold fewer). Made a slice at a time
        (the Python objects of a whole transaction's rows took 4 MB at its peak)."""
        for start in range(0, len(self.keys), _ROWS_PER_INSERT):
            end = start + _ROWS_PER_INSERT
            keys: list[bytes] = self.keys[start:end].view(_KEY_BYTES).tolist()
            values: list[bytearray | int] = [0] * (3 * len(keys))
            values[0::3] = _blobs(keys)
            values[1::3] = self.offsets[start:end].tolist()
            values[2::3] = self.checksums[start:end].tolist()
            yield values


class Written:
    """The keys this process wrote, as a Bloom filter of ``_WRITTEN_BITS`` bits: a key added is
    always said to be possibly here; one never added, rarely (3 in 1,000 at 500,000 keys, 3 in
    100 at a million). A key is a digest, uniform already: its first three 32-bit words are the
    filter's three hashes."""

    __slots__ = ("bits",)

    def __init__(self) -> None:
        self.bits = np.zeros(_WRITTEN_BITS // 8, np.uint8)  # pages touched as bits are set

    def add(self, keys: list[bytes]) -> None:
        slots = _slots(keys)
        where = slots >> 3
        bits = np.left_shift(np.uint8(1), (slots & 7).astype(np.uint8))
        # Set by one buffered assignment: of two slots in one byte, only the last one's bit
        # is kept, so those lost are set again, unbuffered (``ufunc.at``, slower, on few).
        self.bits[where] |= bits
        lost = np.flatnonzero((self.bits[where] & bits) == 0)
        if len(lost):
            np.bitwise_or.at(self.bits, where[lost], bits[lost])

    def possible(self, keys: list[bytes]) -> list[bytes]:
        """Those of ``keys`` that may have been added (every one that was)."""
        if not keys:
            return []
        slots = _slots(keys)
        found = self.bits[slots >> 3]
        found &= np.left_shift(np.uint8(1), (slots & 7).astype(np.uint8))
        bits = found.reshape(len(keys), 3)
        # Three columns, not ``all(axis=1)``: a reduction of a row of three costs a call each.
        hit = np.logical_and(bits[:, 0], bits[:, 1])
        np.logical_and(hit, bits[:, 2], out=hit)
        return [keys[i] for i in np.flatnonzero(hit).tolist()]


def _slots(keys: list[bytes]) -> npt.NDArray[np.intp]:
    """The three bits of each of ``keys`` in :class:`Written`'s filter, flat, key by key (as
    intp: numpy indexes with those without converting them)."""
    words = np.frombuffer(b"".join(keys), "<u4").reshape(len(keys), 4)[:, :3]
    slots: npt.NDArray[np.intp] = (words & np.uint32(_WRITTEN_BITS - 1)).astype(np.intp).ravel()
    return slots


#: A transaction's entries, by (model, dims).
Batch = dict[tuple[str, int], Entries]


class Indexer:
    """Index entries written on a thread and a connection of their own, so that the blocks
    after them are written, and lookups answered, while a transaction runs (it took 0.2-1 s,
    more as the index grows, during which every sender waited with its rows).

    Batches are committed in the order given (a key in two: the later's row is kept), each
    after the rows it points at are synced. Only the thread that calls :meth:`submit` uses
    ``queued``; the indexer's thread only runs the transactions."""

    def __init__(self, path: Path, vectors: VectorsFile) -> None:
        # Used on the indexer's thread, and by :meth:`untouched` while that thread is idle.
        self.db = _connect(path, prepare=False)
        self.vectors = vectors
        self.queued: list[tuple[Batch, Future[None]]] = []  # not known committed, oldest first
        self._scopes: dict[tuple[str, int], int] = {}
        try:
            self.filled, self._version = _snapshot(self.db)
        except sqlite3.Error as error:
            self.db.close()
            raise _refusal(path, error) from error
        except BaseException:
            self.db.close()
            raise
        self._using = threading.Lock()  # held while the connection is in use
        self._foreign = False  # another connection has committed since the snapshot
        self._holding = False  # a transaction of ours holds the write lock, checked
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfembed-index")

    def untouched(self) -> bool:
        """True when no other connection (another process, another cache object) is known to
        have committed to the index since it was opened: only this indexer wrote since
        ``filled`` was read. False when one has, or when that cannot be told without waiting
        (a transaction of ours is waiting for the write lock)."""
        holding = self._holding  # read first: it is set after the check it vouches for
        if self._foreign:
            return False
        if holding:  # our write lock keeps every other writer out since the check
            return True
        if not self._using.acquire(blocking=False):
            return False
        try:
            self._check()
        finally:
            self._using.release()
        return not self._foreign

    def submit(self, batch: Batch) -> None:
        """Commit ``batch`` after those queued before it."""
        self.queued.append((batch, self._thread.submit(self._commit, batch)))

    def settle(self, *, wait: bool) -> None:
        """Forget the batches committed (every one, waiting for them, if ``wait``). Raises the
        error of a transaction that failed (OSError or sqlite3.Error): its entries are lost,
        as in a crash; their rows stay in the vectors file, unreferenced."""
        while self.queued and (wait or self.queued[0][1].done()):
            _, done = self.queued.pop(0)
            done.result()

    def close(self) -> None:
        """Wait for the transactions queued and close the connection."""
        try:
            self.settle(wait=True)
        finally:
            self._thread.shutdown(wait=True)
            self.db.close()

    def _check(self) -> None:
        """Note whether another connection has committed. This connection's data version
        changes with every commit but its own (and another's checkpoint: a false alarm)."""
        if self.db.execute("PRAGMA data_version").fetchone()[0] != self._version:
            self._foreign = True

    def _commit(self, batch: Batch) -> None:
        self.vectors.sync()  # no index entry may outlive, in a crash, the row it points at
        db = self.db
        with self._using:
            db.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway through
            try:
                self._check()
                self._holding = True
                for (model, dims), entries in batch.items():
                    scope = _scope(db, self._scopes, model, dims, create=True)
                    assert scope is not None
                    for values in entries.values():
                        db.execute(_insert(scope, len(values) // 3), values)
                self._holding = False  # before the lock is let go
                db.execute("COMMIT")
            except BaseException:
                self._holding = False
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._scopes.clear()  # a scope created in the rolled-back transaction is gone
                raise


class CacheFiles:
    """The index and vectors file of one cache, used from one thread only (the index's
    transactions run on the :class:`Indexer`'s).

    Opening creates both if need be. Raises ConfigError naming ``path`` when it cannot be opened
    or created, is not an sfembed cache, or has a newer schema version."""

    def __init__(self, path: Path, *, index_rows: int) -> None:
        self.path = path
        self.index_rows = index_rows
        self.db = _connect(path)  # lookups only: the indexer writes through its own
        self.legacy = _has_table(self.db, "vectors")  # schema version 1's rows
        try:
            self.vectors = VectorsFile(vectors_path(path))
        except OSError as error:
            self.db.close()
            raise ConfigError(
                f"cannot open embedding cache {str(path)!r}: its vectors file: "
                f"{error.strerror or error}"
            ) from None
        try:
            self.indexer = Indexer(path, self.vectors)
        except BaseException:
            self.vectors.close()
            self.db.close()
            raise
        self.unindexed: dict[tuple[str, int], Pending] = {}  # rows written, not yet handed on
        self.unindexed_rows = 0
        self.written = Written()
        self._scopes: dict[tuple[str, int], int] = {}

    def _fresh(self, model: str, dims: int) -> bool:
        """True when every key of (model, dims) in the index was written by this process: it
        had none when opened, and no other connection has committed since. A lookup then asks
        the index only for the keys :class:`Written` may hold: a new job's keys, almost all
        new, cost no probe of the index (1-4 us a key, growing with it)."""
        return (
            not self.legacy
            and (model, dims) not in self.indexer.filled
            and self.indexer.untouched()
        )

    def lookup(self, model: str, dims: int, keys: list[bytes]) -> dict[bytes, FloatArray]:
        """The whole rows of ``keys`` (unique) that the files hold, by key."""
        self.indexer.settle(wait=False)  # a batch committed is found by the SELECT below
        # The keys this process may have written: only they may be among the rows not yet
        # indexed, or in a transaction under way. A new job's keys are almost none of them.
        mine = self.written.possible(keys)
        places: dict[bytes, tuple[int, int]] = {}
        unindexed = self.unindexed.get((model, dims))
        if unindexed is not None:
            places.update(unindexed.places(mine))
        for batch, _ in reversed(self.indexer.queued):  # the latest row of a key first
            entries = batch.get((model, dims))
            if entries is not None:
                rest = [key for key in mine if key not in places] if places else mine
                places.update(entries.places(rest))
        rest = [key for key in keys if key not in places] if places else keys
        scope = _scope(self.db, self._scopes, model, dims, create=False) if rest else None
        if scope is not None and self._fresh(model, dims):
            # The index holds no other key of this target than those written here.
            rest = [key for key in mine if key not in places] if places else mine
        if scope is not None:
            for start in range(0, len(rest), _IN_KEYS):
                part = rest[start : start + _IN_KEYS]
                sql = f"{_SELECT}({','.join('?' * len(part))})"
                for key, offset, checksum in self.db.execute(sql, (scope, *_blobs(part))):
                    places[key] = (offset, checksum)
        found = self._read(dims, places)
        if self.legacy and len(found) < len(keys):
            found.update(self._legacy(model, dims, [key for key in keys if key not in found]))
        return found

    def append(self, blocks: list[Block]) -> None:
        """Append each block's rows to the vectors file (one write each), and hand their index
        entries to the indexer once ``index_rows`` are waiting. Raises OSError when the disk
        refuses, or an error of an earlier transaction (see :meth:`Indexer.settle`)."""
        for block in blocks:
            if not block.count:
                continue
            start = self.vectors.append(block.data())
            pending = self.unindexed.setdefault((block.model, block.dims), Pending())
            size = block.dims * _VECTOR.itemsize
            pending.add(block.keys, start, size, checksums(block.filled()))
            self.written.add(block.keys)
            self.unindexed_rows += block.count
        if self.unindexed_rows >= self.index_rows:
            self.indexer.settle(wait=False)
            # One transaction at a time: while it runs, entries gather into a larger one, up
            # to twice the size; only then does the writer wait for it.
            if self.indexer.queued and self.unindexed_rows >= 2 * self.index_rows:
                self.indexer.settle(wait=True)
            if not self.indexer.queued:
                self._hand_on()

    def commit(self) -> None:
        """Index every row appended, and wait until it is: the rows are synced to disk first,
        then the index entries written, sorted by key, in one transaction."""
        self._hand_on()
        self.indexer.settle(wait=True)

    def settle(self) -> None:
        """Wait for the transactions under way."""
        self.indexer.settle(wait=True)

    def close(self) -> None:
        """Index what is waiting and close both files."""
        try:
            self._hand_on()
        finally:
            try:
                self.indexer.close()
            finally:
                self.vectors.close()
                self.db.close()

    def _hand_on(self) -> None:
        """Hand the entries waiting to the indexer."""
        if not self.unindexed:
            return
        batch = {target: pending.sealed() for target, pending in self.unindexed.items()}
        self.unindexed = {}
        self.unindexed_rows = 0
        self.indexer.submit(batch)

    def _read(self, dims: int, places: dict[bytes, tuple[int, int]]) -> dict[bytes, FloatArray]:
        """The rows at ``places`` that are whole and agree with their checksums."""
        if not places:
            return {}
        size = dims * _VECTOR.itemsize
        keys = list(places)
        data = self.vectors.read(size, [places[key][0] for key in keys])
        whole = [i for i, chunk in enumerate(data) if len(chunk) == size]
        if not whole:
            return {}
        joined = b"".join(data[i] for i in whole) if len(whole) < len(data) else b"".join(data)
        rows = np.frombuffer(joined, _VECTOR).reshape(len(whole), dims)
        expected = np.array([places[keys[i]][1] for i in whole], dtype=np.int64)
        good = np.flatnonzero(checksums(rows) == expected).tolist()
        rows = rows.astype(np.float32, copy=False)
        return {keys[whole[i]]: rows[i] for i in good}

    def _legacy(self, model: str, dims: int, keys: list[bytes]) -> dict[bytes, FloatArray]:
        """Rows of schema version 1, kept in the ``vectors`` table."""
        size = dims * _VECTOR.itemsize
        found: dict[bytes, FloatArray] = {}
        for start in range(0, len(keys), _IN_KEYS):
            part = keys[start : start + _IN_KEYS]
            sql = f"{_LEGACY_SELECT}({','.join('?' * len(part))})"
            for key, vector in self.db.execute(sql, (model, dims, *_blobs(part))):
                if isinstance(vector, bytes) and len(vector) == size:
                    found[key] = np.frombuffer(vector, _VECTOR).astype(np.float32, copy=False)
        return found


def _scope(
    db: sqlite3.Connection,
    known: dict[tuple[str, int], int],
    model: str,
    dims: int,
    *,
    create: bool,
) -> int | None:
    """The id of (model, dims) in the index, remembered in ``known``; made (in the open
    transaction) if ``create``."""
    found = known.get((model, dims))
    if found is not None:
        return found
    if create:
        db.execute("INSERT OR IGNORE INTO scopes (model, dims) VALUES (?, ?)", (model, dims))
    row = db.execute("SELECT id FROM scopes WHERE model = ? AND dims = ?", (model, dims)).fetchone()
    if row is None:
        return None
    known[(model, dims)] = int(row[0])
    return int(row[0])


def _blobs(keys: list[bytes]) -> Iterator[bytearray]:
    """``keys`` as SQLite's module binds them cheapest. It binds a bytearray as it is, but a
    ``bytes`` only after looking for an adapter, whose failed attribute lookups (an exception
    made and cleared) cost 0.9 us a key, more than the row's insert. Stored alike: a BLOB."""
    return map(bytearray, keys)


@functools.lru_cache(maxsize=16)
def _insert(scope: int, rows: int) -> str:
    """The INSERT of ``rows`` entries of ``scope``. Many rows a statement: with one, as
    ``executemany`` runs it, the statement's own work cost 3-4 us a row here, the B-tree's
    insert under 1; with 256, 1.5 us in all. The scope is an integer of ours, put in the
    statement: each row binds the three values it has."""
    return _INSERT + ",".join([f"({int(scope)}, ?, ?, ?)"] * rows)


def _snapshot(db: sqlite3.Connection) -> tuple[frozenset[tuple[str, int]], int]:
    """The (model, dims) that have index entries, and the connection's data version, both as
    of one read."""
    db.execute("BEGIN")
    try:
        filled = frozenset((str(model), int(dims)) for model, dims in db.execute(_FILLED))
        version = int(db.execute("PRAGMA data_version").fetchone()[0])
    finally:
        db.execute("COMMIT")
    return filled, version


def _connect(path: Path, *, prepare: bool = True) -> sqlite3.Connection:
    """Open or create the index at ``path`` (checked and made ready if ``prepare``; a second
    connection to it, which may be used on another thread than the opener's, otherwise).
    Raises ConfigError."""
    try:
        db = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=prepare
        )
    except sqlite3.Error as error:
        raise _refusal(path, error) from error
    try:
        if prepare:
            _until_free(db, path, functools.partial(_prepare, db, path))
        else:
            db.execute("PRAGMA synchronous = NORMAL")  # per connection; WAL is the file's
            # Its transactions insert in key order, each page once: a cache of the B-tree's
            # upper levels is enough (SQLite's default is 2 MiB, held all the job).
            db.execute(f"PRAGMA cache_size = -{_INDEXER_CACHE_KIB}")
    except sqlite3.Error as error:
        db.close()
        raise _refusal(path, error) from error
    except BaseException:
        db.close()
        raise
    return db


def _refusal(path: Path, error: sqlite3.Error) -> ConfigError:
    """The error of a cache that cannot be opened, naming it and the cause."""
    if _busy(error):
        return ConfigError(
            f"cannot open embedding cache {str(path)!r}: another process (or another cache "
            f"on the same file) held it locked for the {_BUSY_TIMEOUT_S:g} s a cache waits "
            f"({error})"
        )
    return ConfigError(f"cannot open embedding cache {str(path)!r}: {error}")


def _busy(error: sqlite3.Error) -> bool:
    """Whether ``error`` is SQLITE_BUSY (any of its extended codes): another connection held a
    lock that this one needed."""
    return error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def _until_free(db: sqlite3.Connection, path: Path, step: Callable[[], None]) -> None:
    """Run ``step`` (which may be run again from its start), again while it fails for a lock
    another connection holds, for up to ``_BUSY_TIMEOUT_S`` in all.

    The busy handler does not always wait: SQLite refuses at once, rather than deadlock, a
    connection that holds a read lock and asks for a write lock another connection holds. The
    switch to WAL is such a step (it reads the file's header, then writes it), so two jobs
    creating the same cache at once found "database is locked" here. The step then finds the
    file switched by the other, or switches it itself. Raises the last sqlite3.Error."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    pause = _RETRY_FIRST_S
    while True:
        try:
            step()
            return
        except sqlite3.Error as error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if not _busy(error) or time.monotonic() + pause > deadline:
                raise
            if pause == _RETRY_FIRST_S:
                log.debug("embedding cache %r is locked by another opener: waiting", str(path))
        time.sleep(pause)
        pause = min(2 * pause, _RETRY_MOST_S)


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables in an empty database, check (and upgrade) an existing one, then set
    the journal. Each step may be run again: another process may be doing the same."""
    # Reading the schema is the first read of the file: junk fails here, "not a database".
    tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    if tables == 0:
        _create(db)
    if _version(db, path) < SCHEMA_VERSION:
        _create(db, upgrade=True)  # version 1: the index beside the old rows, kept
    # Only now: another program's SQLite file must not be switched to WAL by a wrong path.
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")


def _create(db: sqlite3.Connection, *, upgrade: bool = False) -> None:
    """Make the tables that are missing; raise the schema version if ``upgrade``."""
    # IF NOT EXISTS and OR IGNORE: another process may be creating the same file right now,
    # perhaps a newer sfembed, whose version must stay: only an upgrade raises it.
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            db.execute(statement)
        version = str(SCHEMA_VERSION)
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('format', ?)", (_FORMAT,))
        db.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)", (version,)
        )
        if upgrade:
            db.execute(
                "UPDATE meta SET value = ? WHERE name = 'schema_version' "
                "AND CAST(value AS INTEGER) < ?",
                (version, SCHEMA_VERSION),
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _version(db: sqlite3.Connection, path: Path) -> int:
    """The schema version of an sfembed cache we can read. Raises ConfigError otherwise."""
    not_ours = ConfigError(f"{str(path)!r} is an SQLite file but not an sfembed embedding cache")
    try:
        meta = dict(db.execute("SELECT name, value FROM meta"))
    except sqlite3.OperationalError as error:  # no meta table, or not the columns we wrote
        if _busy(error):  # or locked: waited for and tried again
            raise
        raise not_ours from None
    if meta.get("format") != _FORMAT:
        raise not_ours
    try:
        version = int(meta.get("schema_version", ""))
    except ValueError:
        raise not_ours from None
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"embedding cache {str(path)!r} has schema version {version}; this sfembed reads "
            f"versions up to {SCHEMA_VERSION}: upgrade sfembed or use another cache file"
        )
    if version < 1:
        raise not_ours
    return version


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    query = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
    return bool(db.execute(query, (name,)).fetchone()[0])
