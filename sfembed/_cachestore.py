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
rows, most of it copying each row into B-tree pages and again into the WAL. Rows are now written
with one ``write`` per array stored (a request's rows; never joined into a second copy), the
checksums with one numpy sum per array. The index is written
in transactions of ``index_rows`` (32,768) keys, sorted: a key is random, so each transaction
touches pages all over the index, and few large ones touch each page once rather than many
times (at a million entries: 16 us per row in transactions of 2,048, 5 us in those of 65,536).

Crash safety: rows are appended with ``O_APPEND`` (a second process appends after them, never
over them), and synced to disk before the index that points at them is committed. A crash loses
the rows not yet indexed (they stay in the file, unreferenced), never corrupts the index, and
never makes a row that is not whole look like a vector. Schema version 1 kept the vectors in a
``vectors`` table: such a file is upgraded in place (the new tables added, the old rows read
where the index has no entry), so a nightly job's cache keeps serving.
"""

from __future__ import annotations

import os
import sqlite3
from itertools import repeat
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ._exceptions import ConfigError
from ._types import FloatArray

__all__ = ["SCHEMA_VERSION", "Block", "CacheFiles", "Gathered", "checksums", "vectors_path"]

#: Version of the tables, the files and the key rule; a cache of a higher version is refused.
SCHEMA_VERSION = 2


class Block:
    """Rows waiting to be written for one (model, dims): arrays as they were stored, and where
    each key's last row is (a key stored twice is written twice; the later row is indexed)."""

    __slots__ = ("arrays", "keys", "where")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.arrays: list[FloatArray] = []
        self.where: dict[bytes, tuple[int, int]] = {}  # key -> (array, row)

    def add(self, keys: list[bytes], rows: FloatArray) -> None:
        """Gather ``rows`` (kept, not copied) under ``keys``."""
        array = len(self.arrays)
        self.arrays.append(rows)
        self.keys.extend(keys)
        self.where.update(zip(keys, zip(repeat(array), range(len(keys))), strict=False))

    def row(self, key: bytes) -> FloatArray:
        """The last row gathered under ``key``. Raises KeyError when there is none."""
        array, row = self.where[key]
        found: FloatArray = self.arrays[array][row]
        return found


#: Rows waiting to be written, by (model, dims).
Gathered = dict[tuple[str, int], Block]

_FORMAT = "sfembed embedding cache"  # meta 'format': tells our file from any other SQLite file
_VECTOR = np.dtype("<f4")  # stored byte order, whatever the machine's
_IN_KEYS = 500  # keys per SELECT: with the scope, 501 variables, below the 999 of old SQLite
_BUSY_TIMEOUT_S = 30.0  # how long to wait for another process's write transaction
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
# The scope is an integer of ours, put in the statement: each row binds the three values it has.
_INSERT = "INSERT OR REPLACE INTO entries (scope, key, offset, checksum) VALUES ({}, ?, ?, ?)"
_LEGACY_SELECT = "SELECT key, vector FROM vectors WHERE model = ? AND dims = ? AND key IN "


def vectors_path(path: Path) -> Path:
    """The vectors file of the cache at ``path``."""
    return path.with_name(path.name + _VECTORS_SUFFIX)


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


class CacheFiles:
    """The index and vectors file of one cache, used from one thread only.

    Opening creates both if need be. Raises ConfigError naming ``path`` when it cannot be opened
    or created, is not an sfembed cache, or has a newer schema version."""

    def __init__(self, path: Path, *, index_rows: int) -> None:
        self.path = path
        self.index_rows = index_rows
        self.db = _connect(path)
        self.legacy = _has_table(self.db, "vectors")  # schema version 1's rows
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self.fd = os.open(vectors_path(path), flags, 0o644)
        except OSError as error:
            self.db.close()
            raise ConfigError(
                f"cannot open embedding cache {str(path)!r}: its vectors file: "
                f"{error.strerror or error}"
            ) from None
        # Rows written but not yet indexed: (model, dims) -> key -> (key, offset, checksum).
        self.unindexed: dict[tuple[str, int], dict[bytes, tuple[bytes, int, int]]] = {}
        self.unindexed_rows = 0
        self._scopes: dict[tuple[str, int], int] = {}

    def lookup(self, model: str, dims: int, keys: list[bytes]) -> dict[bytes, FloatArray]:
        """The whole rows of ``keys`` (unique) that the files hold, by key."""
        places: dict[bytes, tuple[int, int]] = {}
        unindexed = self.unindexed.get((model, dims))
        if unindexed:
            places.update((key, unindexed[key][1:]) for key in keys if key in unindexed)
        rest = [key for key in keys if key not in places] if places else keys
        scope = self._scope(model, dims, create=False)
        if scope is not None:
            for start in range(0, len(rest), _IN_KEYS):
                part = rest[start : start + _IN_KEYS]
                sql = f"{_SELECT}({','.join('?' * len(part))})"
                for key, offset, checksum in self.db.execute(sql, (scope, *part)):
                    places[key] = (offset, checksum)
        found = self._read(dims, places)
        if self.legacy and len(found) < len(keys):
            found.update(self._legacy(model, dims, [key for key in keys if key not in found]))
        return found

    def append(self, gathered: Gathered) -> None:
        """Append the gathered rows to the vectors file (one write per array), and index them
        once ``index_rows`` are waiting. Raises OSError when the disk refuses."""
        for (model, dims), block in gathered.items():
            unindexed = self.unindexed.setdefault((model, dims), {})
            first = 0
            # One write per stored array, not one of them joined: a join is a second copy of
            # every row, megabytes that the allocator keeps after they are freed.
            for array in block.arrays:
                rows = np.ascontiguousarray(array, dtype=_VECTOR)
                keys = block.keys[first : first + len(rows)]
                first += len(rows)
                offsets = self._write(rows.data.cast("B"), dims * _VECTOR.itemsize)
                entries = zip(keys, offsets, checksums(rows).tolist(), strict=True)
                unindexed.update(zip(keys, entries, strict=True))
                self.unindexed_rows += len(keys)
        if self.unindexed_rows >= self.index_rows:
            self.commit()

    def _write(self, data: memoryview, size: int) -> range:
        """Append ``data`` (rows of ``size`` bytes) and return where each row starts."""
        written = os.write(self.fd, data)
        if written != len(data):  # a full disk: the part written is never indexed
            raise OSError(f"embedding cache {str(self.path)!r}: {written} of {len(data)} "
                          "bytes written")  # fmt: skip
        end = os.lseek(self.fd, 0, os.SEEK_CUR)  # O_APPEND: just after our own rows
        return range(end - len(data), end, size)

    def commit(self) -> None:
        """Index every row appended: the rows are synced to disk first, then the index entries
        are written, sorted by key, in one transaction."""
        if not self.unindexed:
            return
        os.fdatasync(self.fd)  # no index entry may outlive, in a crash, the row it points at
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway through
        try:
            for (model, dims), entries in self.unindexed.items():
                scope = self._scope(model, dims, create=True)
                assert scope is not None
                db.executemany(_INSERT.format(int(scope)), sorted(entries.values()))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._scopes.clear()  # a scope created in the rolled-back transaction is gone
            raise
        self.unindexed.clear()
        self.unindexed_rows = 0

    def close(self) -> None:
        """Index what is waiting and close both files."""
        try:
            self.commit()
        finally:
            os.close(self.fd)
            self.db.close()

    def _read(self, dims: int, places: dict[bytes, tuple[int, int]]) -> dict[bytes, FloatArray]:
        """The rows at ``places`` that are whole and agree with their checksums."""
        if not places:
            return {}
        size = dims * _VECTOR.itemsize
        keys = list(places)
        data = [os.pread(self.fd, size, places[key][0]) for key in keys]
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
            for key, vector in self.db.execute(sql, (model, dims, *part)):
                if isinstance(vector, bytes) and len(vector) == size:
                    found[key] = np.frombuffer(vector, _VECTOR).astype(np.float32, copy=False)
        return found

    def _scope(self, model: str, dims: int, *, create: bool) -> int | None:
        """The id of (model, dims) in the index; made (in the open transaction) if ``create``."""
        known = self._scopes.get((model, dims))
        if known is not None:
            return known
        if create:
            self.db.execute(
                "INSERT OR IGNORE INTO scopes (model, dims) VALUES (?, ?)", (model, dims)
            )
        row = self.db.execute(
            "SELECT id FROM scopes WHERE model = ? AND dims = ?", (model, dims)
        ).fetchone()
        if row is None:
            return None
        self._scopes[(model, dims)] = row[0]
        return int(row[0])


def _connect(path: Path) -> sqlite3.Connection:
    """Open or create the index at ``path``. Raises ConfigError."""
    try:
        db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as error:
        raise ConfigError(f"cannot open embedding cache {str(path)!r}: {error}") from error
    try:
        _prepare(db, path)
    except sqlite3.Error as error:
        db.close()
        raise ConfigError(f"cannot open embedding cache {str(path)!r}: {error}") from error
    except BaseException:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables in an empty database, check (and upgrade) an existing one, then set
    the journal."""
    # Reading the schema is the first read of the file: junk fails here, "not a database".
    tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    if tables == 0:
        _create(db)
    if _version(db, path) < SCHEMA_VERSION:
        _create(db)  # version 1: the index beside the old rows, which stay readable
    # Only now: another program's SQLite file must not be switched to WAL by a wrong path.
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")


def _create(db: sqlite3.Connection) -> None:
    # IF NOT EXISTS and OR IGNORE: another process may be creating the same file right now.
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('format', ?)", (_FORMAT,))
        db.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
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
    except sqlite3.OperationalError:  # no meta table, or not the columns we wrote
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
