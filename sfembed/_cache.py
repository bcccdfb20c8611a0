"""EmbeddingCache: vectors already embedded, kept in SQLite and found again by a digest of the text.

An entry is keyed by (model, dims, key), where ``key`` is the 16-byte BLAKE2b digest of the UTF-8
bytes of the *normalised* text. Normalisation makes texts that only differ in invisible ways share
one entry, and nothing else:

1. Unicode NFC (skipped for ASCII text, which NFC leaves unchanged), so composed and decomposed
   accents (``"é"`` and ``"e\\u0301"``) are one text;
2. line ends ``\\r\\n`` and ``\\r`` become ``\\n``;
3. leading and trailing whitespace is stripped (``str.strip()``: every character for which
   ``str.isspace()`` is true, NBSP and the ideographic space included).

Inner whitespace and case are kept: ``"a  b"``, ``"a b"`` and ``"A b"`` are three texts. Changing
any of these rules, or the digest, changes every key and needs a new ``SCHEMA_VERSION``.

The engine files a vector under its model *and the endpoint that made it* (:func:`scope`): vectors
from a local test server, or from another gateway, are never served to a run against the provider.

The file holds model names, endpoints, dims, digests and vectors, never a text and never an API key
(an endpoint never holds credentials: the client refuses a base URL with them). Tables::

    meta(name TEXT PRIMARY KEY, value TEXT)          -- format name and schema version
    vectors(model TEXT, dims INTEGER, key BLOB, vector BLOB,
            PRIMARY KEY (model, dims, key))

``vector`` is the row as little-endian float32 bytes (``dims * 4`` of them). The database runs in
WAL mode with ``synchronous=NORMAL``: rows stored are gathered in memory up to ``write_rows``
(2,048 by default, 8 MiB at 1,024 dims) and written in one transaction, which a crash (of the
process or the machine) may lose but never corrupts; ``flush`` and ``close`` write what is
gathered. A second process may read and write the same file meanwhile. A transaction per request
of 64 rows cost twice the CPU: rows land at random places of the key index, and every 64 KiB index
page touched is written to the WAL again for each transaction.

All SQLite work runs on one worker thread owned by the cache, so the event loop never waits on the
disk and the connection is only ever used by the thread that opened it. Work is done in bulk: a
``lookup`` is one SELECT per 500 keys (and sees rows not yet written), a write one
``executemany`` and a commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import numpy as np
import numpy.typing as npt

from ._exceptions import ConfigError
from ._types import FloatArray

__all__ = ["KEY_BYTES", "SCHEMA_VERSION", "EmbeddingCache", "normalise", "scope"]

#: Bytes of a key: 128 bits make a collision among even 10**12 texts vanishingly unlikely.
KEY_BYTES = 16
#: Version of the tables and of the key rule; a cache of a higher version is refused.
SCHEMA_VERSION = 1

_FORMAT = "sfembed embedding cache"  # meta 'format': tells our file from any other SQLite file
_VECTOR = np.dtype("<f4")  # stored byte order, whatever the machine's
_IN_KEYS = 500  # keys per SELECT: with model and dims, 502 variables, below the 999 of old SQLite
_PAGE_BYTES = 65_536
_BUSY_TIMEOUT_S = 30.0  # how long to wait for another process's write transaction
_WRITE_ROWS = 2048

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, dims INTEGER NOT NULL, "
    "key BLOB NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (model, dims, key))",
)
_SELECT = "SELECT key, vector FROM vectors WHERE model = ? AND dims = ? AND key IN "
# REPLACE, not IGNORE: a fresh vector also mends an entry whose bytes were damaged.
_INSERT = "INSERT OR REPLACE INTO vectors (model, dims, key, vector) VALUES (?, ?, ?, ?)"

_T = TypeVar("_T")


def scope(model: str, endpoint: str) -> str:
    """The name the engine files ``model``'s vectors under when they come from ``endpoint``."""
    return f"{model} @ {endpoint}"


def normalise(text: str) -> str:
    """``text`` as the cache sees it: NFC, ``\\n`` line ends, no surrounding whitespace.

    Raises TypeError when ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"the cache keys texts only, not {type(text).__name__}")
    if not text.isascii():  # NFC leaves ASCII as it is; skipping it keeps the common case cheap
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip()


class EmbeddingCache:
    """Vectors already embedded, keyed by (model, dims, hash of the normalised text), in SQLite.

    Opening creates ``path`` if need be (not its directory); it blocks for the few milliseconds
    the open takes. Raises ConfigError naming ``path`` when it cannot be opened or created, is not
    an sfembed cache, or has a newer schema version. An async context manager that closes.

    ``write_rows`` rows are gathered before a write (1: every ``store`` writes at once).

    Counters, over the cache's life: ``hits`` and ``misses`` count the keys of each ``lookup``
    (a key given twice counts twice), ``stored`` the rows kept by ``store``.
    """

    def __init__(self, path: str | Path, *, write_rows: int = _WRITE_ROWS) -> None:
        if write_rows < 1:
            raise ConfigError(f"embedding cache: write_rows must be at least 1, not {write_rows}")
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self._write_rows = write_rows
        # Rows not yet written, by (model, dims) then key: a lookup sees them.
        self._gathered: dict[tuple[str, int], dict[bytes, FloatArray]] = {}
        self._gathered_rows = 0
        self._closing: asyncio.Future[None] | None = None
        self._db: sqlite3.Connection | None = None  # used on the worker thread only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfembed-cache")
        try:
            self._db = self._worker.submit(_connect, self.path).result()
        except BaseException:
            self._worker.shutdown(wait=False)
            raise

    @staticmethod
    def key(text: str) -> bytes:
        """The ``KEY_BYTES``-byte BLAKE2b digest of ``normalise(text)``. Raises TypeError."""
        data = normalise(text).encode("utf-8", "surrogatepass")  # a lone surrogate still has a key
        return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()

    def keys(self, texts: Sequence[str]) -> list[bytes]:
        """The key of each of ``texts``, in order. Raises TypeError for an item not a string."""
        key = self.key
        return [key(text) for text in texts]

    async def lookup(self, model: str, dims: int, keys: Sequence[bytes]) -> dict[bytes, FloatArray]:
        """The stored vectors of ``keys`` for ``model`` at ``dims``: hits only, by key.

        Each value is a read-only float32 row of length ``dims`` (copy it to change it); an entry
        of the wrong length (a damaged file) counts as a miss. Raises ValueError for a bad
        ``model``, ``dims`` or key, or when closed; sqlite3.Error when the disk refuses.
        """
        _check_target(model, dims)
        _check_keys(keys)
        if not keys:
            return {}
        found, hits = await self._run(partial(self._lookup, model, dims, list(keys)))
        gathered = self._gathered.get((model, dims))
        if gathered and len(found) < len(keys):
            unfound = [key for key in keys if key not in found and key in gathered]
            found.update((key, gathered[key]) for key in unfound)
            hits += len(unfound)
        self.hits += hits
        self.misses += len(keys) - hits
        return found

    async def store(self, model: str, dims: int, keys: Sequence[bytes], rows: FloatArray) -> None:
        """Keep row i of ``rows`` under ``keys[i]`` for ``model`` at ``dims``, written with the
        rows gathered before it once ``write_rows`` are gathered (see :meth:`flush`).

        A row holding a NaN (a failed input) or an infinity is skipped: failures are never cached.
        An existing entry, or a key given twice, is replaced by the later row. Raises ValueError
        when ``rows`` is not (len(keys), dims), for a bad ``model``, ``dims`` or key, or when
        closed; sqlite3.Error when the disk refuses.
        """
        _check_target(model, dims)
        _check_keys(keys)
        if rows.ndim != 2 or rows.shape != (len(keys), dims):
            raise ValueError(f"rows of shape {rows.shape} for {len(keys)} keys of {dims} dims")
        if self._closing is not None:
            raise ValueError(f"embedding cache {str(self.path)!r} is closed")
        finite: npt.NDArray[np.bool_] = np.all(np.isfinite(rows), axis=1)
        if not finite.all():
            keys = [key for key, keep in zip(keys, finite.tolist(), strict=True) if keep]
            rows = rows[finite]
        if not keys:
            return
        # A copy: the caller may reuse its buffer before the rows are written.
        snapshot = np.array(rows, dtype=_VECTOR, order="C")
        self._gathered.setdefault((model, dims), {}).update(zip(keys, snapshot, strict=True))
        self._gathered_rows += len(keys)
        self.stored += len(keys)
        if self._gathered_rows >= self._write_rows:
            await self.flush()

    async def flush(self) -> None:
        """Write every row gathered by :meth:`store`, in one transaction. The write goes on if
        the caller is cancelled. Raises sqlite3.Error when the disk refuses."""
        if not self._gathered:
            return
        gathered, self._gathered, self._gathered_rows = self._gathered, {}, 0
        await asyncio.shield(self._run(partial(self._store, gathered)))

    async def close(self) -> None:
        """Commit and close the file, after any work already queued; later calls only wait for it.

        Cancelling the caller does not stop the close. Raises sqlite3.Error if closing fails.
        """
        if self._closing is None:
            try:
                await self.flush()
            finally:
                self._close_worker()
        assert self._closing is not None
        await asyncio.shield(self._closing)

    def _close_worker(self) -> None:
        if self._closing is None:
            loop = asyncio.get_running_loop()
            self._closing = loop.run_in_executor(self._worker, self._close)
            # The thread ends once the queued work and the close have run; nothing waits for it.
            self._worker.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` on the worker thread, after the work queued before it."""
        if self._closing is not None:
            raise ValueError(f"embedding cache {str(self.path)!r} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._worker, work)

    # --- on the worker thread ---------------------------------------------------------------

    def _lookup(
        self, model: str, dims: int, keys: list[bytes]
    ) -> tuple[dict[bytes, FloatArray], int]:
        """(vectors found by key, how many of ``keys`` were found)."""
        db = self._connection()
        size = dims * _VECTOR.itemsize
        unique = list(dict.fromkeys(keys))
        found: dict[bytes, FloatArray] = {}
        for start in range(0, len(unique), _IN_KEYS):
            part = unique[start : start + _IN_KEYS]
            sql = f"{_SELECT}({','.join('?' * len(part))})"
            for key, vector in db.execute(sql, (model, dims, *part)):
                if isinstance(vector, bytes) and len(vector) == size:
                    found[key] = np.frombuffer(vector, _VECTOR).astype(np.float32, copy=False)
        hits = len(keys) if len(found) == len(unique) else sum(key in found for key in keys)
        return found, hits

    def _store(self, gathered: dict[tuple[str, int], dict[bytes, FloatArray]]) -> None:
        """Write the gathered rows in one transaction."""
        db = self._connection()
        entries = [
            (model, dims, key, row.tobytes())
            for (model, dims), rows in gathered.items()
            for key, row in rows.items()
        ]
        db.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway through
        try:
            db.executemany(_INSERT, entries)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            if db.in_transaction:  # never left open by store; committed all the same
                db.execute("COMMIT")
            db.close()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:  # only if work slipped in after close; _run refuses new ones
            raise ValueError(f"embedding cache {str(self.path)!r} is closed")
        return self._db


def _check_target(model: str, dims: int) -> None:
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string, not {model!r}")
    if isinstance(dims, bool) or not isinstance(dims, int) or dims <= 0:
        raise ValueError(f"dims must be a positive integer, not {dims!r}")


def _check_keys(keys: Sequence[bytes]) -> None:
    # A text passed by mistake would otherwise be stored as a key: refuse it, and never echo it.
    for key in keys:
        if type(key) is not bytes or len(key) != KEY_BYTES:
            given = f"{len(key)} bytes" if type(key) is bytes else f"a {type(key).__name__}"
            raise ValueError(
                f"a key must be the {KEY_BYTES}-byte digest from EmbeddingCache.key, not {given}"
            )


def _connect(path: Path) -> sqlite3.Connection:
    """Open or create the cache at ``path`` (on the worker thread). Raises ConfigError."""
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
    """Create the tables in an empty database, check an existing one, then set the journal."""
    # Reading the schema is the first read of the file: junk fails here, "not a database".
    tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    if tables == 0:
        # Before the first table: a vector (4 KiB at 1,024 dims) would overflow a 4 KiB page;
        # 64 KiB pages halve the CPU of a store (measured: 26 -> 12.5 ms per 1,000 rows).
        db.execute(f"PRAGMA page_size = {_PAGE_BYTES}")
        _create(db)
    _check_version(db, path)
    # Only now: another program's SQLite file must not be switched to WAL by a wrong path.
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")


def _create(db: sqlite3.Connection) -> None:
    # IF NOT EXISTS and OR IGNORE: another process may be creating the same file right now.
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            db.execute(statement)
        db.executemany(
            "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
            [("format", _FORMAT), ("schema_version", str(SCHEMA_VERSION))],
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _check_version(db: sqlite3.Connection, path: Path) -> None:
    """Raise ConfigError unless the database is an sfembed cache of a version we can read."""
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
            f"version {SCHEMA_VERSION}: upgrade sfembed or use another cache file"
        )
    if version < 1:
        raise not_ours
