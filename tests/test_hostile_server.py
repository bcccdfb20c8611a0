"""Hostile server answers, against sfembed.testing.LocalServer over real HTTP.

Gateways and proxies in front of the provider answer in ways the provider never does: a 200 that
holds an error or an HTML page, vectors with NaN, strings or booleans in them, the wrong number of
vectors, no ``usage`` or an impossible one, a gzip-encoded body, an answer that trickles in byte
by byte, a 405 or a redirect, a ``Retry-After`` of an hour. Each is refused, retried, tolerated or
stops the job with one clear message, as it deserves; a job's rows + failures always equal its
records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hostile import nothing_listening

from sfembed import (
    DEFAULT_CATALOG,
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    BatchLimits,
    EmbeddingCache,
    EmbeddingClient,
    JobStats,
    MalformedResponseError,
    RateLimits,
    RetryPolicy,
    ServerError,
    Settings,
    Timeouts,
    embed,
    embed_stream,
    load_settings,
)
from sfembed._cache import normalise
from sfembed._cli import main
from sfembed._limiter import LocalTicket, RateLimiter
from sfembed._retry import call_with_retries
from sfembed._tokenizers import counter_for
from sfembed._types import EncodingFormat
from sfembed.testing import (
    Faults,
    LocalServer,
    count_tokens,
    expected_embedding,
    synthetic_corpus,
)

#: The ``make_server`` fixture of conftest: ``await make_server(**ServerConfig fields)``.
MakeServer = Callable[..., Awaitable[LocalServer]]

KEY = "sk-local-test"
M3 = "BAAI/bge-m3"
UNLIMITED = RateLimits(rpm=10**7, tpm=10**10)
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
TEXTS = [f"record {n}: {text[:160]}" for n, text in enumerate(synthetic_corpus(40, seed=5))]


def settings_for(server: LocalServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"rate": UNLIMITED, "retry": FAST_RETRY, "concurrency": 4}
    values["batch"] = BatchLimits(max_items=4)
    return load_settings(base_url=server.url, **(values | overrides))


def client_for(server: LocalServer, **options: Any) -> EmbeddingClient:
    return EmbeddingClient(api_key=KEY, base_url=server.url, **options)


def expected_rows(items: Sequence[str], model: str = M3) -> np.ndarray:
    return np.stack([expected_embedding(model, normalise(item)) for item in items])


# --- one request: damaged answers are refused, retryable ----------------------------------------

DAMAGED = ["nan", "inf", "string-floats", "bool-floats"]
DAMAGED += ["missing-item", "extra-item", "duplicate-index", "wrong-dims"]


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("kind", DAMAGED)
async def test_a_damaged_answer_is_refused_as_malformed(
    server: LocalServer, kind: str, encoding: EncodingFormat
) -> None:
    server.inject(kind)
    async with client_for(server) as client:
        with pytest.raises(MalformedResponseError) as info:
            await client.embed(["one", "two", "three"], model=M3, encoding_format=encoding)
        assert info.value.retryable
        assert info.value.status == 200
        assert info.value.trace_id
        # The session is still good, and the next answer is taken.
        result = await client.embed(["one"], model=M3, encoding_format=encoding)
    np.testing.assert_array_equal(result.embeddings, expected_rows(["one"]))


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("nan", "nulls"),  # JSON has no NaN: encoders write null
        ("inf", "NaN or infinity"),
        ("string-floats", "strings"),
        ("bool-floats", "booleans"),
    ],
)
async def test_a_refusal_of_values_says_what_was_wrong(
    server: LocalServer, kind: str, words: str
) -> None:
    server.inject(kind)
    async with client_for(server) as client:
        with pytest.raises(MalformedResponseError, match=words):
            await client.embed(["one", "two"], model=M3, encoding_format="float")


async def test_a_200_holding_an_error_says_so(server: LocalServer) -> None:
    server.inject("error-200")
    async with client_for(server) as client:
        with pytest.raises(MalformedResponseError, match="holding an error: Model service over"):
            await client.embed("one", model=M3)


async def test_an_html_page_is_named_by_its_title(server: LocalServer) -> None:
    server.inject("html-502")
    server.inject("html-200")
    async with client_for(server) as client:
        with pytest.raises(ServerError) as info:
            await client.embed("one", model=M3)
        assert info.value.retryable
        assert info.value.message == "an HTML error page: 502 Bad Gateway"
        with pytest.raises(MalformedResponseError, match="not valid JSON"):
            await client.embed("one", model=M3)


@pytest.mark.parametrize("kind", ["no-usage", "negative-usage", "huge-usage", "zero-usage"])
async def test_an_answer_without_a_true_usage_keeps_its_vectors(
    server: LocalServer, kind: str
) -> None:
    server.inject(kind)
    async with client_for(server) as client:
        result = await client.embed(["one", "two"], model=M3)
    assert result.usage is None
    np.testing.assert_array_equal(result.embeddings, expected_rows(["one", "two"]))


@pytest.mark.parametrize("kind", ["gzip", "bom"])
async def test_a_gzip_encoded_answer_or_one_with_a_byte_order_mark_is_read(
    server: LocalServer, kind: str
) -> None:
    server.inject(kind)
    async with client_for(server) as client:
        result = await client.embed(["one", "two"], model=M3)
    np.testing.assert_array_equal(result.embeddings, expected_rows(["one", "two"]))
    assert result.usage is not None


async def test_an_answer_that_trickles_in_meets_the_request_deadline(
    make_server: MakeServer,
) -> None:
    server = await make_server(faults=Faults(trickle_s=0.02))
    server.inject("trickle")
    # Each byte comes well within the read timeout: only the whole-request deadline can end it.
    async with client_for(server, timeouts=Timeouts(read_s=10.0, request_s=0.3)) as client:
        with pytest.raises(APITimeoutError, match=r"request_s"):
            await client.embed("one", model=M3)
        result = await client.embed("one", model=M3)
    np.testing.assert_array_equal(result.embeddings, expected_rows(["one"]))


async def test_an_answer_for_another_model_is_told_once(
    server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.inject("other-model", 2)
    async with client_for(server) as client:
        with caplog.at_level(logging.WARNING, logger="sfembed"):
            first = await client.embed("one", model=M3)
            await client.embed("two", model=M3)
    assert first.model == "Acme/another-model"
    assert caplog.text.count("answered for model 'Acme/another-model'") == 1


async def test_a_long_retry_after_is_logged_by_a_job(
    server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.inject("429-hour")
    async with client_for(server) as client:
        with caplog.at_level(logging.INFO, logger="sfembed"):
            await embed(TEXTS[:4], model=M3, settings=settings_for(server), client=client)
    assert "asked to wait 3600 s" in caplog.text
    assert "no request starts for 0.1 s" in caplog.text


async def test_an_endless_answer_is_refused_unbuffered(server: LocalServer) -> None:
    server.inject("endless")
    async with client_for(server) as client:
        with pytest.raises(MalformedResponseError, match="more than its vectors could take"):
            await client.embed("one", model=M3)
        result = await client.embed("one", model=M3)
    np.testing.assert_array_equal(result.embeddings, expected_rows(["one"]))


@pytest.mark.parametrize("kind", ["405", "redirect"])
async def test_a_request_wide_status_is_final(server: LocalServer, kind: str) -> None:
    server.inject(kind)
    async with client_for(server) as client:
        with pytest.raises(APIStatusError) as info:
            await client.embed("one", model=M3)
    assert not info.value.retryable
    assert server.stats.requests == 1  # a redirect is never followed
    if kind == "redirect":
        assert info.value.status == 301
        assert "api.example.com/v1/embeddings" in info.value.message


@pytest.mark.parametrize("kind", ["429-hour", "429-date"])
async def test_a_long_retry_after_is_capped_by_the_policy(
    server: LocalServer, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.inject(kind)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(max_attempts=3, max_backoff_s=7.0)
    async with client_for(server) as client:
        with caplog.at_level(logging.WARNING, logger="sfembed"):
            result = await call_with_retries(
                lambda: client.embed("one", model=M3), policy, sleep=sleep
            )
    np.testing.assert_array_equal(result.embeddings, expected_rows(["one"]))
    assert waits == [7.0]
    assert "asked to wait 3" in caplog.text  # 3600 s, or a few seconds less for a date
    assert "waiting 7 s" in caplog.text


# --- a job: what each answer costs ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf", "string-floats", "bool-floats", "wrong-dims"])
@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_a_job_retries_a_damaged_answer_and_fails_it_with_a_reason(
    server: LocalServer, kind: str, encoding: str
) -> None:
    texts = TEXTS[:6]
    server.inject(kind, FAST_RETRY.max_attempts)  # the first request, every attempt
    stats = JobStats()
    settings = settings_for(server, concurrency=1, encoding_format=encoding)
    async with client_for(server) as client:
        rows = await embed(
            texts, model=M3, settings=settings, client=client, stats=stats, errors="nan"
        )
    failed = [failure.position for failure in stats.failures]
    # rows + errors = records: each failed record is listed, and its row is NaN, not a vector.
    assert failed == [0, 1, 2, 3]  # the first request's items
    assert all("bad embedding values" in failure.reason for failure in stats.failures)
    assert np.isnan(rows[:4]).all()
    np.testing.assert_array_equal(rows[4:], expected_rows(texts[4:]))
    assert stats.retries == FAST_RETRY.max_attempts - 1


async def test_a_damaged_answer_once_costs_one_retry(server: LocalServer) -> None:
    server.inject("nan")
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(
            TEXTS, model=M3, settings=settings_for(server), client=client, stats=stats
        )
    np.testing.assert_array_equal(rows, expected_rows(TEXTS))
    assert not np.isnan(rows).any()
    assert stats.failures == []
    assert stats.retries == 1


class RecordingLimiter(RateLimiter):
    """A local limiter that keeps every charge asked for and every ticket issued."""

    def __init__(self, rate: RateLimits) -> None:
        super().__init__(rate)
        self.asked: list[int] = []
        self.tickets: list[LocalTicket] = []

    async def acquire(self, tokens: int) -> LocalTicket:
        self.asked.append(tokens)
        ticket = await super().acquire(tokens)
        self.tickets.append(ticket)
        return ticket


@pytest.mark.parametrize(
    "kind", ["no-usage", "negative-usage", "huge-usage", "zero-usage", "tiny-usage"]
)
async def test_answers_without_a_true_usage_keep_their_charge(
    server: LocalServer, kind: str
) -> None:
    server.inject(kind, 10_000)  # every answer
    texts = [f"record {n:02}: " + "lorem ipsum dolor sit amet " * 6 for n in range(40)]
    limiter = RecordingLimiter(RateLimits(rpm=10**6, tpm=10**9))
    stats = JobStats()
    settings = settings_for(server, batch=BatchLimits(max_items=2))
    async with client_for(server) as client:
        rows: list[np.ndarray] = []
        async for batch in embed_stream(
            texts, model=M3, settings=settings, client=client, stats=stats, limiter=limiter
        ):
            rows.append(batch.embeddings)
    np.testing.assert_array_equal(np.concatenate(rows), expected_rows(texts))
    assert stats.failures == []
    assert len(limiter.tickets) == stats.requests == len(texts) // 2
    # Never settled at 0 (or below): each request keeps what it was charged, and the charges
    # of the last requests are no smaller than a local estimate (calibration never fell to 0).
    assert all(ticket.tokens > 0 for ticket in limiter.tickets)
    assert min(limiter.asked) > 0
    # Requests alike are charged alike: calibration never fell below its prior.
    assert max(limiter.asked) == min(limiter.asked)
    assert stats.tokens == sum(ticket.tokens for ticket in limiter.tickets)


async def test_a_long_retry_after_does_not_freeze_the_job(server: LocalServer) -> None:
    server.inject("429-hour")
    server.inject("429-date")
    stats = JobStats()
    async with client_for(server) as client:
        rows = await embed(
            TEXTS, model=M3, settings=settings_for(server), client=client, stats=stats
        )
    np.testing.assert_array_equal(rows, expected_rows(TEXTS))
    assert stats.rate_limited == 2


async def test_a_trickling_answer_is_retried_in_a_job(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(trickle_s=0.02))
    server.inject("trickle")
    stats = JobStats()
    timeouts = Timeouts(read_s=10.0, request_s=0.3)
    async with client_for(server, timeouts=timeouts) as client:
        rows = await embed(
            TEXTS, model=M3, settings=settings_for(server), client=client, stats=stats
        )
    np.testing.assert_array_equal(rows, expected_rows(TEXTS))
    assert stats.retries == 1


# --- the cache knows which server made a vector -------------------------------------------------


async def test_vectors_of_one_server_are_not_served_for_another(
    make_server: MakeServer, tmp_path: Path
) -> None:
    trial = await make_server()  # a --local trial run
    real = await make_server()  # then the run against the real endpoint
    path = tmp_path / "cache.sqlite"
    for server in (trial, real):
        stats = JobStats()
        async with EmbeddingCache(path) as cache, client_for(server) as client:
            rows = [
                batch.embeddings
                async for batch in embed_stream(
                    TEXTS,
                    model=M3,
                    settings=settings_for(server),
                    client=client,
                    stats=stats,
                    cache=cache,
                )
            ]
        np.testing.assert_array_equal(np.concatenate(rows), expected_rows(TEXTS))
        assert stats.cached == 0
    assert trial.stats.tokens_accepted == real.stats.tokens_accepted > 0
    # The same server's vectors are found again.
    stats = JobStats()
    async with EmbeddingCache(path) as cache, client_for(real) as client:
        async for _ in embed_stream(
            TEXTS, model=M3, settings=settings_for(real), client=client, stats=stats, cache=cache
        ):
            pass
    assert stats.cached == len(TEXTS)


# --- refusals the engine narrows: the item cap and blank pieces hold ------------------------------

EN = "BAAI/bge-large-en-v1.5"  # bert-en, 512 tokens
EN_COUNTER = counter_for(DEFAULT_CATALOG[EN])
_WORDS = " ".join(t for t in synthetic_corpus(600, seed=3, long_every=0) if t.isascii()).split()


def english(tokens: int, start: int = 0) -> str:
    """English text of at most ``tokens`` tokens by bge-large-en's count, as long as allowed."""
    low, high = 1, len(_WORDS) - start
    while low < high:
        middle = (low + high + 1) // 2
        if EN_COUNTER.count([" ".join(_WORDS[start : start + middle])])[0] <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(_WORDS[start : start + low])


async def test_a_refused_near_limit_text_is_halved_within_a_batch_size_of_one(
    server: LocalServer,
) -> None:
    near = english(505, start=900)  # within the limit by our count, over it by the server's
    assert EN_COUNTER.count([near])[0] <= 512 < count_tokens(near, DEFAULT_CATALOG[EN])
    texts = ["first", near, "last"]
    stats = JobStats()
    settings = settings_for(server, batch=BatchLimits(max_items=1))
    async with client_for(server) as client:
        rows = await embed(texts, model=EN, settings=settings, client=client, stats=stats)
    assert stats.failures == []
    assert server.stats.by_status[400] == 1
    np.testing.assert_array_equal(rows[[0, 2]], expected_rows(["first", "last"], EN))
    np.testing.assert_allclose(np.linalg.norm(rows[1]), 1.0, atol=1e-5)
    assert stats.requests == 4  # first, the two halves of near (one each), last


QWEN = "Qwen/Qwen3-Embedding-0.6B"  # byte-level BPE, 32768 tokens


@pytest.mark.parametrize("mode", ["pool", "chunks"])
async def test_a_long_whitespace_run_does_not_fail_its_record(
    server: LocalServer, mode: str
) -> None:
    words = " ".join(synthetic_corpus(3000, seed=3, long_every=0))
    # " \t" is a token per pair for Qwen3: 80,000 of them fill whole pieces with blanks alone.
    long = words[:60000] + " \t" * 80000 + words[60000:120000]
    stats = JobStats()
    settings = settings_for(server, long_mode=mode)
    async with client_for(server) as client:
        rows = await embed(
            [long, "short"], model=QWEN, settings=settings, client=client, stats=stats
        )
    assert stats.failures == []
    assert not np.isnan(rows).any()
    np.testing.assert_array_equal(rows[-1], expected_rows(["short"], QWEN)[0])
    assert len(rows) == (2 if mode == "pool" else stats.chunks)


# --- request-wide errors stop the job with one message ------------------------------------------

RECORDS = [f"record {n}: {text[:80]}" for n, text in enumerate(synthetic_corpus(200, seed=9))]


@pytest.mark.parametrize("kind", ["405", "redirect"])
async def test_a_request_wide_status_stops_the_job_at_once(server: LocalServer, kind: str) -> None:
    server.inject(kind, 10_000)
    stats = JobStats()
    async with client_for(server) as client:
        with pytest.raises(APIStatusError, match="the job stops here") as info:
            await embed(
                RECORDS, model=M3, settings=settings_for(server), client=client, stats=stats
            )
    assert not info.value.retryable
    assert stats.failures == []  # not one error line per record
    assert server.stats.requests <= 1 + settings_for(server).concurrency


async def test_a_400_for_every_request_stops_the_job_without_walking_the_corpus(
    server: LocalServer,
) -> None:
    server.inject("400", 100_000)
    stats = JobStats()
    settings = settings_for(server, batch=BatchLimits(max_items=16))
    async with client_for(server) as client:
        with pytest.raises(BadRequestError, match="in a row with the same error") as info:
            await embed(RECORDS, model=M3, settings=settings, client=client, stats=stats)
    assert "parameter is invalid" in str(info.value)
    # Far fewer requests than the two per record that narrowing each refusal down would take.
    assert server.stats.requests < len(RECORDS) // 2
    assert len(stats.failures) < 16 + settings.concurrency * 2


@pytest.mark.parametrize("kind", ["503", "html-502", "reset"])
async def test_an_outage_outlasting_the_retries_stops_the_job(
    server: LocalServer, kind: str
) -> None:
    server.inject(kind, 100_000)
    stats = JobStats()
    async with client_for(server) as client:
        with pytest.raises(APIError, match="requests failed in a row") as info:
            await embed(
                RECORDS, model=M3, settings=settings_for(server), client=client, stats=stats
            )
    assert not info.value.retryable
    assert len(stats.failures) < len(RECORDS) // 4


@pytest.mark.parametrize(
    ("records", "says"),
    [
        (len(RECORDS), "requests failed in a row"),
        # Too small for a streak in a row: it must not end as a success of failed rows.
        (3, "1 requests ran out of retries and none succeeded"),
    ],
)
async def test_a_refused_connection_at_the_start_stops_the_job(records: int, says: str) -> None:
    url = nothing_listening()
    settings = load_settings(base_url=url, rate=UNLIMITED, retry=FAST_RETRY)
    async with EmbeddingClient(api_key=KEY, base_url=url) as client:
        with pytest.raises(APIConnectionError, match=says):
            await embed(RECORDS[:records], model=M3, settings=settings, client=client)


async def test_inputs_refused_one_by_one_among_good_ones_do_not_stop_the_job(
    server: LocalServer,
) -> None:
    vl = "Qwen/Qwen3-VL-Embedding-8B"
    items: list[Any] = list(RECORDS[:120])
    bad = list(range(0, 120, 3))  # 40 bad inputs, each refused alone by the server (400)
    for n in bad:
        items[n] = {"image": "not base64!!"}
    stats = JobStats()
    settings = settings_for(server, batch=BatchLimits(max_items=8), concurrency=1)
    async with client_for(server) as client:
        rows = await embed(
            items, model=vl, settings=settings, client=client, stats=stats, errors="nan"
        )
    assert [failure.position for failure in stats.failures] == bad
    assert np.isnan(rows[bad]).all()
    assert not np.isnan(np.delete(rows, bad, axis=0)).any()


# --- the command line ---------------------------------------------------------------------------


@contextlib.contextmanager
def threaded_server() -> Iterator[LocalServer]:
    """A LocalServer on a loop of its own thread: the command line runs ``asyncio.run`` (and
    installs signal handlers) in the main thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = LocalServer()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def _records_file(path: Path, count: int) -> Path:
    lines = [orjson.dumps({"id": f"d{n}", "text": RECORDS[n]}) for n in range(count)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("kind", ["405", "400"])
def test_the_command_line_reports_a_request_wide_error_once(
    tmp_path: Path,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", KEY)
    source = _records_file(tmp_path / "in.jsonl", 200)
    with threaded_server() as server:
        server.inject(kind, 100_000)
        argv = ["embed", str(source), "--out", str(tmp_path / "out.npy"), "--no-progress"]
        code = main([*argv, "--base-url", server.url, "--batch-size", "8", "--concurrency", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("sfembed: error:") == 1
    assert "the job stops here" in err
    assert "Traceback" not in err
    assert KEY not in err
    errors = tmp_path / "out.npy.errors.jsonl"
    assert not errors.exists() or len(errors.read_bytes().splitlines()) < 40


def test_a_run_after_a_local_trial_takes_no_local_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", KEY)
    source = _records_file(tmp_path / "in.jsonl", 30)
    trial = ["embed", str(source), "--out", str(tmp_path / "out.npy"), "--no-progress"]
    assert main([*trial, "--local"]) == 0
    assert (tmp_path / "sfembed-cache.sqlite").exists()
    real = ["embed", str(source), "--out", str(tmp_path / "real.npy"), "--no-progress"]
    with threaded_server() as server:
        assert main([*real, "--base-url", server.url]) == 0
    assert server.stats.by_status[200] > 0
    assert server.stats.tokens_accepted > 0  # every record was sent, none taken from the cache
    np.testing.assert_array_equal(np.load(tmp_path / "real.npy"), expected_rows(RECORDS[:30]))


def test_a_job_with_damaged_answers_accounts_for_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", KEY)
    source = _records_file(tmp_path / "in.jsonl", 40)
    config = tmp_path / "job.toml"
    config.write_text("[retry]\nmax_attempts = 2\ninitial_backoff_s = 0.01\nmax_backoff_s = 0.02\n")
    out = tmp_path / "out.npy"
    with threaded_server() as server:
        server.inject("nan", 2)  # the first request, both attempts: its 8 records fail
        server.inject("no-usage", 3)
        server.inject("string-floats")  # retried once, then answered
        argv = ["embed", str(source), "--out", str(out), "--no-progress", "--config", str(config)]
        code = main([*argv, "--base-url", server.url, "--batch-size", "8", "--concurrency", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    rows = np.load(out)
    errors = [
        orjson.loads(line) for line in (tmp_path / "out.npy.errors.jsonl").read_bytes().splitlines()
    ]
    failed = sorted(int(entry["id"][1:]) for entry in errors)
    assert len(rows) == 40
    assert failed == list(range(8))  # rows + error entries = records
    assert all("NaN or infinity" in entry["reason"] for entry in errors)
    assert np.isnan(rows[:8]).all()
    np.testing.assert_array_equal(rows[8:], expected_rows(RECORDS[8:40]))
