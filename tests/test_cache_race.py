"""Jobs started together share the cache beside them: processes, and caches in one process,
that create or open the same new cache at the same moment all open it, and end with one
consistent file holding every row each stored. A lock held past the busy timeout is a
ConfigError naming the cache, never a bare sqlite3 error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sfembed import _cachestore
from sfembed._cache import SCHEMA_VERSION, EmbeddingCache
from sfembed._cachestore import vectors_path
from sfembed._exceptions import ConfigError

MODEL = "BAAI/bge-m3"
DIMS = 8
OPENERS = 4  # processes opening each new cache at once
ROUNDS = 60  # new caches, each opened by every process at once

# Each line read is the path of a new cache: open it, store one row under this opener's own
# text, close, and answer "ok" or the error. The parent writes the line to every opener at
# once, so that they open the file together.
_OPENER = """
import asyncio, sys
import numpy as np
from sfembed._cache import EmbeddingCache

async def main(path, name):
    async with EmbeddingCache(path) as cache:
        await cache.store(sys.argv[1], 8, [EmbeddingCache.key(name)], np.full((1, 8), 1.0, "f4"))

for line in sys.stdin:
    try:
        asyncio.run(main(line.strip(), sys.argv[2]))
        answer = "ok"
    except Exception as error:
        answer = f"{type(error).__module__}.{type(error).__name__}: {error}"
    print(answer.replace(chr(10), " "), flush=True)
"""


def _consistent(path: Path, names: list[str]) -> None:
    """One sfembed cache of the current version, in WAL, holding a row of each of ``names``."""
    with sqlite3.connect(path) as db:
        meta = sorted(db.execute("SELECT name, value FROM meta"))
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    db.close()
    assert meta == [("format", "sfembed embedding cache"), ("schema_version", str(SCHEMA_VERSION))]
    assert mode == "wal"
    assert vectors_path(path).stat().st_size == len(names) * DIMS * 4

    async def rows() -> dict[bytes, np.ndarray]:
        async with EmbeddingCache(path) as cache:
            return await cache.lookup(MODEL, DIMS, [EmbeddingCache.key(n) for n in names])

    found = asyncio.run(rows())
    assert len(found) == len(names)
    assert all(np.array_equal(row, np.ones(DIMS, np.float32)) for row in found.values())


def test_processes_creating_one_new_cache_at_once_all_open_it(tmp_path: Path) -> None:
    """Jobs started together (one per shard, say) in one folder all create its cache at once."""
    names = [f"opener {i}" for i in range(OPENERS)]
    program = [sys.executable, "-W", "error", "-c", _OPENER, MODEL]
    failed: dict[int, list[str]] = {}
    with contextlib.ExitStack() as stack:
        openers = [
            stack.enter_context(
                subprocess.Popen(
                    [*program, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            )
            for name in names
        ]
        for round_ in range(ROUNDS):
            line = f"{tmp_path / f'cache-{round_}.sqlite'}\n"
            for opener in openers:  # the path reaches every opener within microseconds
                assert opener.stdin is not None
                opener.stdin.write(line)
                opener.stdin.flush()
            answers = []
            for opener in openers:
                assert opener.stdout is not None
                answers.append(opener.stdout.readline().strip())
            errors = [answer for answer in answers if answer != "ok"]
            if errors:
                failed[round_] = errors
        for opener in openers:  # end of input: each opener ends (and is waited for on exit)
            assert opener.stdin is not None
            opener.stdin.close()
    assert failed == {}, f"{len(failed)} of {ROUNDS} rounds failed: {failed}"
    for round_ in range(ROUNDS):
        _consistent(tmp_path / f"cache-{round_}.sqlite", names)


def _open_together(path: Path, names: list[str]) -> list[BaseException]:
    """Open a cache on ``path`` per name, each on a thread of its own, all at once; each
    stores a row under its name. The errors raised."""
    together = threading.Barrier(len(names))
    errors: list[BaseException] = []

    async def store(name: str) -> None:
        together.wait()
        async with EmbeddingCache(path) as cache:
            key = [EmbeddingCache.key(name)]
            await cache.store(MODEL, DIMS, key, np.ones((1, DIMS), np.float32))

    def run(name: str) -> None:
        try:
            asyncio.run(store(name))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_caches_on_one_new_path_in_one_process_all_open_it(tmp_path: Path) -> None:
    """Two caches of one process on one path (two jobs in one program), opened at once."""
    for round_ in range(10):
        path = tmp_path / f"cache-{round_}.sqlite"
        assert _open_together(path, ["first", "second"]) == []
        _consistent(path, ["first", "second"])


def _half_made(path: Path) -> None:
    """A cache as another creator leaves it just before it switches the file to WAL: the
    tables made, the journal still SQLite's default."""
    asyncio.run(EmbeddingCache(path).close())
    with sqlite3.connect(path, isolation_level=None) as db:
        assert db.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    db.close()


@pytest.fixture
def waiting() -> Iterator[threading.Event]:
    """Set once an opener says it waits for another's lock."""
    event = threading.Event()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting" in record.getMessage():
                event.set()

    handler = Handler(logging.DEBUG)
    logger = logging.getLogger("sfembed")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield event
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_an_opener_waits_for_another_creator_switching_the_journal(
    tmp_path: Path, waiting: threading.Event
) -> None:
    """The race made certain: while another connection holds the write lock that a switch to
    WAL takes, SQLite refuses the opener's own switch at once, without its busy handler (a
    read lock asking for a write lock another holds: a deadlock, were both to wait). The
    opener waits and tries again, and opens the cache once the lock is let go."""
    path = tmp_path / "cache.sqlite"
    _half_made(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write lock another creator's switch holds
    outcome: list[BaseException | None] = []

    def open_cache() -> None:
        try:
            asyncio.run(EmbeddingCache(path).close())
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    opener = threading.Thread(target=open_cache)
    opener.start()
    try:
        while opener.is_alive() and not waiting.wait(0.01):
            pass  # until the opener has met the lock (or, failing, has given up)
    finally:
        other.execute("ROLLBACK")
        other.close()
        opener.join()
    assert outcome == [None]
    _consistent(path, [])


def test_a_lock_held_past_the_busy_timeout_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cachestore, "_BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "cache.sqlite"
    _half_made(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(ConfigError) as refused:
            EmbeddingCache(path)
    finally:
        other.execute("ROLLBACK")
        other.close()
    message = str(refused.value)
    assert repr(str(path)) in message
    assert "held it locked for the 0.2 s a cache waits (database is locked)" in message
    asyncio.run(EmbeddingCache(path).close())  # once let go, it opens
    _consistent(path, [])


def test_an_older_creator_never_lowers_the_schema_version(tmp_path: Path) -> None:
    """Of two creators at once, the later to write may be an older sfembed: the version stays
    the newer one's, and the older then refuses the file rather than misread it."""
    path = tmp_path / "cache.sqlite"
    asyncio.run(EmbeddingCache(path).close())
    newer = str(SCHEMA_VERSION + 1)
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (newer,))
        _cachestore._create(db)  # what a creator that found the file empty does next
        _cachestore._create(db, upgrade=True)  # and one that found version 1
        assert db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == (
            newer,
        )
    db.close()
    with pytest.raises(ConfigError, match=rf"schema version {newer}"):
        EmbeddingCache(path)
