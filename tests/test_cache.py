"""EmbeddingCache: keys follow the normalisation, entries round-trip and persist, failures are never
cached, the file holds no text, and cancellation or a second close leave it sound."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sfembed._cache import KEY_BYTES, SCHEMA_VERSION, EmbeddingCache, normalise
from sfembed._cachestore import Entries, Pending, VectorsFile, Written, vectors_path
from sfembed._direct import aligned_buffer
from sfembed._exceptions import ConfigError

MODEL = "BAAI/bge-m3"
DIMS = 8


def _rows(count: int, dims: int = DIMS, *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dims), dtype=np.float32)


def _keys(count: int, prefix: str = "text") -> list[bytes]:
    return [EmbeddingCache.key(f"{prefix} {i}") for i in range(count)]


async def _settled(cache: EmbeddingCache) -> None:
    """Once the index's transactions under way are committed."""
    files = cache._files
    assert files is not None
    await cache._run(files.settle)


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[EmbeddingCache]:
    async with EmbeddingCache(tmp_path / "cache.sqlite") as opened:
        yield opened


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("caf\u00e9", "cafe\u0301"),  # NFC and NFD
        ("\u00c5ngstr\u00f6m", "A\u030angstro\u0308m"),
        ("line one\r\nline two", "line one\nline two"),
        ("line one\rline two", "line one\nline two"),
        ("a\r\n\r\nb", "a\n\nb"),
        ("  padded text\t\n", "padded text"),
        ("\u00a0\u3000wide\u2028", "wide"),  # NBSP, ideographic space, line separator
        ("\r\n", ""),
    ],
)
def test_equivalent_texts_share_a_key(one: str, other: str) -> None:
    assert normalise(one) == normalise(other)
    assert EmbeddingCache.key(one) == EmbeddingCache.key(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("a b", "a  b"),  # inner whitespace is kept
        ("a b", "a\tb"),
        ("a b", "a\nb"),
        ("Hello", "hello"),  # case is kept
        ("caf\u00e9", "cafe"),
        ("\ufb01le", "file"),  # a compatibility ligature: NFKC would merge these, NFC does not
    ],
)
def test_different_texts_have_different_keys(one: str, other: str) -> None:
    assert EmbeddingCache.key(one) != EmbeddingCache.key(other)


async def test_keys_are_digests_of_the_normalised_text(cache: EmbeddingCache) -> None:
    texts = ["plain ascii", "caf\u00e9", "  x\r\n", "", "\ud800 lone surrogate"]
    keys = cache.keys(texts)
    assert keys == [EmbeddingCache.key(text) for text in texts]
    assert all(type(key) is bytes and len(key) == KEY_BYTES for key in keys)
    assert len(set(keys)) == len(texts)
    plain = ["plain ascii", " padded\r\n", "x"]  # a block of ASCII alone, the usual one
    assert cache.keys(plain) == [EmbeddingCache.key(text) for text in plain]


def test_key_refuses_what_is_not_text() -> None:
    with pytest.raises(TypeError, match="texts only"):
        EmbeddingCache.key([1, 2, 3])  # type: ignore[arg-type]


# --- round trip and isolation -------------------------------------------------------------


async def test_stored_rows_round_trip(cache: EmbeddingCache) -> None:
    keys, rows = _keys(5), _rows(5)
    await cache.store(MODEL, DIMS, keys, rows)
    found = await cache.lookup(MODEL, DIMS, [*keys, EmbeddingCache.key("never stored")])
    assert set(found) == set(keys)
    for key, row in zip(keys, rows, strict=True):
        assert found[key].dtype == np.float32
        assert found[key].shape == (DIMS,)
        assert np.array_equal(found[key], row)
    assert (cache.hits, cache.misses, cache.stored) == (5, 1, 5)


async def test_lookup_counts_each_key_given(cache: EmbeddingCache) -> None:
    keys = _keys(2)
    await cache.store(MODEL, DIMS, keys, _rows(2))
    found = await cache.lookup(MODEL, DIMS, [keys[0], keys[0], keys[1], _keys(1, "new")[0]])
    assert len(found) == 2
    assert (cache.hits, cache.misses) == (3, 1)


async def test_model_and_dims_isolate_entries(cache: EmbeddingCache) -> None:
    keys = _keys(3)
    await cache.store(MODEL, DIMS, keys, _rows(3, seed=1))
    await cache.store("Qwen/Qwen3-Embedding-8B", DIMS, keys, _rows(3, seed=2))
    await cache.store(MODEL, 4, keys, _rows(3, 4, seed=3))
    assert await cache.lookup("netease-youdao/bce-embedding-base_v1", DIMS, keys) == {}
    assert await cache.lookup(MODEL, 16, keys) == {}
    mine = await cache.lookup(MODEL, DIMS, keys)
    theirs = await cache.lookup("Qwen/Qwen3-Embedding-8B", DIMS, keys)
    short = await cache.lookup(MODEL, 4, keys)
    assert np.array_equal(mine[keys[0]], _rows(3, seed=1)[0])
    assert np.array_equal(theirs[keys[0]], _rows(3, seed=2)[0])
    assert short[keys[0]].shape == (4,)


async def test_failed_rows_are_never_stored(cache: EmbeddingCache) -> None:
    keys, rows = _keys(4), _rows(4)
    rows[1] = np.nan
    rows[2, 3] = np.nan  # one NaN is enough to mark the row failed
    rows[3, 0] = np.inf
    await cache.store(MODEL, DIMS, keys, rows)
    assert list(await cache.lookup(MODEL, DIMS, keys)) == [keys[0]]
    assert cache.stored == 1


async def test_a_decoded_answer_is_stored_after_every_check_but_the_finite_one(
    cache: EmbeddingCache,
) -> None:
    """The engine stores answers the decoder has checked finite: the cache keeps them with the
    other checks of ``store``, not the pass over every value."""
    keys, rows = _keys(3), _rows(3)
    await cache._store_decoded(MODEL, DIMS, keys, rows)
    found = await cache.lookup(MODEL, DIMS, keys)
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))
    assert cache.stored == 3
    with pytest.raises(ValueError, match="rows of shape"):
        await cache._store_decoded(MODEL, DIMS, keys, rows[:2])
    with pytest.raises(ValueError, match="digest"):
        await cache._store_decoded(MODEL, DIMS, [b"short"], rows[:1])
    with pytest.raises(ValueError, match="model"):
        await cache._store_decoded("", DIMS, keys, rows)
    await cache.close()
    with pytest.raises(ValueError, match="closed"):
        await cache._store_decoded(MODEL, DIMS, keys, rows)


async def test_existing_and_repeated_keys_are_replaced(cache: EmbeddingCache) -> None:
    key = _keys(1)[0]
    await cache.store(MODEL, DIMS, [key], _rows(1, seed=1))
    await cache.store(MODEL, DIMS, [key, key], _rows(2, seed=2))
    found = await cache.lookup(MODEL, DIMS, [key])
    assert np.array_equal(found[key], _rows(2, seed=2)[1])  # the last row given wins


async def test_store_converts_other_float_types(cache: EmbeddingCache) -> None:
    keys, rows = _keys(2), _rows(2).astype(np.float64)
    await cache.store(MODEL, DIMS, keys, rows)  # type: ignore[arg-type]
    found = await cache.lookup(MODEL, DIMS, keys)
    assert np.array_equal(found[keys[1]], rows[1].astype(np.float32))


async def test_lookup_of_5000_keys_spans_several_statements(cache: EmbeddingCache) -> None:
    # 5,000 keys exceed SQLite's variable limit of old versions (999) many times over.
    keys, rows = _keys(5000), _rows(5000, 4)
    await cache.store(MODEL, 4, keys[::2], rows[::2])
    found = await cache.lookup(MODEL, 4, keys)
    assert len(found) == 2500
    assert all(
        np.array_equal(found[key], row) for key, row in zip(keys[::2], rows[::2], strict=True)
    )
    assert (cache.hits, cache.misses) == (2500, 2500)


async def test_empty_calls_do_nothing(cache: EmbeddingCache) -> None:
    assert await cache.lookup(MODEL, DIMS, []) == {}
    await cache.store(MODEL, DIMS, [], np.empty((0, DIMS), np.float32))
    assert (cache.hits, cache.misses, cache.stored) == (0, 0, 0)


async def test_concurrent_calls_are_served_in_order(cache: EmbeddingCache) -> None:
    keys, rows = _keys(40), _rows(40)
    stores = [
        asyncio.create_task(cache.store(MODEL, DIMS, keys[i : i + 8], rows[i : i + 8]))
        for i in range(0, 40, 8)
    ]
    lookup = asyncio.create_task(cache.lookup(MODEL, DIMS, keys))  # started after the stores
    await asyncio.gather(*stores)
    assert len(await lookup) == 40


# --- validation ---------------------------------------------------------------------------


async def test_store_refuses_rows_of_the_wrong_shape(cache: EmbeddingCache) -> None:
    keys = _keys(3)
    for rows in (_rows(2), _rows(3, DIMS + 1), _rows(3)[0]):
        with pytest.raises(ValueError, match="shape"):
            await cache.store(MODEL, DIMS, keys, rows)
    assert cache.stored == 0


async def test_keys_must_be_digests_and_are_never_echoed(cache: EmbeddingCache) -> None:
    secret = "a text that must not appear in an error message"
    for bad in ([secret], [secret.encode()], [b"short"]):
        with pytest.raises(ValueError, match="digest") as raised:
            await cache.store(MODEL, DIMS, bad, _rows(1))  # type: ignore[arg-type]
        assert secret not in str(raised.value)
        with pytest.raises(ValueError, match="digest"):
            await cache.lookup(MODEL, DIMS, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("model", "dims"), [("", DIMS), (MODEL, 0), (MODEL, -1), (MODEL, True)])
async def test_bad_model_or_dims_are_refused(cache: EmbeddingCache, model: str, dims: int) -> None:
    with pytest.raises(ValueError, match=r"model|dims"):
        await cache.lookup(model, dims, _keys(1))
    with pytest.raises(ValueError, match=r"model|dims"):
        await cache.store(model, dims, _keys(1), _rows(1, max(int(dims), 1)))


# --- the file -----------------------------------------------------------------------------


async def test_entries_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(10), _rows(10)
    async with EmbeddingCache(path) as cache:
        await cache.store(MODEL, DIMS, keys, rows)
    async with EmbeddingCache(str(path)) as cache:
        found = await cache.lookup(MODEL, DIMS, keys)
    assert all(np.array_equal(found[key], row) for key, row in zip(keys, rows, strict=True))


async def test_the_index_holds_each_key_as_a_blob_of_its_16_bytes(tmp_path: Path) -> None:
    """As every version of the index wrote them (the keys are bound as bytearrays, not bytes),
    so that a file written by one version is read by another."""
    path = tmp_path / "cache.sqlite"
    keys = [*_keys(300), bytes(16), b"\xff" * 15 + b"\x00", b"\x00" * 15 + b"\x01"]
    async with EmbeddingCache(path) as cache:
        await cache.store(MODEL, DIMS, keys, _rows(len(keys)))
    with sqlite3.connect(path) as other:
        stored = other.execute("SELECT key, typeof(key), length(key) FROM entries").fetchall()
    other.close()
    assert sorted(key for key, _, _ in stored) == sorted(keys)
    assert {(kind, size) for _, kind, size in stored} == {("blob", 16)}


async def test_the_file_is_wal_with_a_schema_version(cache: EmbeddingCache) -> None:
    with sqlite3.connect(cache.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        meta = dict(other.execute("SELECT name, value FROM meta"))
    other.close()
    assert meta["schema_version"] == str(SCHEMA_VERSION) == "2"
    assert vectors_path(cache.path) == cache.path.with_name("cache.sqlite-vectors")
    assert vectors_path(cache.path).is_file()


async def test_two_caches_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys = _keys(3)
    async with EmbeddingCache(path) as writer, EmbeddingCache(path) as reader:
        await writer.store(MODEL, DIMS, keys, _rows(3))
        assert await reader.lookup(MODEL, DIMS, keys) == {}  # gathered, not yet written
        await writer.flush()
        assert len(await reader.lookup(MODEL, DIMS, keys)) == 3


async def test_two_writers_append_without_overwriting_each_other(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(60), _rows(60)
    async with EmbeddingCache(path, write_rows=3) as one, EmbeddingCache(path, write_rows=4) as two:
        for start in range(0, 60, 10):  # interleaved blocks of both, each appended on its own
            await one.store(MODEL, DIMS, keys[start : start + 5], rows[start : start + 5])
            await two.store(MODEL, DIMS, keys[start + 5 : start + 10], rows[start + 5 : start + 10])
        await one.flush()
        await two.flush()
    async with EmbeddingCache(path) as reader:
        found = await reader.lookup(MODEL, DIMS, keys)
    assert len(found) == 60
    assert all(np.array_equal(found[key], row) for key, row in zip(keys, rows, strict=True))


async def test_rows_are_written_in_blocks_and_indexed_in_larger_ones(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(10), _rows(10)
    vectors = vectors_path(path)
    async with (
        EmbeddingCache(path, write_rows=2, index_rows=4) as writer,
        EmbeddingCache(path) as reader,
    ):
        await writer.store(MODEL, DIMS, keys[:1], rows[:1])
        assert await reader.lookup(MODEL, DIMS, keys) == {}
        assert len(await writer.lookup(MODEL, DIMS, keys)) == 1  # its own gathered row
        assert vectors.stat().st_size == 0
        await writer.store(MODEL, DIMS, keys[1:3], rows[1:3])  # a block of 2 written, not indexed
        assert len(await writer.lookup(MODEL, DIMS, keys)) == 3  # runs after the write
        assert vectors.stat().st_size == 2 * DIMS * 4  # the third row waits in the next block
        assert await reader.lookup(MODEL, DIMS, keys) == {}  # not indexed yet
        await writer.store(MODEL, DIMS, keys[3:5], rows[3:5])  # 4 >= 4 written: indexed
        await writer.lookup(MODEL, DIMS, keys[:1])  # waits for the write queued before it
        await _settled(writer)  # the transaction runs on its own thread
        found = await reader.lookup(MODEL, DIMS, keys)
        assert sorted(found) == sorted(keys[:4])
        assert all(np.array_equal(found[k], r) for k, r in zip(keys[:4], rows, strict=False))
        await writer.store(MODEL, DIMS, keys[5:], rows[5:])
    async with EmbeddingCache(path) as reopened:
        found = await reopened.lookup(MODEL, DIMS, keys)
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))
    for name in ("write_rows", "index_rows"):
        with pytest.raises(ConfigError, match=name):
            EmbeddingCache(path, **{name: 0})


async def test_lookups_find_every_row_across_many_blocks(tmp_path: Path) -> None:
    """Rows gathered, written but not indexed, indexed, and after a reopen: all found, each the
    row stored under its key."""
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(1000), _rows(1000, 16)
    async with EmbeddingCache(path, write_rows=16, index_rows=100) as cache:
        for start in range(0, 1000, 7):
            await cache.store(MODEL, 16, keys[start : start + 7], rows[start : start + 7])
            if start % 140 == 0:
                seen = await cache.lookup(MODEL, 16, keys[: start + 7])
                assert len(seen) == start + 7 if start + 7 <= 1000 else 1000
        found = await cache.lookup(MODEL, 16, keys)
        assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))
    async with EmbeddingCache(path) as reopened:
        found = await reopened.lookup(MODEL, 16, keys[::-1])
    assert len(found) == 1000
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))


async def test_a_block_is_written_without_a_second_copy_of_its_rows(tmp_path: Path) -> None:
    """The arrays gathered are written one after the other, not joined first: a join would
    hold a second copy of the block (2 MiB here, 8 at the old default), which the allocator
    keeps after it is freed, so the job's peak memory crept up with every write."""
    dims, size = 1024, 64
    keys, rows = _keys(8 * size), _rows(8 * size, dims)
    block_bytes = rows.nbytes
    async with EmbeddingCache(tmp_path / "cache.sqlite", write_rows=8 * size) as cache:
        for start in range(0, 7 * size, size):  # gathered, not written yet
            await cache.store(MODEL, dims, keys[start : start + size], rows[start : start + size])
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            await cache.store(MODEL, dims, keys[7 * size :], rows[7 * size :])  # the write
            await cache.flush()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        found = await cache.lookup(MODEL, dims, keys)
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))
    # The last request's own copy (1/8 of the block) and the index entries; never the block.
    assert peak - before < block_bytes / 2


async def test_full_blocks_are_written_directly_and_a_partial_one_is_padded_after(
    tmp_path: Path,
) -> None:
    """Rows of 3 KiB: a full block of 4 (12 KiB) is written directly where the file system takes
    direct writes; a partial one (3 KiB) through the page cache, which leaves the file's end off
    a 4 KiB boundary; the next full block pads it first. Every row is found, then and after a
    reopen."""
    path, dims = tmp_path / "cache.sqlite", 768
    keys, rows = _keys(9), _rows(9, dims)
    async with EmbeddingCache(path, write_rows=4) as cache:
        direct = cache._files is not None and cache._files.vectors.direct >= 0
        await cache.store(MODEL, dims, keys[:5], rows[:5])
        await cache.flush()  # a full block, then one row
        await cache.store(MODEL, dims, keys[5:], rows[5:])
        await cache.flush()
        found = await cache.lookup(MODEL, dims, keys)
        assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))
    row = dims * 4
    padded = 4 * 4096 if direct else 5 * row  # the sixth row's block starts on a boundary
    assert vectors_path(path).stat().st_size == padded + 4 * row
    async with EmbeddingCache(path) as reopened:
        found = await reopened.lookup(MODEL, dims, keys)
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))


def test_a_direct_write_refused_goes_through_the_page_cache(tmp_path: Path) -> None:
    vectors = VectorsFile(tmp_path / "vectors")
    try:
        first = aligned_buffer(8192 + 1)
        first[:] = 7
        misaligned = first[1:].data  # a length direct writes take, at an address they refuse
        assert vectors.append(misaligned) == 0
        assert vectors.append(misaligned) == 8192
        assert vectors.read(8192, [0, 8192]) == [bytes(first[1:])] * 2
    finally:
        vectors.close()


def test_pending_entries_come_in_key_order_each_key_once_with_its_latest_row() -> None:
    pending = Pending()
    keys = [bytes([b]) * 16 for b in (0x80, 0x01, 0xFF, 0x7F)]
    pending.add(keys, 0, 32, np.array([1, 2, 3, 4]))
    pending.add(keys[:1], 128, 32, np.array([-5]))  # stored again: the later row counts
    assert len(pending) == 4
    assert pending.places([bytes(16), keys[0], keys[2]]) == {keys[0]: (128, -5), keys[2]: (64, 3)}
    assert pending.places([bytes(16)]) == {}
    # Rows added after a lookup are found by the next one, the latest of a key still first.
    pending.add([keys[2], keys[2]], 160, 32, np.array([6, 7]))
    assert pending.places([keys[2], keys[0]]) == {keys[2]: (192, 7), keys[0]: (128, -5)}
    assert len(pending) == 4
    assert _entry_rows(pending.sealed()) == [
        (keys[1], 32, 2),
        (keys[3], 96, 4),
        (keys[0], 128, -5),
        (keys[2], 192, 7),
    ]


def test_pending_entries_keep_the_latest_row_of_each_key_among_many() -> None:
    """The sort that picks each key's latest row, against a dict that keeps the last."""
    rng = np.random.default_rng(3)
    keys = _keys(200)
    pending = Pending()
    latest: dict[bytes, tuple[int, int]] = {}
    offset = 0
    for _ in range(6):
        picked = [keys[i] for i in rng.integers(0, len(keys), 300)]
        sums = rng.integers(-(2**62), 2**62, len(picked))
        pending.add(picked, offset, 32, sums)
        for i, key in enumerate(picked):
            latest[key] = (offset + 32 * i, int(sums[i]))
        offset += 32 * len(picked)
    assert len(pending) == len(latest)
    assert _entry_rows(pending.sealed()) == [(key, *latest[key]) for key in sorted(latest)]
    assert pending.places(keys) == latest


def _entry_rows(entries: Entries) -> list[tuple[bytes | bytearray | int, ...]]:
    """(key, offset, checksum) of each entry, from the values of its INSERTs."""
    rows: list[tuple[bytes | bytearray | int, ...]] = []
    for values in entries.values():
        assert len(values) % 3 == 0
        rows.extend(zip(values[0::3], values[1::3], values[2::3], strict=True))
    return rows


def test_entries_are_inserted_in_order_a_few_hundred_at_a_time() -> None:
    count = 1000  # three INSERTs of 256 rows and one of 232
    keys = _keys(count)
    pending = Pending()
    pending.add(keys, 0, 32, np.arange(count))
    entries = pending.sealed()
    assert [len(values) // 3 for values in entries.values()] == [256, 256, 256, 232]
    assert _entry_rows(entries) == sorted((key, i * 32, i) for i, key in enumerate(keys))


def test_entries_are_found_by_their_whole_key_trailing_zeros_included() -> None:
    keys = [bytes(16), bytes(15) + b"\x01", b"\x01" + bytes(15), b"\xff" * 15 + b"\x00"]
    pending = Pending()
    pending.add(keys, 0, 32, np.array([1, 2, 3, 4]))
    entries = pending.sealed()
    assert len(entries) == 4
    assert [key for key, _, _ in _entry_rows(entries)] == sorted(keys)
    # Bound as bytearrays: SQLite's module binds those without looking for an adapter.
    assert all(type(key) is bytearray and len(key) == 16 for key, _, _ in _entry_rows(entries))
    near = [b"\xff" * 16, b"\x00" * 14 + b"\x01\x00", b"\x02" + bytes(15)]  # none of them
    assert entries.places(near + keys[::-1]) == {
        keys[3]: (96, 4),
        keys[2]: (64, 3),
        keys[1]: (32, 2),
        keys[0]: (0, 1),
    }
    assert entries.places(near) == {}
    assert (
        Entries(*(np.array([], dtype) for dtype in ("S16", np.int64, np.int64))).places(keys) == {}
    )


async def test_a_transaction_under_way_holds_up_neither_writes_nor_lookups(tmp_path: Path) -> None:
    """The index is written on a thread of its own: while it is busy, rows are still written
    and found by their writer; another process finds them once the transaction commits."""
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(7), _rows(7)
    release = threading.Event()
    async with (
        EmbeddingCache(path, write_rows=2, index_rows=4) as writer,
        EmbeddingCache(path) as reader,
    ):
        assert writer._files is not None
        busy = writer._files.indexer._thread.submit(release.wait)
        try:
            await writer.store(MODEL, DIMS, keys[:4], rows[:4])  # a transaction's worth
            await writer.store(MODEL, DIMS, keys[4:], rows[4:])  # written behind it
            found = await writer.lookup(MODEL, DIMS, keys)
            assert sorted(found) == sorted(keys)
            assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))
            assert vectors_path(path).stat().st_size == 6 * DIMS * 4
            assert await reader.lookup(MODEL, DIMS, keys) == {}  # nothing committed yet
        finally:
            release.set()
        busy.result()
        await _settled(writer)
        assert sorted(await reader.lookup(MODEL, DIMS, keys)) == sorted(keys[:4])
    async with EmbeddingCache(path) as reopened:
        found = await reopened.lookup(MODEL, DIMS, keys)
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))


# --- probes of the index skipped for a new job's keys --------------------------------------


async def _probed(cache: EmbeddingCache) -> list[int]:
    """From now on, the number of keys in each SELECT of the index's entries."""
    files = cache._files
    assert files is not None
    counts: list[int] = []

    def trace(sql: str) -> None:
        if "FROM entries" in sql:
            counts.append(sql.lower().count("x'"))  # the keys, as blob literals

    await cache._run(lambda: files.db.set_trace_callback(trace))
    return counts


def test_the_filter_of_keys_written_holds_every_one_and_few_others() -> None:
    rng = np.random.default_rng(3)
    added = [rng.bytes(16) for _ in range(200_000)]
    others = [rng.bytes(16) for _ in range(100_000)]
    written = Written()
    assert written.possible(added[:10]) == []
    for start in range(0, len(added), 512):
        written.add(added[start : start + 512])
    assert written.possible(added) == added
    assert written.possible([]) == []
    false = len(written.possible(others))
    assert false < len(others) // 1000  # about 1 in 3,000 at 200,000 keys


def test_the_filter_keeps_every_bit_of_slots_that_share_a_byte() -> None:
    """Slots of one ``add`` in one byte of the filter (the first words of these keys differ
    only in their three lowest bits, the others are equal): each keeps its bit."""
    words = [np.array([bit, 99 + bit, 7, 0], "<u4").tobytes() for bit in range(8)]
    written = Written()
    written.add(words)
    assert int(written.bits[0]) == 0xFF
    assert written.possible(words) == words
    assert written.possible([np.array([8, 99, 7, 0], "<u4").tobytes()]) == []


async def test_a_new_job_asks_the_index_only_for_keys_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(300), _rows(300)
    async with EmbeddingCache(path, write_rows=16, index_rows=32) as cache:
        await cache.store(MODEL, DIMS, keys[:100], rows[:100])
        await cache.flush()  # every row indexed: found through the index
        probed = await _probed(cache)
        found = await cache.lookup(MODEL, DIMS, keys)
        assert sorted(found) == sorted(keys[:100])
        assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows[:100], strict=False))
        assert 100 <= sum(probed) < 110  # the 200 new keys, bar a false positive, not asked
        await cache.store("other-model", DIMS, keys[:1], rows[:1])
        await cache.flush()
        assert await cache.lookup("other-model", DIMS, keys[1:]) == {}
    async with EmbeddingCache(path) as reopened:  # rows already there: every key is asked
        probed = await _probed(reopened)
        found = await reopened.lookup(MODEL, DIMS, keys)
        assert sorted(found) == sorted(keys[:100])
        assert sum(probed) == 300


_SECOND_PROCESS = """
import asyncio, sys
import numpy as np
from sfembed._cache import EmbeddingCache

async def main():
    async with EmbeddingCache(sys.argv[1]) as cache:
        key = EmbeddingCache.key(sys.argv[2])
        await cache.store(sys.argv[3], 8, [key], np.full((1, 8), 7.0, np.float32))

asyncio.run(main())
"""


def _store_in_another_process(path: Path, text: str, model: str = MODEL) -> None:
    program = [sys.executable, "-W", "error", "-c", _SECOND_PROCESS, str(path), text, model]
    subprocess.run(program, check=True, timeout=60)


@pytest.mark.parametrize("ours", ["none", "indexed", "gathered"])
async def test_a_row_another_process_stores_after_this_one_opened_is_found(
    tmp_path: Path, ours: str
) -> None:
    """Whether this process wrote nothing, rows it indexed, or rows it has not indexed yet:
    the index now holds a key it did not write, and every lookup asks for it."""
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(40), _rows(40)
    async with EmbeddingCache(path, write_rows=4, index_rows=8) as cache:
        if ours != "none":
            await cache.store(MODEL, DIMS, keys, rows)
            if ours == "indexed":
                await cache.flush()
        assert await cache.lookup(MODEL, DIMS, [EmbeddingCache.key("theirs")]) == {}
        await asyncio.to_thread(_store_in_another_process, path, "theirs")
        found = await cache.lookup(MODEL, DIMS, [EmbeddingCache.key("theirs"), *keys])
        assert np.array_equal(found.pop(EmbeddingCache.key("theirs")), np.full(8, 7.0))
        assert len(found) == (0 if ours == "none" else 40)
        await cache.store(MODEL, DIMS, _keys(20, "more"), _rows(20, seed=1))
        await cache.flush()  # after a transaction of ours, still asked
        await asyncio.to_thread(_store_in_another_process, path, "theirs too")
        found = await cache.lookup(MODEL, DIMS, [EmbeddingCache.key("theirs too")])
        assert list(found) == [EmbeddingCache.key("theirs too")]


async def test_a_target_another_process_fills_after_this_one_opened_is_asked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cache.sqlite"
    async with EmbeddingCache(path, write_rows=4, index_rows=8) as cache:
        await cache.store(MODEL, DIMS, _keys(8), _rows(8))
        await cache.flush()
        key = EmbeddingCache.key("theirs")
        assert await cache.lookup("their-model", DIMS, [key]) == {}
        await asyncio.to_thread(_store_in_another_process, path, "theirs", "their-model")
        assert list(await cache.lookup("their-model", DIMS, [key])) == [key]


def _file_bytes(path: Path) -> bytes:
    """The database, its WAL (gone after a clean close) and the vectors, as one byte string."""
    parts = [path, path.with_name(path.name + "-wal"), vectors_path(path)]
    return b"".join(part.read_bytes() for part in parts if part.exists())


async def test_the_file_holds_no_text(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    texts = [f"Zanzibar-quokka-7 distinctive input number {i}" for i in range(50)]
    rows = _rows(50)
    async with EmbeddingCache(path) as cache:
        await cache.store(MODEL, DIMS, cache.keys(texts), rows)
        await cache.flush()
        assert len(await cache.lookup(MODEL, DIMS, cache.keys(texts))) == 50
        while_open = _file_bytes(path)
    after_close = _file_bytes(path)
    for content in (while_open, after_close):
        assert b"Zanzibar-quokka" not in content
        assert "Zanzibar-quokka".encode("utf-16-le") not in content
        # The search sees what is there: the model name and the vectors are found.
        assert MODEL.encode() in content
        assert rows[17].tobytes() in content


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


async def _stored(path: Path, count: int) -> tuple[list[bytes], np.ndarray]:
    keys, rows = _keys(count), _rows(count)
    async with EmbeddingCache(path) as cache:
        await cache.store(MODEL, DIMS, keys, rows)
    return keys, rows


async def test_a_torn_tail_is_a_miss_never_a_vector(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = await _stored(path, 4)
    vectors = vectors_path(path)
    size = DIMS * 4
    assert vectors.stat().st_size == 4 * size
    os.truncate(vectors, 3 * size + size // 2)  # a crash wrote half of the last row
    async with EmbeddingCache(path) as cache:
        found = await cache.lookup(MODEL, DIMS, keys)
        assert sorted(found) == sorted(keys[:3])
        assert all(np.array_equal(found[k], r) for k, r in zip(keys[:3], rows, strict=False))
        await cache.store(MODEL, DIMS, keys[3:], rows[3:])  # the row is stored again, whole
        await cache.flush()
        assert np.array_equal((await cache.lookup(MODEL, DIMS, keys[3:]))[keys[3]], rows[3])
    async with EmbeddingCache(path) as cache:
        assert len(await cache.lookup(MODEL, DIMS, keys)) == 4


@pytest.mark.parametrize("damage", ["zeros", "another row", "garbage"])
async def test_a_row_that_is_not_what_was_stored_is_a_miss(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = await _stored(path, 3)
    size = DIMS * 4
    replacement = {
        "zeros": bytes(size),  # pages a machine crash left unwritten read as zeros
        "another row": rows[2].tobytes(),
        "garbage": bytes(range(size)),
    }[damage]
    _overwrite(vectors_path(path), size, replacement)  # the second row
    async with EmbeddingCache(path) as cache:
        found = await cache.lookup(MODEL, DIMS, keys)
        assert sorted(found) == sorted([keys[0], keys[2]])
        assert (cache.hits, cache.misses) == (2, 1)
        await cache.store(MODEL, DIMS, keys[1:2], rows[1:2])  # a store mends it
        found = await cache.lookup(MODEL, DIMS, keys)
    assert np.array_equal(found[keys[1]], rows[1])


async def test_a_lost_vectors_file_is_misses_and_a_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = await _stored(path, 3)
    vectors_path(path).unlink()
    async with EmbeddingCache(path) as cache:
        assert await cache.lookup(MODEL, DIMS, keys) == {}
        await cache.store(MODEL, DIMS, keys, rows)
    async with EmbeddingCache(path) as cache:
        found = await cache.lookup(MODEL, DIMS, keys)
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))


def _version_one_cache(path: Path, keys: list[bytes], rows: np.ndarray) -> None:
    """A cache as schema version 1 wrote it: the vectors inside SQLite."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA page_size = 65536")
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute(
            "CREATE TABLE vectors (model TEXT NOT NULL, dims INTEGER NOT NULL, key BLOB NOT NULL, "
            "vector BLOB NOT NULL, PRIMARY KEY (model, dims, key))"
        )
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("format", "sfembed embedding cache"), ("schema_version", "1")],
        )
        db.executemany(
            "INSERT INTO vectors VALUES (?, ?, ?, ?)",
            [
                (MODEL, DIMS, key, row.astype("<f4").tobytes())
                for key, row in zip(keys, rows, strict=True)
            ],
        )
        db.execute("UPDATE vectors SET vector = x'0000' WHERE key = ?", (keys[-1],))  # damaged
    db.close()


async def test_a_version_one_cache_is_upgraded_and_its_rows_still_served(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    old_keys, old_rows = _keys(5, "old"), _rows(5, seed=5)
    _version_one_cache(path, old_keys, old_rows)
    new_keys, new_rows = _keys(3, "new"), _rows(3, seed=6)
    async with EmbeddingCache(path) as cache:
        found = await cache.lookup(MODEL, DIMS, old_keys)
        assert sorted(found) == sorted(old_keys[:4])  # the damaged one is a miss
        assert all(
            np.array_equal(found[k], r) for k, r in zip(old_keys[:4], old_rows, strict=False)
        )
        await cache.store(
            MODEL, DIMS, [*new_keys, old_keys[-1]], np.vstack([new_rows, old_rows[-1:]])
        )
    with sqlite3.connect(path) as db:
        meta = dict(db.execute("SELECT name, value FROM meta"))
    db.close()
    assert meta["schema_version"] == "2"
    async with EmbeddingCache(path) as cache:
        found = await cache.lookup(MODEL, DIMS, [*old_keys, *new_keys])
    assert len(found) == 8
    expected = zip([*old_keys, *new_keys], [*old_rows, *new_rows], strict=True)
    assert all(np.array_equal(found[k], r) for k, r in expected)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite"
    junk = bytes(range(256)) * 64
    path.write_bytes(junk)
    with pytest.raises(ConfigError, match=r"junk\.sqlite"):
        EmbeddingCache(path)
    assert path.read_bytes() == junk


def test_another_sqlite_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE notes (body TEXT)")
    other.close()
    with pytest.raises(ConfigError, match=r"other\.db.*not an sfembed embedding cache"):
        EmbeddingCache(path)
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not turned to WAL
    other.close()


async def test_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    async with EmbeddingCache(path):
        pass
    with sqlite3.connect(path) as other:
        other.execute(
            "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    other.close()
    with pytest.raises(ConfigError, match=rf"cache\.sqlite.*schema version {SCHEMA_VERSION + 1}"):
        EmbeddingCache(path)


def test_a_path_that_cannot_be_opened_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing"):
        EmbeddingCache(tmp_path / "missing" / "cache.sqlite")
    with pytest.raises(ConfigError, match="cannot open"):
        EmbeddingCache(tmp_path)  # a directory


# --- cancellation and closing -------------------------------------------------------------


async def test_cancelling_a_queued_lookup_leaves_the_cache_usable(cache: EmbeddingCache) -> None:
    keys = _keys(3)
    await cache.store(MODEL, DIMS, keys, _rows(3))
    release = threading.Event()
    blocker = asyncio.get_running_loop().run_in_executor(cache._worker, release.wait)
    task = asyncio.create_task(cache.lookup(MODEL, DIMS, keys))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await blocker
    assert len(await cache.lookup(MODEL, DIMS, keys)) == 3
    await cache.close()


async def test_cancelling_a_running_lookup_leaves_the_cache_usable(
    cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _keys(3)
    await cache.store(MODEL, DIMS, keys, _rows(3))
    started, release = threading.Event(), threading.Event()
    real = cache._lookup

    def slow_lookup(*args: Any) -> Any:
        started.set()
        release.wait()
        return real(*args)

    monkeypatch.setattr(cache, "_lookup", slow_lookup)
    task = asyncio.create_task(cache.lookup(MODEL, DIMS, keys))
    await asyncio.to_thread(started.wait)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    monkeypatch.undo()
    assert len(await cache.lookup(MODEL, DIMS, keys)) == 3
    await cache.close()


async def test_close_waits_for_queued_stores(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys = _keys(100)
    cache = EmbeddingCache(path)
    store = asyncio.create_task(cache.store(MODEL, DIMS, keys, _rows(100)))
    await asyncio.sleep(0)  # the store is queued on the worker
    await cache.close()
    await store
    async with EmbeddingCache(path) as reopened:
        assert len(await reopened.lookup(MODEL, DIMS, keys)) == 100


async def test_close_is_idempotent_and_ends_use(cache: EmbeddingCache) -> None:
    await cache.close()
    await cache.close()
    await asyncio.gather(cache.close(), cache.close())
    with pytest.raises(ValueError, match="closed"):
        await cache.lookup(MODEL, DIMS, _keys(1))
    with pytest.raises(ValueError, match="closed"):
        await cache.store(MODEL, DIMS, _keys(1), _rows(1))


async def test_cancelling_a_flush_leaves_its_write_going(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(50), _rows(50)
    async with EmbeddingCache(path) as cache:
        await cache.store(MODEL, DIMS, keys, rows)
        release = threading.Event()
        blocker = asyncio.get_running_loop().run_in_executor(cache._worker, release.wait)
        flush = asyncio.create_task(cache.flush())
        await asyncio.sleep(0.01)
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        release.set()
        await blocker
    async with EmbeddingCache(path) as reopened:
        found = await reopened.lookup(MODEL, DIMS, keys)
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))


async def test_a_store_cancelled_behind_a_write_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys, rows = _keys(6), _rows(6)
    async with EmbeddingCache(path, write_rows=2) as cache:
        release = threading.Event()
        blocker = asyncio.get_running_loop().run_in_executor(cache._worker, release.wait)
        await cache.store(MODEL, DIMS, keys[:3], rows[:3])  # its write queued behind the blocker
        second = asyncio.create_task(cache.store(MODEL, DIMS, keys[3:], rows[3:]))
        await asyncio.sleep(0.01)  # waiting for the first write to end
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        await blocker
        assert len(await cache.lookup(MODEL, DIMS, keys)) == 6  # gathered rows are seen
    async with EmbeddingCache(path) as reopened:
        found = await reopened.lookup(MODEL, DIMS, keys)
    assert all(np.array_equal(found[k], r) for k, r in zip(keys, rows, strict=True))
