"""The pipeline end to end against sfembed.testing.LocalServer over real HTTP.

Rows come back in input order and equal the server's known vectors whatever order requests finish
in; over-long records are chunked, pooled or truncated; a refused item is split or isolated without
failing the others or sending anything twice; transient faults are retried; fatal errors surface
unwrapped; cancelling or leaving early leaves no task behind; rate limits hold end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import pickle
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pytest

from sfembed import (
    DEFAULT_CATALOG,
    AuthenticationError,
    BadRequestError,
    BatchLimits,
    ConfigError,
    EmbeddedBatch,
    EmbeddingClient,
    InputError,
    JobError,
    JobStats,
    ModelNotFoundError,
    OverloadedError,
    RateLimiter,
    RateLimits,
    RetryPolicy,
    Settings,
    Timeouts,
    embed,
    embed_stream,
    load_settings,
)
from sfembed._cache import normalise
from sfembed._engine import Engine
from sfembed._packer import packer_for
from sfembed._tokenizers import counter_for
from sfembed._types import Ticket, Unusable
from sfembed.testing import (
    Faults,
    LocalServer,
    ModelLimits,
    count_tokens,
    expected_embedding,
    synthetic_corpus,
)

#: The ``make_server`` fixture of conftest: ``await make_server(**ServerConfig fields)``.
MakeServer = Callable[..., Awaitable[LocalServer]]

KEY = "sk-local-test"
M3 = "BAAI/bge-m3"  # xlmr, 8192 tokens, 1024 dims
EN = "BAAI/bge-large-en-v1.5"  # bert-en, 512 tokens
ZH = "BAAI/bge-large-zh-v1.5"  # bert-zh, 512 tokens
VL = "Qwen/Qwen3-VL-Embedding-8B"  # takes images
SMALL = "Qwen/Qwen3-Embedding-0.6B"  # accepts dimensions
EN_SPEC = DEFAULT_CATALOG[EN]
EN_LIMIT = EN_SPEC.max_input_tokens
EN_COUNTER = counter_for(EN_SPEC)
#: The server's catalogue for long documents: bge-large-en-v1.5 takes any length, so whatever the
#: client's split, nothing is refused (the client keeps the normal catalogue and its 512 tokens).
LONG_CATALOG = DEFAULT_CATALOG.with_models(dataclasses.replace(EN_SPEC, max_input_tokens=10**6))

UNLIMITED = RateLimits(rpm=10**7, tpm=10**10)  # the limiter never holds anything back
FAST_RETRY = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)

TEXTS = list(synthetic_corpus(300, seed=7, long_every=0))
SHORT = [f"record {n}: " + text[:200] for n, text in enumerate(TEXTS[:60])]
_ENGLISH = " ".join(t for t in synthetic_corpus(600, seed=3, long_every=0) if t.isascii())
_WORDS = _ENGLISH.split(" ")


# --- helpers -------------------------------------------------------------------------------------


def settings_for(server: LocalServer, **overrides: Any) -> Settings:
    """Settings for ``server``: no rate limit and fast retries unless overridden."""
    values: dict[str, Any] = {"rate": UNLIMITED, "retry": FAST_RETRY}
    return load_settings(base_url=server.url, **(values | overrides))


def client_for(server: LocalServer, key: str = KEY, **options: Any) -> EmbeddingClient:
    return EmbeddingClient(api_key=key, base_url=server.url, **options)


def expected_rows(model: str, items: Sequence[Any], **options: Any) -> np.ndarray:
    # Texts are sent normalised (stripped, NFC, \n line ends): the server embeds them so.
    sent = [normalise(item) if isinstance(item, str) else item for item in items]
    return np.stack([expected_embedding(model, item, **options) for item in sent])


def assert_rows(rows: np.ndarray, model: str, items: Sequence[Any], **options: Any) -> None:
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, expected_rows(model, items, **options), rtol=0, atol=1e-6)


def english(tokens: int, start: int = 0) -> str:
    """Natural English text of at most ``tokens`` tokens by bge-large-en's count (specials
    included), as long as that allows."""
    low, high = 1, len(_WORDS) - start
    while low < high:
        middle = (low + high + 1) // 2
        if EN_COUNTER.count([" ".join(_WORDS[start : start + middle])])[0] <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(_WORDS[start : start + low]).strip()


def server_tokens(model: str, items: Iterable[Any]) -> int:
    spec = DEFAULT_CATALOG[model]
    return sum(count_tokens(item, spec) for item in items)


def weighted_pool(vectors: np.ndarray, weights: Sequence[int]) -> np.ndarray:
    mean = (vectors.astype(np.float64) * np.asarray(weights, np.float64)[:, None]).sum(0)
    pooled: np.ndarray = (mean / np.linalg.norm(mean)).astype(np.float32)
    return pooled


async def collect(stream: AsyncGenerator[EmbeddedBatch, None]) -> list[EmbeddedBatch]:
    async with contextlib.aclosing(stream) as batches:
        return [batch async for batch in batches]


def job_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the pipeline's stages still alive."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and task.get_name().startswith("sfembed:")
    ]


async def settled(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks started since ``before`` that are still alive once the server's connection handlers
    have wound down (bounded polling: waiting, not a timing assertion)."""
    current = asyncio.current_task()
    for _ in range(300):
        left = {t for t in asyncio.all_tasks() - before if t is not current and not t.done()}
        if not left:
            break
        await asyncio.sleep(0.01)
    gc.collect()
    return left


async def until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


@pytest.fixture
async def long_server(make_server: MakeServer) -> LocalServer:
    """A server that takes any length for bge-large-en-v1.5 (see LONG_CATALOG)."""
    return await make_server(catalog=LONG_CATALOG)


# --- 1. order and correctness --------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_rows_in_input_order_equal_the_server_vectors(
    server: LocalServer, encoding: str
) -> None:
    settings = settings_for(server, batch=BatchLimits(max_items=7), concurrency=5)
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(
            TEXTS,
            model=M3,
            settings=settings,
            client=client,
            stats=stats,
            encoding_format=encoding,
        )
    assert rows.shape == (len(TEXTS), 1024)
    assert_rows(rows, M3, TEXTS)
    assert stats.failures == []
    assert stats.records == stats.rows == len(TEXTS)
    assert stats.requests == server.stats.by_status[200] == server.stats.requests
    assert stats.requests >= len(TEXTS) / 7
    assert server.stats.tokens_accepted == stats.tokens == server_tokens(M3, TEXTS)


async def test_async_iterable_input_over_several_blocks(server: LocalServer) -> None:
    texts = [f"item {n} of the async source" for n in range(1200)]

    async def source() -> AsyncIterator[str]:
        for n, text in enumerate(texts):
            if n % 97 == 0:
                await asyncio.sleep(0)
            yield text

    async with client_for(server) as client:
        rows = await embed(
            source(),
            model=M3,
            settings=settings_for(server, batch=BatchLimits(max_items=16), concurrency=4),
            client=client,
        )
    assert_rows(rows, M3, texts)


async def test_stream_batches_are_contiguous_and_cover_every_input_once(
    server: LocalServer,
) -> None:
    settings = settings_for(server, batch=BatchLimits(max_items=3), concurrency=6)
    async with client_for(server) as client:
        batches = await collect(
            embed_stream(TEXTS[:120], model=M3, settings=settings, client=client)
        )
    assert len(batches) > 1
    expected_start = 0
    for batch in batches:
        assert len(batch) > 0
        assert batch.chunk_numbers is None
        assert batch.spans is None
        positions, embeddings = batch
        assert positions.tolist() == list(range(expected_start, expected_start + len(batch)))
        assert_rows(embeddings, M3, TEXTS[expected_start : expected_start + len(batch)])
        expected_start += len(batch)
    assert expected_start == 120


async def test_batches_stay_in_order_while_the_ring_is_full(server: LocalServer) -> None:
    # More rows than the ring holds, many senders: intake waits for room while senders hand over
    # runs. A sender that took its run from the ring first must hand it over first.
    texts = [f"row {i}" for i in range(6000)]
    settings = settings_for(server, concurrency=16)
    async with client_for(server) as client:
        for _ in range(3):
            seen: list[int] = []
            async for positions, _ in embed_stream(
                texts, model=M3, settings=settings, client=client
            ):
                seen.extend(positions.tolist())
            assert seen == list(range(len(texts)))


async def test_dimensions_option_reaches_the_server(server: LocalServer) -> None:
    async with client_for(server) as client:
        rows = await embed(
            SHORT,
            model=SMALL,
            settings=settings_for(server, batch=BatchLimits(max_items=8)),
            client=client,
            dimensions=256,
        )
    assert rows.shape == (len(SHORT), 256)
    assert_rows(rows, SMALL, SHORT, dimensions=256)


async def test_empty_input_gives_no_rows(server: LocalServer) -> None:
    async with client_for(server) as client:
        rows = await embed([], model=M3, settings=settings_for(server), client=client)
        narrow = await embed(
            [], model=SMALL, settings=settings_for(server), client=client, dimensions=256
        )
    assert rows.shape == (0, 1024)  # the model's width: it stacks with other results
    assert rows.dtype == np.float32
    assert narrow.shape == (0, 256)
    assert server.stats.requests == 0


# --- 2. long documents ---------------------------------------------------------------------------

LONG_DOCS = [english(1400), english(700, start=2000), english(2600, start=4000)]


async def chunk_rows(
    server: LocalServer, texts: Sequence[str], **options: Any
) -> list[tuple[int, int, int, int, np.ndarray]]:
    """(position, chunk number, start, end, row) of each row of a ``chunks`` job."""
    settings = settings_for(server, batch=BatchLimits(max_items=4), concurrency=4)
    async with client_for(server) as client:
        batches = await collect(
            embed_stream(
                texts, model=EN, settings=settings, client=client, long_mode="chunks", **options
            )
        )
    rows = []
    for batch in batches:
        assert batch.chunk_numbers is not None
        assert batch.spans is not None
        for index in range(len(batch)):
            start, end = batch.spans[index].tolist()
            number = int(batch.chunk_numbers[index])
            rows.append((int(batch.positions[index]), number, start, end, batch.embeddings[index]))
    return rows


def spans_by_position(
    rows: Sequence[tuple[int, int, int, int, np.ndarray]],
) -> dict[int, list[tuple[int, int]]]:
    spans: dict[int, list[tuple[int, int]]] = {}
    for position, number, start, end, _ in rows:
        assert number == len(spans.setdefault(position, []))  # chunk numbers 0, 1, 2, ...
        spans[position].append((start, end))
    return spans


async def test_chunks_mode_rows_are_the_chunks_in_order(long_server: LocalServer) -> None:
    texts = ["a short note.", LONG_DOCS[0], "another one.", LONG_DOCS[1], LONG_DOCS[2]]
    rows = await chunk_rows(long_server, texts)
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    spans = spans_by_position(rows)
    assert sorted(spans) == list(range(len(texts)))
    for position, number, start, end, vector in rows:
        piece = texts[position][start:end]
        np.testing.assert_allclose(
            vector,
            expected_embedding(EN, normalise(piece), catalog=LONG_CATALOG),
            rtol=0,
            atol=1e-6,
        )
        assert EN_COUNTER.count([piece])[0] <= EN_LIMIT, (position, number)
    for position, text in enumerate(texts):
        covered = spans[position]
        assert covered[0][0] == 0
        assert covered[-1][1] == len(text)
        for (_, end), (start, _) in itertools.pairwise(covered):
            assert end <= start  # no overlap, in order ...
            assert text[end:start].strip() == ""  # ... and nothing but spaces left out
    assert spans[0] == [(0, len(texts[0]))]
    assert spans[2] == [(0, len(texts[2]))]
    for position in (1, 3, 4):
        assert len(spans[position]) > 1
    assert len(spans[4]) >= 5  # 2600 tokens in chunks of at most 512


async def test_chunks_overlap_when_asked(long_server: LocalServer) -> None:
    text = LONG_DOCS[2]
    rows = await chunk_rows(long_server, [text], overlap_tokens=40)
    covered = spans_by_position(rows)[0]
    assert len(covered) >= 5
    for (_, end), (start, _) in itertools.pairwise(covered):
        assert start < end
        shared = EN_COUNTER.count([text[start:end]])[0] - EN_SPEC.special_tokens
        assert 0 < shared <= 40
    for _, _, start, end, vector in rows:
        np.testing.assert_allclose(
            vector,
            expected_embedding(EN, normalise(text[start:end]), catalog=LONG_CATALOG),
            rtol=0,
            atol=1e-6,
        )
    assert covered[0][0] == 0
    assert covered[-1][1] == len(text)


@pytest.mark.parametrize("doc", range(len(LONG_DOCS)))
async def test_pool_mode_is_the_token_weighted_mean_of_the_chunks(
    long_server: LocalServer, doc: int
) -> None:
    text = LONG_DOCS[doc]
    pieces = [text[start:end] for _, _, start, end, _ in await chunk_rows(long_server, [text])]
    assert len(pieces) > 1
    async with client_for(long_server) as client:
        rows = await embed(
            [text],
            model=EN,
            settings=settings_for(long_server, batch=BatchLimits(max_items=2), concurrency=3),
            client=client,
            long_mode="pool",
        )
    vectors = expected_rows(EN, pieces, catalog=LONG_CATALOG)
    expected = weighted_pool(vectors, EN_COUNTER.count(pieces))
    assert rows.shape == (1, 1024)
    np.testing.assert_allclose(rows[0], expected, rtol=0, atol=1e-6)
    # The weights matter: the plain mean is another vector.
    assert not np.allclose(rows[0], weighted_pool(vectors, [1] * len(pieces)), atol=1e-4)


async def test_pool_mode_keeps_one_row_per_record(long_server: LocalServer) -> None:
    texts = [SHORT[0], LONG_DOCS[0], SHORT[1], LONG_DOCS[2], SHORT[2]]
    stats = JobStats()
    async with client_for(long_server) as client:
        rows = await embed(
            texts,
            model=EN,
            settings=settings_for(long_server, batch=BatchLimits(max_items=3), concurrency=4),
            client=client,
            stats=stats,
        )
    assert rows.shape == (5, 1024)
    assert_rows(rows[[0, 2, 4]], EN, [texts[0], texts[2], texts[4]])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert stats.records == stats.rows == 5
    assert stats.chunks > 5


@pytest.mark.parametrize("side", ["right", "left"])
async def test_truncate_mode_lets_the_server_cut(server: LocalServer, side: str) -> None:
    texts = [SHORT[0], LONG_DOCS[0], SHORT[1], LONG_DOCS[2]]
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(
            texts,
            model=EN,
            settings=settings_for(server, batch=BatchLimits(max_items=2)),
            client=client,
            stats=stats,
            long_mode="truncate",
            truncate_side=side,
        )
    assert_rows(rows, EN, texts, truncate=side)
    assert stats.chunks == len(texts)
    assert server.stats.by_status[400] == 0
    # The long records are over the server's limit: only its truncation let them through.
    with pytest.raises(ValueError, match="over the"):
        expected_embedding(EN, texts[1])


# --- 3. an item the server counts as over-long ---------------------------------------------------


async def test_item_the_server_refuses_as_too_long_is_split_again(server: LocalServer) -> None:
    near = [english(500), english(505, start=900), english(480, start=1800)]
    for text in near:  # within the limit by our count, over it by the server's
        assert EN_COUNTER.count([text])[0] <= EN_LIMIT < count_tokens(text, EN_SPEC)
    texts = [near[0], SHORT[0], near[1], SHORT[1], near[2], *SHORT[2:10]]
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(
            texts,
            model=EN,
            settings=settings_for(server, batch=BatchLimits(max_items=4), concurrency=2),
            client=client,
            stats=stats,
        )
    assert stats.failures == []
    assert not np.isnan(rows).any()
    assert server.stats.by_status[400] >= 1  # the first request, holding near[0], was refused
    short = [i for i, text in enumerate(texts) if text not in near]
    assert_rows(rows[short], EN, [texts[i] for i in short])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    # The first record went whole (nothing known yet) and came back as its two halves pooled.
    offsets = EN_COUNTER.spans(near[0])
    middle = len(offsets) // 2
    halves = [near[0][: offsets[middle - 1][1]], near[0][offsets[middle][0] :]]
    expected = weighted_pool(expected_rows(EN, halves), EN_COUNTER.count(halves))
    np.testing.assert_allclose(rows[0], expected, rtol=0, atol=1e-6)


async def test_chunks_the_server_refuses_are_split_again(server: LocalServer) -> None:
    # Chunks of up to 512 tokens by our count are more by the server's: some are refused, cut
    # in two and pooled back into their row.
    texts = [LONG_DOCS[2], SHORT[0], LONG_DOCS[0]]
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(
            texts,
            model=EN,
            settings=settings_for(server, batch=BatchLimits(max_items=3), concurrency=3),
            client=client,
            stats=stats,
            long_mode="chunks",
        )
    assert stats.failures == []
    assert server.stats.by_status[400] >= 1
    assert len(rows) == stats.rows > len(texts)
    assert not np.isnan(rows).any()
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


# --- 4. isolation of a bad item ------------------------------------------------------------------

BAD_IMAGE = {"image": "not base64!!"}
GOOD_IMAGE = {"image": "https://example.com/cat.png"}


async def test_a_bad_item_fails_alone_and_nothing_is_sent_twice(server: LocalServer) -> None:
    items: list[Any] = list(SHORT[:24])
    items[7] = BAD_IMAGE
    items[13] = GOOD_IMAGE
    items[20] = {"text": SHORT[20]}
    with pytest.raises(ValueError, match="content object"):
        count_tokens(BAD_IMAGE, DEFAULT_CATALOG[VL])  # the server refuses it (400)
    settings = settings_for(server, batch=BatchLimits(max_items=8), concurrency=3)
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(
            items, model=VL, settings=settings, client=client, stats=stats, errors="nan"
        )
    assert rows.shape == (24, 4096)
    assert np.isnan(rows[7]).all()
    good = [i for i in range(24) if i != 7]
    assert_rows(rows[good], VL, [items[i] for i in good])
    assert [f.position for f in stats.failures] == [7]
    assert stats.failures[0].chunk is None
    assert "invalid" in stats.failures[0].reason
    # Every good item was embedded exactly once: the server accepted each one's tokens once.
    assert server.stats.tokens_accepted == server_tokens(VL, [items[i] for i in good])
    assert stats.requests == server.stats.by_status[200]
    assert server.stats.by_status[400] >= 1

    async with client_for(server) as client:
        with pytest.raises(JobError) as raised:
            await embed(items, model=VL, settings=settings, client=client)
    assert [f.position for f in raised.value.failures] == [7]
    assert "input 7" in str(raised.value)
    # The server's error comes with it, to branch on: a refusal, not worth sending again.
    refused = raised.value.failures[0].error
    assert isinstance(refused, BadRequestError)
    assert (refused.status, refused.code, refused.retryable) == (400, 20015, False)
    assert refused.trace_id
    assert refused.__traceback__ is None  # none of the job's frames kept alive
    assert not raised.value.failures[0].retryable
    assert not raised.value.retryable
    # It crosses to another process (a process pool, a Ray task) whole.
    pickled = pickle.dumps(raised.value)
    copied = pickle.loads(pickled)
    assert [(f.position, f.reason) for f in copied.failures] == [(7, stats.failures[0].reason)]
    assert str(copied) == str(raised.value)
    assert not copied.retryable
    twin = copied.failures[0].error
    assert isinstance(twin, BadRequestError)
    assert (twin.status, twin.code, twin.trace_id, twin.message) == (
        400,
        20015,
        refused.trace_id,
        refused.message,
    )
    assert KEY.encode() not in pickled


async def test_a_job_error_says_which_failures_may_succeed_when_sent_again(
    server: LocalServer,
) -> None:
    # The first request and its one retry are answered 503: its inputs fail after the retries,
    # the others are embedded.
    retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    settings = settings_for(server, retry=retry, concurrency=1, batch=BatchLimits(max_items=4))
    async with client_for(server) as client:
        server.inject("503", 2)
        with pytest.raises(JobError) as raised:
            await embed(SHORT[:12], model=M3, settings=settings, client=client)
        server.inject("503", 2)
        with pytest.raises(JobError) as mixed:  # an empty text as well: never worth resending
            await embed(["", *SHORT[:12]], model=M3, settings=settings, client=client)

    failures = raised.value.failures
    assert 0 < len(failures) <= 4
    assert [f.position for f in failures] == list(range(len(failures)))
    for failure in failures:
        error = failure.error
        assert isinstance(error, OverloadedError)
        assert (error.status, error.code, error.retryable) == (503, 50505, True)
        assert error.trace_id
        assert error.trace_id in failure.reason
        assert failure.retryable
    assert raised.value.retryable
    pickled = pickle.dumps(raised.value)
    copied = pickle.loads(pickled)
    assert copied.retryable
    assert [(f.position, f.reason, f.retryable) for f in copied.failures] == [
        (f.position, f.reason, True) for f in failures
    ]
    assert [type(f.error) for f in copied.failures] == [OverloadedError] * len(failures)
    assert [f.error.trace_id for f in copied.failures if isinstance(f.error, OverloadedError)] == [
        f.error.trace_id for f in failures if isinstance(f.error, OverloadedError)
    ]
    assert KEY.encode() not in pickled

    empty, *sent = mixed.value.failures
    assert (empty.position, empty.error, empty.retryable) == (0, None, False)
    assert sent
    assert all(isinstance(f.error, OverloadedError) and f.retryable for f in sent)
    assert not mixed.value.retryable  # the empty text would fail again


#: 300 words of 101 letters: one [UNK] each for bge-large-en's WordPiece, 21 tokens each for the
#: server. A chunk holding it is refused, and so are its halves: it fails for good.
UNKNOWN_WORDS = " ".join(["x" * 101] * 300)


@pytest.mark.parametrize(("regions", "max_items"), [(1, 4), (2, 5)])
async def test_late_parts_of_a_failed_record_touch_no_other_row(
    server: LocalServer, regions: int, max_items: int
) -> None:
    # Record 100 is split into chunks sent in several requests; one (or two) of its chunks fail
    # for good while the others succeed. Its row leaves the ring as soon as it fails, so its
    # other parts (or second failure) arrive after its slot is free: they must not mark that
    # slot done for record 1124, which takes it over a ring's length later (capacity 1024).
    parts = [" ".join(_WORDS[:900]), UNKNOWN_WORDS, " ".join(_WORDS[900:1800])]
    if regions == 2:
        parts += [UNKNOWN_WORDS, " ".join(_WORDS[1800:2400])]
    texts = [f"first {n}" for n in range(100)] + [" ".join(parts)]
    texts += [f"record number {n}" for n in range(1, 1200)]
    stats = JobStats()
    settings = settings_for(server, batch=BatchLimits(max_items=max_items), concurrency=2)
    async with client_for(server) as client:
        rows = await embed(
            texts, model=EN, settings=settings, client=client, stats=stats, errors="nan"
        )
    assert [f.position for f in stats.failures] == [100]
    assert np.isnan(rows[100]).all()
    others = [i for i in range(len(texts)) if i != 100]
    assert_rows(rows[others], EN, [texts[i] for i in others])


# --- 5. transient faults -------------------------------------------------------------------------


#: A stall that outlasts the test (the server's stop cuts it off) ...
STALL = Faults(stall_s=30.0)
#: ... given up on after 1 s without an answer. A retry count is exact only if no healthy answer
#: ever takes this long: on a loaded machine answers of the local server take up to half a second
#: (0.2 s was often too short), and at 1 s the job's own early resend of a stalled request (after
#: 10 times the usual answer time, at least 1 s) stays out of play.
STALL_READ = Timeouts(read_s=1.0)


async def embed_short(
    server: LocalServer, stats: JobStats, timeouts: Timeouts | None = None
) -> np.ndarray:
    values = {"batch": BatchLimits(max_items=5), "concurrency": 3}
    async with client_for(server, timeouts=timeouts) as client:
        return await embed(
            SHORT, model=M3, settings=settings_for(server, **values), client=client, stats=stats
        )


async def test_a_refused_batch_is_bisected_and_sent_once(server: LocalServer) -> None:
    server.inject("400")
    stats = JobStats()
    rows = await embed_short(server, stats)
    assert_rows(rows, M3, SHORT)
    assert stats.failures == []
    assert server.stats.by_status[400] == 1
    assert server.stats.tokens_accepted == server_tokens(M3, SHORT)
    # 12 requests of 5, the refused one re-sent as two halves
    assert server.stats.by_status[200] == stats.requests == len(SHORT) // 5 + 1


async def test_a_batch_too_large_halves_the_item_cap(server: LocalServer) -> None:
    server.inject("413")
    settings = settings_for(server, batch=BatchLimits(max_items=6), concurrency=2)
    stats = JobStats()
    async with client_for(server) as client:
        job = Engine(settings, client, stats, None)
        batches = await collect(job.run(SHORT))
    assert job.packer.max_items == 3
    assert_rows(np.concatenate([b.embeddings for b in batches]), M3, SHORT)
    assert stats.failures == []
    assert server.stats.by_status[413] == 1
    assert server.stats.tokens_accepted == server_tokens(M3, SHORT)


async def test_requests_are_the_windows_share_in_the_servers_tokens(
    make_server: MakeServer,
) -> None:
    # A server counting twice the tokens: once its usage says so, requests are packed to about
    # half as many of ours, so that each is still about 1/32 of the window as it counts them.
    server = await make_server(token_factor=2.0)
    rate = RateLimits(rpm=10**6, tpm=2048, window_s=0.25, headroom=0.0)  # 1/32: 64 tokens
    settings = settings_for(server, rate=rate, concurrency=1)
    first = packer_for(settings, DEFAULT_CATALOG[M3]).max_tokens
    stats = JobStats()
    async with client_for(server) as client:
        job = Engine(settings, client, stats, None)
        batches = await collect(job.run(SHORT))
    assert_rows(np.concatenate([b.embeddings for b in batches]), M3, SHORT)
    ratio = job.dispatch.sender.calibration.ratio
    assert ratio >= 2.0
    assert first == 64  # 1/32 of the window, then as the server counts it (give or take 15%)
    assert job.packer.max_tokens < 40
    assert job.packer.max_tokens * ratio <= 64 * 1.15


async def test_a_rate_limited_request_is_retried(server: LocalServer) -> None:
    server.inject("429-tpm")
    stats = JobStats()
    rows = await embed_short(server, stats)
    assert_rows(rows, M3, SHORT)
    assert stats.failures == []
    assert stats.rate_limited == 1 == server.stats.rate_limited_tpm
    assert stats.retries == 1
    assert server.stats.tokens_accepted == server_tokens(M3, SHORT)


@pytest.mark.parametrize("kind", ["503", "504", "reset", "bad-json", "no-data", "stall"])
async def test_transient_faults_are_retried(make_server: MakeServer, kind: str) -> None:
    server = await make_server(faults=STALL)
    server.inject(kind, 2)
    stats = JobStats()
    rows = await embed_short(server, stats, timeouts=STALL_READ)
    assert_rows(rows, M3, SHORT)
    assert stats.failures == []
    assert stats.retries == 2
    if kind == "stall":  # counted on arrival though never answered, then sent again
        assert len(server.stats.accepted) == server.stats.by_status[200] + 2
        assert server.stats.tokens_accepted > server_tokens(M3, SHORT)
    else:
        assert server.stats.tokens_accepted == server_tokens(M3, SHORT)


class VerbLimiter(RateLimiter):
    """A local limiter that keeps which of settle, refund and unanswered each ticket got."""

    def __init__(self, rate: RateLimits) -> None:
        super().__init__(rate)
        self.verbs: list[str] = []

    async def settle(self, ticket: Ticket, used_tokens: int) -> None:
        self.verbs.append("settle")
        await super().settle(ticket, used_tokens)

    async def refund(self, ticket: Ticket) -> None:
        self.verbs.append("refund")
        await super().refund(ticket)

    async def unanswered(self, ticket: Ticket) -> None:
        self.verbs.append("unanswered")
        await super().unanswered(ticket)


@pytest.mark.parametrize(
    ("kind", "verb"),
    [("503", "refund"), ("504", "unanswered"), ("reset", "unanswered"), ("stall", "unanswered")],
)
async def test_a_lost_answer_is_unanswered_and_a_refusal_refunded(
    make_server: MakeServer, kind: str, verb: str
) -> None:
    # A 503 is refused before the model runs. A reset, a 504 or a stall may have been counted:
    # the limiter keeps it in its window, and gives its pace back for the request sent again.
    server = await make_server(faults=STALL)
    server.inject(kind)
    limiter = VerbLimiter(RateLimits(rpm=10**6, tpm=10**9))
    settings = settings_for(server, batch=BatchLimits(max_items=64), concurrency=1)
    async with client_for(server, timeouts=STALL_READ) as client:
        rows = await embed(SHORT, model=M3, settings=settings, client=client, limiter=limiter)
    assert_rows(rows, M3, SHORT)
    assert limiter.verbs[0] == verb
    assert limiter.verbs[1:] == ["settle"] * (len(limiter.verbs) - 1)


async def test_random_faults_lose_nothing(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(rate_503=0.1, rate_reset=0.05, seed=1))
    stats = JobStats()
    settings = settings_for(server, batch=BatchLimits(max_items=7), concurrency=5)
    async with client_for(server) as client:
        rows = await embed(TEXTS, model=M3, settings=settings, client=client, stats=stats)
    assert_rows(rows, M3, TEXTS)
    assert stats.failures == []
    assert stats.retries > 0
    assert server.stats.by_status[503] + server.stats.resets == stats.retries
    assert server.stats.tokens_accepted == server_tokens(M3, TEXTS)


# --- 6. fatal errors -----------------------------------------------------------------------------


async def test_a_wrong_key_raises_authentication_error_itself(server: LocalServer) -> None:
    before = asyncio.all_tasks()
    async with client_for(server, key="sk-wrong") as client:
        with pytest.raises(AuthenticationError) as raised:
            await embed(TEXTS, model=M3, settings=settings_for(server), client=client)
    assert type(raised.value) is AuthenticationError
    assert server.stats.by_status[200] == 0
    assert server.stats.by_status[401] <= load_settings().concurrency  # never retried
    assert job_tasks() == []
    assert await settled(before) == set()


async def test_an_unknown_model_raises_config_error_before_sending(server: LocalServer) -> None:
    async with client_for(server) as client:
        with pytest.raises(ConfigError, match="unknown model"):
            await embed(SHORT, model="acme/nothing", settings=settings_for(server), client=client)
    assert server.stats.requests == 0


async def test_a_model_the_server_lacks_raises_model_not_found(server: LocalServer) -> None:
    table = {"acme/custom": {"max_input_tokens": 512, "default_dimensions": 64}}
    async with client_for(server) as client:
        with pytest.raises(ModelNotFoundError):
            await embed(
                SHORT,
                model="acme/custom",
                settings=settings_for(server, models=table),
                client=client,
            )
    assert server.stats.by_status[200] == 0


async def test_an_invalid_option_raises_before_sending(server: LocalServer) -> None:
    async with client_for(server) as client:
        with pytest.raises(InputError, match="dimensions"):
            await embed(
                SHORT, model=M3, settings=settings_for(server), client=client, dimensions=256
            )
    assert server.stats.requests == 0


# --- 7. bad inputs -------------------------------------------------------------------------------


async def test_bad_inputs_fail_alone(server: LocalServer) -> None:
    items: list[Any] = [
        "first",
        "",
        "   \n\t",
        42,
        None,
        {"text": ""},
        {"text": "a content object for a text-only model"},
        {"image": "https://example.com/cat.png"},
        b"bytes",
        "last",
    ]
    bad = list(range(1, 9))
    stats = JobStats()
    settings = settings_for(server, batch=BatchLimits(max_items=4))
    async with client_for(server) as client:
        rows = await embed(
            items, model=M3, settings=settings, client=client, stats=stats, errors="nan"
        )
        assert rows.shape == (len(items), 1024)
        assert np.isnan(rows[bad]).all()
        assert_rows(rows[[0, 9]], M3, ["first", "last"])
        assert [f.position for f in stats.failures] == bad
        assert all(f.reason for f in stats.failures)
        assert server.stats.tokens_accepted == server_tokens(M3, ["first", "last"])

        with pytest.raises(JobError) as raised:
            await embed(items, model=M3, settings=settings, client=client)
    assert [f.position for f in raised.value.failures] == bad


# --- 8. cancellation and early exit --------------------------------------------------------------


async def test_cancelling_embed_leaves_nothing_running(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(latency_s=0.2))
    before = asyncio.all_tasks()
    async with client_for(server) as client:
        task = asyncio.create_task(
            embed(
                TEXTS,
                model=M3,
                settings=settings_for(server, batch=BatchLimits(max_items=4), concurrency=4),
                client=client,
            )
        )
        await until(lambda: server.stats.requests > 0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert job_tasks() == []
    assert await settled(before) == set()


async def test_leaving_a_stream_early_leaves_nothing_running(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(latency_s=0.05))
    before = asyncio.all_tasks()
    settings = settings_for(server, batch=BatchLimits(max_items=4), concurrency=4)
    async with client_for(server) as client:
        async with contextlib.aclosing(
            embed_stream(TEXTS, model=M3, settings=settings, client=client)
        ) as stream:
            async for batch in stream:
                assert batch.positions[0] == 0
                break
        assert job_tasks() == []
        # The client still works for the next job.
        rows = await embed(SHORT[:3], model=M3, settings=settings, client=client)
        assert_rows(rows, M3, SHORT[:3])
    assert await settled(before) == set()


@pytest.mark.parametrize("long_mode", ["pool", "chunks"])
async def test_a_stop_ends_the_stream_after_requests_in_flight(
    make_server: MakeServer, long_mode: str
) -> None:
    server = await make_server(faults=Faults(latency_s=0.05))
    texts = [f"record {n}" for n in range(3000)]
    stop = asyncio.Event()
    settings = settings_for(server, batch=BatchLimits(max_items=8), concurrency=4)
    before = asyncio.all_tasks()
    rows: list[np.ndarray] = []
    async with client_for(server) as client:
        stream = embed_stream(
            texts, model=M3, settings=settings, client=client, stop=stop, long_mode=long_mode
        )
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                assert batch.positions[0] == sum(len(r) for r in rows)  # no gap, no repeat
                rows.append(batch.embeddings)
                if not stop.is_set():
                    stop.set()
                    sent_at_stop = server.stats.requests
        assert job_tasks() == []
    done = np.concatenate(rows)
    assert 0 < len(done) < len(texts)
    assert_rows(done, M3, texts[: len(done)])
    # Only the requests already out when the stop came were answered: nothing new started.
    assert server.stats.requests <= sent_at_stop + settings.concurrency
    assert await settled(before) == set()


async def test_a_stop_during_a_retry_backoff_ends_the_stream(make_server: MakeServer) -> None:
    server = await make_server()
    server.inject("503", 50)  # every early attempt fails: senders sit in their backoff
    stop = asyncio.Event()
    retry = RetryPolicy(initial_backoff_s=600.0, max_backoff_s=600.0)  # only a stop ends it
    settings = settings_for(server, batch=BatchLimits(max_items=8), concurrency=2, retry=retry)
    stats = JobStats()
    async with client_for(server) as client:
        stream = embed_stream(
            SHORT, model=M3, settings=settings, client=client, stop=stop, stats=stats
        )

        async def stop_in_backoff() -> None:
            await until(lambda: stats.retries >= 1)  # the probe request sits in its backoff
            stop.set()

        async with contextlib.aclosing(stream) as batches, asyncio.TaskGroup() as group:
            group.create_task(stop_in_backoff())
            async with asyncio.timeout(30):  # a hang here means a backoff ignored the stop
                got = [batch async for batch in batches]
        assert job_tasks() == []
    assert got == []  # nothing was answered, and nothing was failed for it either
    assert stats.failures == []


async def test_a_run_of_unusable_records_longer_than_the_ring_completes(
    server: LocalServer,
) -> None:
    # No request settles these rows; intake must still have them handed over, or the ring fills
    # and the job waits for room forever.
    inputs: list[Any] = [Unusable("bad line")] * 5000 + SHORT[:3]
    settings = settings_for(server)
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(
            inputs, model=M3, settings=settings, client=client, stats=stats, errors="nan"
        )
    assert rows.shape == (5003, 1024)
    assert np.isnan(rows[:5000]).all()
    assert_rows(rows[5000:], M3, SHORT[:3])
    assert len(stats.failures) == 5000


async def test_an_input_source_that_raises_stops_the_job(server: LocalServer) -> None:
    async def source() -> AsyncIterator[str]:
        for n in range(600):
            if n == 550:
                raise RuntimeError("the source broke")
            yield f"item {n}"

    before = asyncio.all_tasks()
    async with client_for(server) as client:
        with pytest.raises(RuntimeError, match="the source broke"):
            await embed(source(), model=M3, settings=settings_for(server), client=client)
    assert job_tasks() == []
    assert await settled(before) == set()


async def test_without_a_client_the_job_opens_and_closes_its_own(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFEMBED_TEST_KEY", KEY)
    settings = settings_for(server, api_key_env="SFEMBED_TEST_KEY", batch=BatchLimits(max_items=4))
    before = asyncio.all_tasks()
    rows = await embed(SHORT, model=M3, settings=settings)
    assert_rows(rows, M3, SHORT)
    async with contextlib.aclosing(embed_stream(SHORT, model=M3, settings=settings)) as stream:
        async for batch in stream:
            assert_rows(batch.embeddings, M3, SHORT[: len(batch)])
            break
    assert job_tasks() == []
    assert await settled(before) == set()


# --- 9. rate limits end to end -------------------------------------------------------------------


async def test_rate_limits_are_honoured_end_to_end(make_server: MakeServer) -> None:
    # Chinese text: the client's bert-zh count and the server's count agree exactly, so the
    # limiter's charges are the server's from the first request on.
    texts = [t for t in synthetic_corpus(3000, seed=5, long_every=0) if not t.isascii()]
    texts = [t for t in texts if len(t) <= 80][:200]
    tpm, rpm = 3000, 30
    server = await make_server(window_s=1.0, limits={ZH: ModelLimits(rpm=rpm, tpm=tpm)})
    # Once the window is full, the limiter admits a request the instant an old one leaves its
    # log, and the server, which stamped the old one a millisecond or two later, may still hold
    # it: the headroom must cover a request or two (the default 2% is 60 tokens here, less than
    # one request; in a 60 s window of a real quota it is many).
    rate = RateLimits(rpm=rpm, tpm=tpm, window_s=1.0, burst_s=0.1, headroom=0.1)
    settings = settings_for(server, rate=rate, batch=BatchLimits(max_items=4), concurrency=4)
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(texts, model=ZH, settings=settings, client=client, stats=stats)
    assert_rows(rows, ZH, texts)
    total = server_tokens(ZH, texts)
    assert total > 2 * tpm  # a few windows of work
    assert server.stats.rate_limited_tpm + server.stats.rate_limited_rpm <= 1
    assert stats.failures == []
    assert server.stats.tokens_accepted == total
    # The server's own log never held more than the quota in any window of its clock.
    accepted = server.stats.accepted
    for end, _ in accepted:
        assert sum(tokens for at, tokens in accepted if end - 1.0 < at <= end) <= tpm
