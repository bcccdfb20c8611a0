"""EmbeddingCache: vectors already embedded, found again by a digest of the text.

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

The files (see ``_cachestore``: an SQLite index and a vectors file beside it) hold model names,
endpoints, dims, digests and vectors, never a text and never an API key (an endpoint never holds
credentials: the client refuses a base URL with them). Rows stored are copied into blocks of
``write_rows`` (512 by default: 2 MiB at 1,024 dims), each appended in one write once full;
their index entries are written every ``index_rows`` (32,768) rows. A block's memory is used
again once it is written: the job holds three (the one filling, the one being written, a
spare), never a joined copy. A crash (of the process or the machine) may lose what is not
indexed yet, but never corrupts the cache; ``flush`` and ``close`` write and index everything.
A second process may read and write the same files meanwhile, and sees what this one has
indexed.

All file work runs on one worker thread owned by the cache, so the event loop never waits on the
disk and the connection is only ever used by the thread that opened it; the index's transactions
run on a thread and a connection of their own, so that neither the writes after them nor lookups
wait for them. A write runs while the caller goes on (the next write waits for it); a ``lookup``
is one SELECT per 500 keys and one read per row found, and sees rows not yet written or indexed.
While only this object has written a target's entries (none when it opened, no other connection
has committed since), the SELECT asks only for the keys it may have written.
"""

from __future__ import annotations

import asyncio
import hashlib
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import numpy as np
import numpy.typing as npt

from ._cachestore import SCHEMA_VERSION, Block, CacheFiles
from ._decoder import all_finite
from ._direct import RawBuffer
from ._exceptions import ConfigError
from ._types import FloatArray

__all__ = [
    "KEY_BYTES",
    "SCHEMA_VERSION",
    "EmbeddingCache",
    "keys_of_normalised",
    "normalise",
    "normalise_all",
    "scope",
]

#: Bytes of a key: 128 bits make a collision among even 10**12 texts vanishingly unlikely.
KEY_BYTES = 16

_WRITE_ROWS = 512
_INDEX_ROWS = 32_768

_SPARE_BUFFERS = 1  # a written block's memory, kept for the next one: the one filling next

_T = TypeVar("_T")

_hasher = partial(hashlib.blake2b, digest_size=KEY_BYTES)
_digest = hashlib.blake2b.digest


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


def normalise_all(texts: Sequence[str]) -> list[str]:
    """``normalise`` of each of ``texts``. A block of ASCII without a carriage return, the
    usual one, is only stripped: NFC and the line ends leave it as it is. Raises TypeError."""
    try:
        joined = "".join(texts)
    except TypeError:
        joined = "\r"  # not all texts: normalise says which
    if joined.isascii() and "\r" not in joined:
        return list(map(str.strip, texts))
    return [normalise(text) for text in texts]


def keys_of_normalised(texts: Sequence[str]) -> list[bytes]:
    """:meth:`EmbeddingCache.keys` of texts already normalised (the engine's intake normalises
    each block once, for the request and the key alike), without doing it again."""
    try:  # the usual texts: encoded by a C call each, without a Python step per text
        data = list(map(str.encode, texts))
    except UnicodeEncodeError:  # a lone surrogate: still a key
        data = [text.encode("utf-8", "surrogatepass") for text in texts]
    return list(map(_digest, map(_hasher, data)))


class EmbeddingCache:
    """Vectors already embedded, keyed by (model, dims, hash of the normalised text).

    Opening creates ``path`` (and its vectors file, ``path`` + ``-vectors``) if need be (not
    their directory); it blocks for the few milliseconds the open takes, or while another
    process or cache holds the file locked (jobs started together creating it), for up to
    30 s. Raises ConfigError naming ``path`` when it cannot be opened or created (locked all
    that time, say), is not an sfembed cache, or has a newer schema version. An async context
    manager that closes.

    Rows are written in blocks of ``write_rows`` (1: every row as it is stored), and their
    index entries once ``index_rows`` rows are written.

    Counters, over the cache's life: ``hits`` and ``misses`` count the keys of each ``lookup``
    (a key given twice counts twice), ``stored`` the rows kept by ``store``.
    """

    def __init__(
        self, path: str | Path, *, write_rows: int = _WRITE_ROWS, index_rows: int = _INDEX_ROWS
    ) -> None:
        for name, value in (("write_rows", write_rows), ("index_rows", index_rows)):
            if value < 1:
                raise ConfigError(f"embedding cache: {name} must be at least 1, not {value}")
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self._gathering = _Gathering(write_rows)
        self._writing: asyncio.Future[None] | None = None  # the write under way, if any
        self._closing: asyncio.Future[None] | None = None
        self._files: CacheFiles | None = None  # used on the worker thread only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfembed-cache")
        try:
            opening = partial(CacheFiles, self.path, index_rows=index_rows)
            self._files = self._worker.submit(opening).result()
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
        return keys_of_normalised(normalise_all(texts))

    async def lookup(self, model: str, dims: int, keys: Sequence[bytes]) -> dict[bytes, FloatArray]:
        """The stored vectors of ``keys`` for ``model`` at ``dims``: hits only, by key.

        Each value is a read-only float32 row of length ``dims`` (copy it to change it); an entry
        whose row is not whole or not what was stored (a damaged file, a torn write) counts as
        a miss. Raises ValueError for a bad ``model``, ``dims`` or key, or when closed; OSError
        or sqlite3.Error when the disk refuses.
        """
        _check_target(model, dims)
        _check_keys(keys)
        if not keys:
            return {}
        found, hits = await self._run(partial(self._lookup, model, dims, list(keys)))
        if len(found) < len(keys) and self._gathering.find(model, dims, keys, found):
            hits = sum(map(found.__contains__, keys))  # a key given twice counts twice
        self.hits += hits
        self.misses += len(keys) - hits
        return found

    async def store(self, model: str, dims: int, keys: Sequence[bytes], rows: FloatArray) -> None:
        """Keep row i of ``rows`` under ``keys[i]`` for ``model`` at ``dims``, copied into the
        block being filled and written with it once ``write_rows`` are gathered (see
        :meth:`flush`).

        A row holding a NaN (a failed input) or an infinity is skipped: failures are never cached.
        An existing entry, or a key given twice, is replaced by the later row. Raises ValueError
        when ``rows`` is not (len(keys), dims), for a bad ``model``, ``dims`` or key, or when
        closed; OSError or sqlite3.Error when the disk refused an earlier write.
        """
        self._check_rows(model, dims, keys, rows)
        if not all_finite(rows):
            finite: npt.NDArray[np.bool_] = np.all(np.isfinite(rows), axis=1)
            keys = [key for key, keep in zip(keys, finite.tolist(), strict=True) if keep]
            rows = rows[finite]
        await self._keep(model, dims, keys, rows)

    async def _store_decoded(
        self, model: str, dims: int, keys: Sequence[bytes], rows: FloatArray
    ) -> None:
        """:meth:`store` of a decoded answer's rows, for the engine: the decoder has refused
        any answer holding a NaN or an infinity, so they are not looked for again (two passes
        over the rows, 0.7-1.4 us a row of 1,024 dims on a loaded machine)."""
        self._check_rows(model, dims, keys, rows)
        await self._keep(model, dims, keys, rows)

    def _check_rows(self, model: str, dims: int, keys: Sequence[bytes], rows: FloatArray) -> None:
        _check_target(model, dims)
        _check_keys(keys)
        if rows.ndim != 2 or rows.shape != (len(keys), dims):
            raise ValueError(f"rows of shape {rows.shape} for {len(keys)} keys of {dims} dims")
        if self._closing is not None:
            raise ValueError(f"embedding cache {str(self.path)!r} is closed")

    async def _keep(self, model: str, dims: int, keys: Sequence[bytes], rows: FloatArray) -> None:
        if not keys:
            return
        # Copied before any wait: the caller may reuse its buffer, or be cancelled, meanwhile.
        self._gathering.add(model, dims, list(keys), rows)
        self.stored += len(keys)
        if self._gathering.full:
            await self._write(index=False)

    async def flush(self) -> None:
        """Write and index every row gathered by :meth:`store`. The write goes on if the caller
        is cancelled. Raises OSError or sqlite3.Error when the disk refuses."""
        await self._write(index=True)
        assert self._writing is not None
        await asyncio.shield(self._writing)

    async def _write(self, *, index: bool) -> None:
        """Hand the gathered rows to the worker, once the write before has ended (raising its
        error, if it failed); with ``index``, their index entries are written too."""
        while self._writing is not None and not self._writing.done():
            await asyncio.shield(self._writing)  # another caller may start one meanwhile
        if self._writing is not None:
            self._writing.result()  # a failed write's error, to every later caller
            self._gathering.written()
        blocks = self._gathering.hand(filling=index)
        if not blocks and not index:
            return
        self._writing = self._submit(partial(self._append, blocks, index))

    async def close(self) -> None:
        """Write and index what is gathered and close the files, after any work already queued;
        later calls only wait for it.

        Cancelling the caller does not stop the close. Raises OSError or sqlite3.Error if the
        last write or the close fails.
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
            self._closing = self._submit(self._close)
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
        return await self._submit(work)

    def _submit(self, work: Callable[[], _T]) -> asyncio.Future[_T]:
        return asyncio.get_running_loop().run_in_executor(self._worker, work)

    # --- on the worker thread ---------------------------------------------------------------

    def _lookup(
        self, model: str, dims: int, keys: list[bytes]
    ) -> tuple[dict[bytes, FloatArray], int]:
        """(vectors found by key, how many of ``keys`` were found)."""
        unique = list(dict.fromkeys(keys))
        found = self._opened().lookup(model, dims, unique)
        if not found:  # a new job's keys: none found, and no step per key to count them
            return found, 0
        hits = len(keys) if len(found) == len(unique) else sum(map(found.__contains__, keys))
        return found, hits

    def _append(self, blocks: list[Block], index: bool) -> None:
        files = self._opened()
        if blocks:
            files.append(blocks)
        if index:
            files.commit()

    def _close(self) -> None:
        files, self._files = self._files, None
        if files is not None:
            files.close()

    def _opened(self) -> CacheFiles:
        if self._files is None:  # only if work slipped in after close; _run refuses new ones
            raise ValueError(f"embedding cache {str(self.path)!r} is closed")
        return self._files


class _Gathering:
    """The rows stored but not yet handed to the cache's worker (a lookup sees them), in blocks
    of ``write_rows``: the block being filled for each (model, dims), the full ones, and the
    ones handed to the write under way, whose memory is used again once it is written."""

    __slots__ = ("_filling", "_full", "_handed", "_spare", "_write_rows")

    def __init__(self, write_rows: int) -> None:
        self._write_rows = write_rows
        self._filling: dict[tuple[str, int], Block] = {}
        self._full: list[Block] = []
        self._handed: list[Block] = []
        self._spare: list[RawBuffer] = []

    @property
    def full(self) -> bool:
        """Whether a block is full, waiting to be written."""
        return bool(self._full)

    def add(self, model: str, dims: int, keys: list[bytes], rows: FloatArray) -> None:
        """Copy ``rows`` into the block being filled, and the next ones as each fills."""
        start = 0
        while start < len(keys):
            block = self._filling.get((model, dims))
            if block is None:
                spare = self._spare.pop() if self._spare else None
                block = self._filling[(model, dims)] = Block(model, dims, self._write_rows, spare)
            end = start + min(block.room(), len(keys) - start)
            block.add(keys[start:end], rows[start:end])
            start = end
            if not block.room():
                self._full.append(self._filling.pop((model, dims)))

    def find(
        self, model: str, dims: int, keys: Sequence[bytes], found: dict[bytes, FloatArray]
    ) -> bool:
        """Add to ``found`` the latest row gathered of each of ``keys`` not in it yet; whether
        there was any."""
        unfound = set(keys).difference(found)
        gathered = False
        for block in self._blocks(model, dims):  # the latest first: a key's latest row
            held = block.held(unfound)
            if held:
                found.update((key, block.row(key)) for key in held)
                unfound -= held
                gathered = True
        return gathered

    def _blocks(self, model: str, dims: int) -> list[Block]:
        """The blocks not yet handed to the worker for (model, dims), the latest first."""
        blocks = [b for b in reversed(self._full) if b.model == model and b.dims == dims]
        filling = self._filling.get((model, dims))
        return [filling, *blocks] if filling is not None else blocks

    def hand(self, *, filling: bool) -> list[Block]:
        """The full blocks (with ``filling``, the ones being filled too), handed to a write."""
        blocks, self._full = self._full, []
        if filling:
            blocks.extend(self._filling.values())
            self._filling = {}
        self._handed = blocks
        return blocks

    def written(self) -> None:
        """The blocks last handed are written: keep their memory for the next ones."""
        for block in self._handed:
            if len(self._spare) < _SPARE_BUFFERS:
                self._spare.append(block.buffer)
        self._handed = []


def _check_target(model: str, dims: int) -> None:
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string, not {model!r}")
    if isinstance(dims, bool) or not isinstance(dims, int) or dims <= 0:
        raise ValueError(f"dims must be a positive integer, not {dims!r}")


def _check_keys(keys: Sequence[bytes]) -> None:
    # A text passed by mistake would otherwise be stored as a key: refuse it, and never echo it.
    if set(map(type, keys)) <= {bytes} and set(map(len, keys)) <= {KEY_BYTES}:
        return  # all good, found without a Python step per key
    for key in keys:
        if type(key) is not bytes or len(key) != KEY_BYTES:
            given = f"{len(key)} bytes" if type(key) is bytes else f"a {type(key).__name__}"
            raise ValueError(
                f"a key must be the {KEY_BYTES}-byte digest from EmbeddingCache.key, not {given}"
            )
