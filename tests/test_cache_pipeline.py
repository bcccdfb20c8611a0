"""The cache in a job: what it holds is not sent, a repeat is sent once, rows stay right and in
place, and a rerun of an unchanged corpus sends nothing. Against LocalServer over real HTTP."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sfembed import DEFAULT_CATALOG, BatchLimits, EmbeddingClient, JobStats, embed, load_settings
from sfembed._cache import EmbeddingCache, normalise
from sfembed._dedup import Dedup
from sfembed._tokenizers import counter_for
from sfembed._types import Chunk
from sfembed.testing import (
    LocalServer,
    count_tokens,
    expected_embedding,
    synthetic_corpus,
)

KEY = "sk-local-test"
M3 = "BAAI/bge-m3"
EN = "BAAI/bge-large-en-v1.5"
UNLIMITED = {"rpm": 10**7, "tpm": 10**10}
TEXTS = [f"document {n}: " + t[:300] for n, t in enumerate(synthetic_corpus(400, seed=11))]


async def run(
    server: LocalServer, texts: list[str], cache: EmbeddingCache | None, **options: Any
) -> tuple[np.ndarray, JobStats]:
    settings = load_settings(base_url=server.url, batch=BatchLimits(max_items=16))
    settings = dataclasses.replace(settings, rate=dataclasses.replace(settings.rate, **UNLIMITED))
    stats = JobStats()
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        rows = await embed(
            texts,
            model=options.pop("model", M3),
            settings=settings,
            client=client,
            stats=stats,
            cache=cache,
            errors="nan",
            **options,
        )
    return rows, stats


def expected(texts: list[str], model: str = M3) -> np.ndarray:
    """The server's vectors for the texts as sent: normalised, cache or no cache."""
    return np.stack([expected_embedding(model, normalise(text)) for text in texts])


def tokens_of(texts: list[str], model: str = M3) -> int:
    return sum(count_tokens(text, DEFAULT_CATALOG[model]) for text in texts)


async def test_a_rerun_of_an_unchanged_corpus_sends_nothing(
    server: LocalServer, tmp_path: Path
) -> None:
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        first, _ = await run(server, TEXTS, cache)
        sent = server.stats.requests
        second, stats = await run(server, TEXTS, cache)
    assert server.stats.requests == sent  # not one request
    assert stats.cached == len(TEXTS)
    np.testing.assert_array_equal(second, first)
    np.testing.assert_allclose(second, expected(TEXTS), atol=1e-6)


async def test_only_changed_texts_are_sent(server: LocalServer, tmp_path: Path) -> None:
    changed = list(TEXTS)
    edits = range(0, len(TEXTS), 50)  # 2%
    for n in edits:
        changed[n] = changed[n] + " (revised)"
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        await run(server, TEXTS, cache)
        before = server.stats.tokens_accepted
        rows, stats = await run(server, changed, cache)
    assert server.stats.tokens_accepted - before == tokens_of([changed[n] for n in edits])
    assert stats.cached == len(TEXTS) - len(edits)
    np.testing.assert_allclose(rows, expected(changed), atol=1e-6)


async def test_repeats_within_a_job_are_sent_once(server: LocalServer, tmp_path: Path) -> None:
    unique = TEXTS[:40]
    texts = [unique[n % 40] for n in range(400)]  # each text ten times, interleaved
    texts[47] = "  " + texts[47] + "\r\n"  # a repeat that differs only by normalisation
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        rows, stats = await run(server, texts, cache)
    assert server.stats.tokens_accepted == tokens_of(unique)
    assert stats.deduplicated + stats.cached == len(texts) - len(unique)
    np.testing.assert_allclose(rows, expected([unique[n % 40] for n in range(400)]), atol=1e-6)


async def test_pieces_of_long_records_are_cached(server: LocalServer, tmp_path: Path) -> None:
    spec = DEFAULT_CATALOG[EN]
    counter = counter_for(spec)
    texts = list(synthetic_corpus(300, seed=2, long_every=10))[:60]
    assert max(counter.count(texts)) > spec.max_input_tokens  # some are split
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        first, _ = await run(server, texts, cache, model=EN)
        embedded = server.stats.tokens_accepted
        second, stats = await run(server, texts, cache, model=EN)
    # The server counts more than the exact tokenizer near the limit and refuses some pieces; a
    # refused piece is refused again (nothing embedded, nothing charged), and its halves, like
    # every other piece, come from the cache.
    assert server.stats.tokens_accepted == embedded
    assert stats.requests == 0  # answered requests: every vector came from the cache
    np.testing.assert_array_equal(second, first)
    assert not np.isnan(first).any()


async def test_failures_are_not_cached_and_fail_their_repeats(
    server: LocalServer, tmp_path: Path
) -> None:
    texts = ["alpha", "beta", "alpha", "gamma"]
    server.inject("400", 3)  # the first requests are refused whatever they hold
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        rows, stats = await run(server, texts, cache)
        assert np.isnan(rows).all(axis=1).sum() >= 1
        failed = {f.position for f in stats.failures}
        assert (0 in failed) == (2 in failed)  # a repeat shares its copy's fate
        again, stats = await run(server, texts, cache)
    np.testing.assert_allclose(again, expected(texts), atol=1e-6)
    assert stats.cached == len(texts) - len(failed)


@pytest.mark.parametrize("side", ["left", "right"])
async def test_texts_the_server_may_truncate_are_not_cached(
    server: LocalServer, tmp_path: Path, side: str
) -> None:
    spec = DEFAULT_CATALOG[EN]
    long = " ".join(["word"] * (spec.max_input_tokens * 2))
    texts = ["short text", long]
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        await run(server, texts, cache, model=EN, long_mode="truncate", truncate_side=side)
        _, stats = await run(server, texts, cache, model=EN, long_mode="truncate")
    assert stats.cached == 1  # the short one only: the long one's vector depends on the side


async def test_a_cached_run_longer_than_the_ring_completes_in_order(
    server: LocalServer, tmp_path: Path
) -> None:
    texts = [f"note {n}" for n in range(5000)]  # more rows than the reorder ring holds
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        first, _ = await run(server, texts, cache)
        sent = server.stats.requests
        second, stats = await run(server, texts, cache)
    assert server.stats.requests == sent
    assert stats.cached == len(texts)
    np.testing.assert_array_equal(second, first)
    np.testing.assert_allclose(second[::499], expected(texts[::499]), atol=1e-6)


async def test_the_cache_never_changes_a_jobs_output(server: LocalServer, tmp_path: Path) -> None:
    # Texts that differ only by normalisation share a key: each is sent normalised, cache or no
    # cache, so its vector never depends on which variant the cache met first.
    variants = ["alpha beta\r\n", "  alpha beta", "cafe\u0301 au lait", "café au lait "]
    plain = ["alpha beta", "alpha beta", "café au lait", "café au lait"]
    without, _ = await run(server, plain, None)
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        await run(server, variants, cache)
        cached, stats = await run(server, plain, cache)
    assert stats.cached == len(plain)
    np.testing.assert_array_equal(cached, without)


class _Rows:
    """A row sink that keeps what it is given."""

    def __init__(self) -> None:
        self.put_rows: dict[int, np.ndarray] = {}

    def put(self, chunks: list[Chunk], rows: np.ndarray) -> None:
        for chunk, row in zip(chunks, rows, strict=True):
            self.put_rows[chunk.unit] = row


async def test_dedup_holds_each_repeat_of_a_text_on_its_way_whatever_block_it_is_in(
    tmp_path: Path,
) -> None:
    stats = JobStats()
    spec = DEFAULT_CATALOG[M3]
    rows = _Rows()
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        dedup = Dedup(cache, spec, 4, stats, scope=M3, truncating=False)
        first = [Chunk(n, n, 0, text, 3) for n, text in enumerate(["a", "b", "c"])]
        assert await dedup.admit(first, rows) == first  # all new: all sent
        second = [Chunk(3 + n, 3 + n, 0, text, 3) for n, text in enumerate(["d", "b", "e"])]
        sent = await dedup.admit(second, rows)
        assert [chunk.item for chunk in sent] == ["d", "e"]  # "b" waits for the first block's
        assert stats.deduplicated == 1
        assert not rows.put_rows
        assert dedup.repeats_of(first[0]) == []  # "a" has no repeat waiting
        vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
        await dedup.answered(first[1:], vectors[1:], rows)
        assert sorted(rows.put_rows) == [4]  # the repeat of "b", with "b"'s vector
        np.testing.assert_array_equal(rows.put_rows[4], vectors[1])
        third = [Chunk(7, 7, 0, "c", 3), Chunk(8, 8, 0, "f", 3)]
        assert await dedup.admit(third, rows) == [third[1]]  # "c" is cached now
        assert stats.cached == 1
        fourth = [Chunk(9, 9, 0, "g", 3), Chunk(10, 10, 0, "g", 3)]
        assert await dedup.admit(fourth, rows) == fourth[:1]  # a repeat within one block
        await dedup.answered(fourth[:1], vectors[:1], rows)
        np.testing.assert_array_equal(rows.put_rows[10], vectors[0])


async def test_a_block_the_cache_holds_whole_is_served_row_by_row_and_sends_the_rest(
    tmp_path: Path,
) -> None:
    # Every text of the block is cached (a job run again): each row gets its own text's
    # vector, a repeat included, and only what cannot be keyed (an image) is sent.
    stats = JobStats()
    spec = DEFAULT_CATALOG[M3]
    rows = _Rows()
    texts = ["a", "b", "c"]
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        await cache.store(M3, 4, cache.keys(texts), vectors)
        dedup = Dedup(cache, spec, 4, stats, scope=M3, truncating=False)
        image = Chunk(0, 0, 0, {"image": "data:image/png;base64,AAAA"}, 1024)
        mixed = [image, *(Chunk(1 + n, 1 + n, 0, t, 3) for n, t in enumerate(["c", "a", "c"]))]
        assert await dedup.admit(mixed, rows) == [image]
        keys = dedup.keys(["b", "a"])
        assert keys is not None
        pairs = enumerate(zip("ba", keys, strict=True))
        keyed = [Chunk(4 + n, 4 + n, 0, text, 3, key=key) for n, (text, key) in pairs]
        assert await dedup.admit_keyed(keyed, keys, rows) == []
    assert sorted(rows.put_rows) == [1, 2, 3, 4, 5]
    for unit, row in zip([1, 2, 3, 4, 5], [2, 0, 2, 1, 0], strict=True):
        np.testing.assert_array_equal(rows.put_rows[unit], vectors[row])
    assert (stats.cached, stats.deduplicated) == (5, 0)
