"""Each stage of the engine on its own: cancelled wherever it waits, it closes what it was given
(so the stages after it end instead of waiting forever) and leaves no charge or half state."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import pytest

from sfembed import (
    DEFAULT_CATALOG,
    BatchLimits,
    EmbeddedBatch,
    EmbeddingClient,
    JobStats,
    RateLimits,
)
from sfembed._cache import EmbeddingCache
from sfembed._config import Settings, load_settings
from sfembed._dedup import Dedup
from sfembed._delivery import Delivery
from sfembed._dispatch import Dispatch, PacedSender
from sfembed._engine import embed_stream
from sfembed._intake import Intake, Splitter
from sfembed._limiter import ManualClock, RateLimiter
from sfembed._packer import Packer
from sfembed._reorder import ReorderBuffer
from sfembed._streams import BrokenResourceError, ReceiveStream, SendStream, open_stream
from sfembed._types import Chunk
from sfembed.testing import LocalServer

M3 = "BAAI/bge-m3"
SPEC = DEFAULT_CATALOG[M3]
DIMS = SPEC.output_dimensions(None)


async def spin(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def requests_stream(capacity: int) -> tuple[SendStream[list[Chunk]], ReceiveStream[list[Chunk]]]:
    return open_stream(capacity)


def batches_stream(capacity: int) -> tuple[SendStream[EmbeddedBatch], ReceiveStream[EmbeddedBatch]]:
    return open_stream(capacity)


def delivery_to(batches: SendStream[EmbeddedBatch], stats: JobStats) -> Delivery:
    return Delivery(ReorderBuffer(dims=DIMS, capacity=64), stats, batches)


def chunk(unit: int, text: str = "a text") -> Chunk:
    return Chunk(unit, unit, 0, text, 3)


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_intake_cancelled_closes_its_request_stream_and_row_writer() -> None:
    stats = JobStats()
    delivery = delivery_to(batches_stream(1)[0], stats)
    requests_out, requests_in = requests_stream(1)
    intake = Intake(
        load_settings(),
        Splitter(SPEC, overlap_tokens=0, exact=True),
        Dedup(None, SPEC, DIMS, stats, scope=M3, truncating=False),
        Packer(max_items=2, max_tokens=10_000),
        stats,
        requests=requests_out,
        rows=delivery.writer(),
    )
    task = asyncio.create_task(intake.run([f"text {n}" for n in range(20)]))
    await spin()
    assert not task.done()  # held by the full request stream: nobody takes requests
    await cancel(task)
    assert delivery.writers == 0
    assert [len(request) async for request in requests_in] == [2]  # what it had sent, then the end


def sender_settings() -> Settings:
    return load_settings(rate=RateLimits(rpm=1, tpm=10**6, headroom=0.0))


async def test_a_dispatch_worker_cancelled_in_the_limiter_is_charged_nothing_and_closes() -> None:
    stats = JobStats()
    settings = sender_settings()
    limiter = RateLimiter(settings.rate, ManualClock())
    await limiter.acquire(1)  # the one request of this window: the worker's must wait
    client = EmbeddingClient(
        api_key="sk-unused", base_url="http://127.0.0.1:9", allow_insecure_http=True
    )
    sender = PacedSender(settings, SPEC, client, limiter, stats)
    dedup = Dedup(None, SPEC, DIMS, stats, scope=M3, truncating=False)
    dispatch = Dispatch(
        settings, sender, dedup, halve=_unused_halve, packer=Packer(max_items=4, max_tokens=10_000)
    )
    delivery = delivery_to(batches_stream(1)[0], stats)
    requests_out, requests_in = requests_stream(1)
    worker = asyncio.create_task(dispatch.worker(requests_in, delivery.writer()))
    await requests_out.send([chunk(0)])
    await spin()
    assert limiter.queued == 1
    await cancel(worker)
    assert limiter.queued == 0
    assert stats.in_flight == 0
    assert delivery.writers == 0
    with pytest.raises(BrokenResourceError):  # its receive side is closed: nobody reads
        await requests_out.send([chunk(1)])


async def test_a_stop_cancels_a_waiting_worker_and_its_stream_ends() -> None:
    stats = JobStats()
    settings = sender_settings()
    client = EmbeddingClient(
        api_key="sk-unused", base_url="http://127.0.0.1:9", allow_insecure_http=True
    )
    sender = PacedSender(settings, SPEC, client, RateLimiter(settings.rate, ManualClock()), stats)
    dedup = Dedup(None, SPEC, DIMS, stats, scope=M3, truncating=False)
    dispatch = Dispatch(
        settings, sender, dedup, halve=_unused_halve, packer=Packer(max_items=4, max_tokens=10_000)
    )
    delivery = delivery_to(batches_stream(1)[0], stats)
    requests_out, requests_in = requests_stream(1)
    worker = asyncio.create_task(dispatch.worker(requests_in, delivery.writer()))
    await spin()
    dispatch.stop()  # it has no request out: cancelled
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert delivery.writers == 0
    requests_out.close()


async def _unused_halve(chunk: Chunk) -> list[Chunk] | None:
    raise AssertionError("nothing is refused in these tests")


async def test_delivery_cancelled_while_handing_over_closes_the_caller_stream() -> None:
    stats = JobStats()
    batches_out, batches_in = batches_stream(1)
    delivery = delivery_to(batches_out, stats)
    rows = delivery.writer()
    first = await delivery.ring.reserve(2)
    task = asyncio.create_task(delivery.run())
    rows.put([chunk(first)], np.ones((1, DIMS), dtype=np.float32))
    await spin()
    rows.put([chunk(first + 1)], np.ones((1, DIMS), dtype=np.float32))
    await spin()
    assert not task.done()  # the caller reads nothing: the second batch waits for room
    await cancel(task)
    assert [len(batch) async for batch in batches_in] == [1]  # the first batch, then the end
    assert stats.rows == 2  # counted when taken from the ring


async def test_delivery_ends_after_the_last_writer_closes_with_every_contiguous_row() -> None:
    stats = JobStats()
    batches_out, batches_in = batches_stream(4)
    delivery = delivery_to(batches_out, stats)
    one, two = delivery.writer(), delivery.writer()
    first = await delivery.ring.reserve(3)
    task = asyncio.create_task(delivery.run())
    one.put([chunk(first)], np.zeros((1, DIMS), dtype=np.float32))
    one.close()
    two.put([chunk(first + 2)], np.zeros((1, DIMS), dtype=np.float32))  # a gap at first + 1
    await spin()
    assert not task.done()  # a writer is still open: the gap may yet be filled
    two.close()
    await task
    assert [batch.positions.tolist() async for batch in batches_in] == [[first]]


async def test_a_cancelled_cache_lookup_leaves_no_text_waiting(tmp_path: Path) -> None:
    stats = JobStats()
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        dedup = Dedup(cache, SPEC, DIMS, stats, scope=M3, truncating=False)
        delivery = delivery_to(batches_stream(1)[0], stats)
        rows = delivery.writer()
        lookup = asyncio.create_task(dedup.admit([chunk(0, "the same text")], rows))
        await asyncio.sleep(0)
        lookup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lookup
        sent = await dedup.admit([chunk(1, "the same text")], rows)
        assert [c.unit for c in sent] == [1]  # sent, not held for a copy that never left
        assert stats.deduplicated == 0


async def test_a_running_job_names_its_stage_tasks() -> None:
    """The names that tests elsewhere look for to prove no stage outlives its job."""
    texts = [f"text {n}" for n in range(400)]
    async with LocalServer() as server:
        settings = load_settings(base_url=server.url, concurrency=2, batch=BatchLimits(max_items=2))
        async with (
            EmbeddingClient(api_key="sk-local-test", base_url=server.url) as client,
            contextlib.aclosing(
                embed_stream(texts, model=M3, settings=settings, client=client)
            ) as stream,
        ):
            async for _ in stream:
                names = [t.get_name() for t in asyncio.all_tasks() if not t.done()]
                assert names.count("sfembed:delivery") == 1
                assert names.count("sfembed:dispatch") == 2
                break
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("sfembed:")]


async def test_intake_sends_short_records_while_the_exact_tokenizer_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The exact count is held until the server has answered a request: short records of the
    # same block must not wait behind it, or it gives up waiting and fails this.
    from sfembed import _tokenizer_process, embed
    from sfembed.testing import expected_embedding

    real = _tokenizer_process.ExactCounting.count
    answered_during_load: list[int] = []
    server = LocalServer()

    async def held_count(self: _tokenizer_process.ExactCounting, texts: list[str]) -> list[int]:
        deadline = time.monotonic() + 45  # under the test's timeout
        while server.stats.by_status[200] == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        answered_during_load.append(server.stats.by_status[200])
        return await real(self, texts)

    monkeypatch.setattr(_tokenizer_process.ExactCounting, "count", held_count)
    short = [f"short record {i}" for i in range(20)]
    long = "river mountain winter library " * 2000  # 60,000 characters: cut in pieces
    async with server:
        settings = load_settings(base_url=server.url, rate=RateLimits(rpm=10**6, tpm=10**9))
        async with EmbeddingClient(api_key="sk-local-test", base_url=server.url) as client:
            rows = await embed([*short, long], model=M3, settings=settings, client=client)
    assert answered_during_load[0] >= 1
    for row, text in zip(rows, short, strict=False):
        assert np.array_equal(row, expected_embedding(M3, text))
    assert np.isfinite(rows[-1]).all()


def test_only_a_text_that_can_really_be_over_the_limit_is_counted_exactly() -> None:
    splitter = Splitter(SPEC, overlap_tokens=0, exact=True)
    chinese = "中文" * 3000  # 18,000 UTF-8 bytes, 6,000 characters: proved short by its length
    english = "the river " * 1000  # 10,000 characters, about 2,000 tokens: short by estimate
    long = "the river " * 8000  # about 16,000 tokens
    texts = [chinese, english, long]
    tokens = splitter.estimator.count(texts)
    assert splitter._doubtful(texts, tokens) == [2]
    assert Splitter(SPEC, overlap_tokens=0, exact=False)._doubtful(texts, tokens) == []


async def test_a_block_of_texts_is_keyed_served_and_deduplicated_as_chunk_by_chunk(
    tmp_path: Path,
) -> None:
    # The usual block is keyed as it is made, not chunk by chunk in the dedup stage: each
    # chunk must still carry its text's key, a cached text be answered from the cache and a
    # repeat wait for its first copy, whatever their places in the block.
    stats = JobStats()
    texts = [f" text {n}\r\n" for n in range(40)]
    texts[7] = texts[3]  # a repeat within the block
    texts[30] = texts[12]
    async with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        cached = np.full((1, DIMS), 0.5, dtype=np.float32)
        await cache.store(M3, DIMS, [cache.key(texts[20])], cached)
        delivery = delivery_to(batches_stream(1)[0], stats)
        requests_out, requests_in = requests_stream(64)
        intake = Intake(
            load_settings(),
            Splitter(SPEC, overlap_tokens=0, exact=True),
            Dedup(cache, SPEC, DIMS, stats, scope=M3, truncating=False),
            Packer(max_items=8, max_tokens=10_000),
            stats,
            requests=requests_out,
            rows=delivery.writer(),
        )
        await intake.run(texts)
        sent = [c for request in [r async for r in requests_in] for c in request]
    assert [c.position for c in sent] == [n for n in range(40) if n not in (7, 30, 20)]
    assert all(c.item == texts[c.position].strip() for c in sent)
    assert all(c.key == EmbeddingCache.key(texts[c.position]) for c in sent)
    assert (stats.cached, stats.deduplicated) == (1, 2)
