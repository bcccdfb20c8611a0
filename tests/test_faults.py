"""Server faults end to end: a job against a LocalServer that fails on purpose, over real HTTP.

The server answers 3% of requests with 503 and 1% with 504, resets 1% of connections halfway
through the answer, stalls 0.5% past the client's read timeout, and is restarted once while the job
runs. The job must still finish with every row equal to the server's vector for its input, in
input order, and without amplifying retries: the server sees at most 1.1 x (the requests of the
same job against a fault-free server + the faults it injected). Each fault costs exactly one more
request when retries are right, so the 10% is slack for scheduling, not for the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

import numpy as np
import orjson
import pytest

from sfembed import (
    APIConnectionError,
    BatchLimits,
    EmbeddingClient,
    JobStats,
    RateLimits,
    RetryPolicy,
    Settings,
    Timeouts,
    embed_stream,
    load_settings,
)
from sfembed._cache import normalise
from sfembed._dispatch import _StallClock
from sfembed._job import JobSummary, run_job
from sfembed._writers import ids_path_for
from sfembed.testing import (
    Faults,
    LocalServer,
    ServerStats,
    expected_embedding,
    synthetic_corpus,
)

#: The ``make_server`` fixture of conftest: ``await make_server(**ServerConfig fields)``.
MakeServer = Callable[..., Awaitable[LocalServer]]

KEY = "sk-local-test"
M3 = "BAAI/bge-m3"
READ_S = 1.0  # the client's read timeout: every stall outlasts it, no healthy answer does
#: The faults of the requirement. A stall outlasts every run here (the stop at the end cuts it
#: off), so no stalled request is ever answered: see ``injected``.
FAULTS = Faults(
    rate_503=0.03, rate_504=0.01, rate_reset=0.01, rate_stall=0.005, stall_s=30.0, seed=11
)
#: Small requests so a few thousand documents make enough requests for every kind of fault.
SETTINGS = load_settings(
    model=M3,
    rate=RateLimits(rpm=10**7, tpm=10**10),  # the limiter never holds anything back
    # Fast backoff, with attempts enough that even short draws of the jitter add up to more
    # than a restart keeps the port closed (DOWN_S and the stop's grace of 0.1 s).
    retry=RetryPolicy(max_attempts=20, initial_backoff_s=0.01, max_backoff_s=0.2),
    batch=BatchLimits(max_items=4),
    concurrency=8,
)
BOUND = 1.1
DOWN_S = 0.1  # how long the restart keeps the port closed, as a process restart would

TEXTS = [f"doc {n}: {text[:120]}" for n, text in enumerate(synthetic_corpus(3000, seed=21))]


# --- helpers -------------------------------------------------------------------------------------


def injected(stats: ServerStats) -> dict[str, int]:
    """The faults the server injected, by kind.

    A request is answered (``by_status``), reset, stalled or dropped by the restart. No stall is
    ever answered (``stall_s`` outlasts the run), so what is neither answered nor reset and not a
    stall was dropped by the restart.
    """
    unanswered = stats.requests - sum(stats.by_status.values()) - stats.resets
    return {
        "503": stats.by_status[503],
        "504": stats.by_status[504],
        "reset": stats.resets,
        "stall": stats.stalls,
        "dropped": unanswered - stats.stalls,
    }


def assert_every_fault_injected(stats: ServerStats) -> None:
    """The run met every fault of the requirement, not just some (the restart is checked by
    MidRunRestart)."""
    faults = injected(stats)
    assert faults["dropped"] >= 0, faults  # else a stall was answered and the count is off
    assert min(faults[kind] for kind in ("503", "504", "reset", "stall")) > 0, faults


def assert_bounded(server: LocalServer, fault_free: int) -> None:
    assert_every_fault_injected(server.stats)
    faults = injected(server.stats)
    assert server.stats.requests <= BOUND * (fault_free + sum(faults.values())), faults


def assert_rows(rows: np.ndarray, texts: Sequence[str]) -> None:
    assert rows.shape == (len(texts), 1024)
    assert not np.isnan(rows).any()
    expected = np.stack([expected_embedding(M3, normalise(text)) for text in texts])  # as sent
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-6)


def client_for(server: LocalServer) -> EmbeddingClient:
    return EmbeddingClient(api_key=KEY, base_url=server.url, timeouts=Timeouts(read_s=READ_S))


def settings_for(server: LocalServer) -> Settings:
    return dataclasses.replace(SETTINGS, base_url=server.url)


class MidRunRestart:
    """Restarts the server once, from a task of its own, when the job has handed over ``after``
    rows and has requests in flight: the senders find their pooled connections closed, the port
    refusing for DOWN_S, and stalled requests cut off."""

    def __init__(self, server: LocalServer, after: int) -> None:
        self.server = server
        self.after = after
        self.rows_seen = 0  # rows handed over when the restart began
        self.requests_before = -1  # server requests when the restart began
        self._reached = asyncio.Event()
        self._stats = JobStats()
        self._task: asyncio.Task[None] | None = None

    def on_batch(self, stats: JobStats) -> None:
        if stats.rows >= self.after and not self._reached.is_set():
            self.rows_seen = stats.rows
            self._stats = stats
            self._reached.set()

    async def _restart(self) -> None:
        await self._reached.wait()
        await until(lambda: self._stats.in_flight > 0)
        self.requests_before = self.server.stats.requests
        await self.server.stop()
        await asyncio.sleep(DOWN_S)
        await self.server.start()

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._restart())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        if not self._reached.is_set():  # the job ended (or failed) first: nothing to wait for
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def assert_mid_run(self, total_rows: int, stats: JobStats) -> None:
        """The restart happened with rows still to come, requests were sent after it, and the
        client felt it: it retried more often than the server injected faults, the rest being
        requests the restart broke off or refused before the server saw them."""
        assert 0 < self.rows_seen < total_rows
        assert 0 < self.requests_before < self.server.stats.requests
        assert stats.retries > sum(injected(self.server.stats).values())


async def stream_rows(
    server: LocalServer, texts: Sequence[str], restart: MidRunRestart | None = None
) -> tuple[list[int], np.ndarray, JobStats]:
    """Positions and rows of an ``embed_stream`` job, in the order they were handed over."""
    stats = JobStats()
    positions: list[int] = []
    parts: list[np.ndarray] = []
    async with client_for(server) as client:
        stream = embed_stream(
            texts, model=M3, settings=settings_for(server), client=client, stats=stats
        )
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                positions.extend(batch.positions.tolist())
                parts.append(batch.embeddings)
                if restart is not None:
                    restart.on_batch(stats)
    return positions, np.concatenate(parts), stats


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded polling, not a timing assertion) until ``condition()`` holds."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


# --- embed_stream --------------------------------------------------------------------------------


async def test_stream_survives_faults_and_a_restart_with_bounded_retries(
    make_server: MakeServer,
) -> None:
    clean = await make_server()
    await stream_rows(clean, TEXTS)
    fault_free = clean.stats.requests

    server = await make_server(faults=FAULTS)
    async with MidRunRestart(server, after=len(TEXTS) // 2) as restart:
        positions, rows, stats = await stream_rows(server, TEXTS, restart)
    restart.assert_mid_run(len(TEXTS), stats)
    assert positions == list(range(len(TEXTS)))
    assert_rows(rows, TEXTS)
    assert stats.failures == []
    assert_bounded(server, fault_free)


# --- run_job: file to .npy -----------------------------------------------------------------------


def jsonl(path: Path, lines: Sequence[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def records(texts: Sequence[str]) -> list[bytes]:
    return [orjson.dumps({"id": f"d{n}", "text": text}) for n, text in enumerate(texts)]


async def job(
    server: LocalServer, source: Path, out: Path, restart: MidRunRestart | None = None
) -> JobSummary:
    on_batch = restart.on_batch if restart is not None else None
    async with client_for(server) as client:
        return await run_job(source, out, settings_for(server), client=client, on_batch=on_batch)


def output_in(folder: Path) -> Path:
    """``out.npy`` in a folder of its own: a job's vector cache lives beside its output, and a
    run must not find the vectors of an earlier one there (it would send nothing)."""
    folder.mkdir()
    return folder / "out.npy"


def errors_file(out: Path) -> Path:
    return Path(f"{out}.errors.jsonl")


def sidecar_ids(out: Path) -> list[str]:
    lines = ids_path_for(out).read_bytes().splitlines()
    return [str(orjson.loads(line)["id"]) for line in lines]


async def test_job_to_npy_survives_faults_and_a_restart(
    make_server: MakeServer, tmp_path: Path
) -> None:
    source = jsonl(tmp_path / "in.jsonl", records(TEXTS))
    clean = await make_server()
    await job(clean, source, output_in(tmp_path / "clean"))
    fault_free = clean.stats.requests

    server = await make_server(faults=FAULTS)
    out = output_in(tmp_path / "faults")
    async with MidRunRestart(server, after=len(TEXTS) // 2) as restart:
        summary = await job(server, source, out, restart)
    restart.assert_mid_run(len(TEXTS), summary.stats)
    assert summary.rows == len(TEXTS)
    assert summary.failed == 0
    assert summary.errors_path is None
    assert not errors_file(out).exists()
    assert_rows(np.load(out), TEXTS)
    assert sidecar_ids(out) == [f"d{n}" for n in range(len(TEXTS))]
    assert_bounded(server, fault_free)


#: Lines the reader flags, as (line, id the errors file names, words its reason holds). A line
#: with no readable id is named by its line number, filled in where the line lands ("#").
BAD_LINES: list[tuple[bytes, str, str]] = [
    (b'{"id": "broken", "text": ', "#", "malformed JSON"),
    (b'{"id": "no-text"}', "no-text", "missing text field"),
    (b'{"id": "empty", "text": ""}', "empty", "empty text"),
    (b'{"id": "number", "text": 42}', "number", "not a string"),
    (b'{"id": "null", "text": null}', "null", "not a string"),
    (b'{"id": "spaces", "text": " \\t "}', "spaces", "whitespace-only"),
    (b'{"id": "latin1", "text": "caf\xe9"}', "#", "invalid UTF-8"),
    (b'{"id": "raw-nul", "text": "a\x00b"}', "#", "NUL byte"),
    (b'{"id": "escaped-nul", "text": "a\\u0000b"}', "escaped-nul", "NUL byte"),
    (b'["an", "array"]', "#", "not a JSON object"),
    (b"", "#", "blank line"),
]


def mixed_input(
    texts: Sequence[str], every: int
) -> tuple[list[bytes], dict[int, tuple[str | None, str]]]:
    """Good records with a bad line after every ``every``-th, cycling through BAD_LINES; and for
    each bad line number (1-based) its expected (id, reason words)."""
    lines: list[bytes] = []
    bad: dict[int, tuple[str | None, str]] = {}
    cycle = _cycle(BAD_LINES)
    for good in records(texts):
        lines.append(good)
        if len(lines) % every == 0:
            raw, ident, reason = next(cycle)
            lines.append(raw)
            bad[len(lines)] = (None if ident == "#" else ident, reason)  # "#": no readable id
    return lines, bad


def _cycle(items: Sequence[tuple[bytes, str, str]]) -> Iterator[tuple[bytes, str, str]]:
    while True:
        yield from items


async def test_every_record_is_a_row_or_an_error_entry_under_faults(
    make_server: MakeServer, tmp_path: Path
) -> None:
    texts = TEXTS[:2000]
    lines, bad = mixed_input(texts, every=90)
    assert len(bad) >= 2 * len(BAD_LINES)  # every kind, before and after the restart
    source = jsonl(tmp_path / "in.jsonl", lines)
    server = await make_server(faults=FAULTS)
    out = tmp_path / "out.npy"
    async with MidRunRestart(server, after=len(lines) // 2) as restart:
        summary = await job(server, source, out, restart)
    restart.assert_mid_run(len(lines), summary.stats)

    errors = [orjson.loads(line) for line in errors_file(out).read_bytes().splitlines()]
    rows = np.load(out)
    embedded = ~np.isnan(rows).any(axis=1)
    # The invariant: every record is an embedded row or an entry of the errors file, never both.
    assert int(embedded.sum()) + len(errors) == len(lines) == summary.rows
    assert summary.failed == len(errors)
    assert summary.errors_path == errors_file(out)
    assert sorted(entry["line"] for entry in errors) == sorted(bad)
    for entry in errors:
        ident, reason = bad[entry["line"]]
        assert entry["id"] == ident
        assert reason in entry["reason"]
        assert not embedded[entry["line"] - 1]  # line n is row n - 1
    good = [line - 1 for line in range(1, len(lines) + 1) if line not in bad]
    assert_rows(rows[good], texts)
    ids = sidecar_ids(out)
    assert [ids[row] for row in good] == [f"d{n}" for n in range(len(texts))]
    assert_every_fault_injected(server.stats)


@pytest.mark.parametrize("kind", ["503", "504", "reset", "stall"])
async def test_each_fault_costs_exactly_one_more_request(
    make_server: MakeServer, kind: str
) -> None:
    # The bound above, without its slack, one kind at a time: a fault is retried once, and the
    # retry is the only extra request (nothing that succeeded is sent again).
    texts = TEXTS[:40]
    clean = await make_server()
    await stream_rows(clean, texts)
    server = await make_server(faults=Faults(stall_s=30.0))
    server.inject(kind, 3)
    positions, rows, stats = await stream_rows(server, texts)
    assert positions == list(range(len(texts)))
    assert_rows(rows, texts)
    assert sum(injected(server.stats).values()) == 3
    assert server.stats.requests == clean.stats.requests + 3
    assert stats.retries == 3


# --- the server's own count ----------------------------------------------------------------------


async def test_a_request_cut_off_by_a_restart_during_its_latency_is_no_answer(
    make_server: MakeServer,
) -> None:
    # The bound counts what a restart drops as "neither answered nor reset". A request whose
    # answer is decided but still waiting out its latency when the server stops never reaches
    # the client: it must not be counted in by_status (the grace of a stop is 0.1 s).
    server = await make_server(faults=Faults(latency_s=5.0))
    async with client_for(server) as client:
        sending = asyncio.create_task(client.embed(["a"], model=M3))
        await until(lambda: server.stats.requests == 1)
        await server.restart()
        with pytest.raises(APIConnectionError):
            await sending
    assert server.stats.requests == 1
    assert sum(server.stats.by_status.values()) == 0
    assert injected(server.stats)["dropped"] == 1


def test_the_stall_deadline_is_ten_times_the_median_of_recent_answers() -> None:
    clock = _StallClock(read_s=30.0)
    for _ in range(7):
        clock.add(0.5)
    assert clock.deadline_s() is None  # too few answers to judge
    clock.add(0.5)
    assert clock.deadline_s() == 5.0
    for _ in range(8):
        clock.add(2.0)
    assert clock.deadline_s() == 12.5  # the median of 8 x 0.5 s and 8 x 2 s: 1.25 s
    for _ in range(16):
        clock.add(4.0)
    assert clock.deadline_s() is None  # 30 s, no shorter than the read timeout
    quick = _StallClock(read_s=30.0)
    for _ in range(8):
        quick.add(0.01)
    assert quick.deadline_s() == 1.0  # never under a second


async def test_a_stalled_answer_is_sent_again_long_before_the_read_timeout(
    make_server: MakeServer,
) -> None:
    # One request in 30 stalls for 20 s (seed 8: the 17th); the read timeout is the default
    # 30 s. Once answers are known to come in milliseconds, the stalled one is given up on
    # after ten times their median (at least 1 s) and sent again: a retry, every row right.
    server = await make_server(faults=Faults(rate_stall=0.05, stall_s=20.0, seed=8))
    texts = [f"stall test record {i}" for i in range(30)]
    settings = load_settings(
        model=M3,
        base_url=server.url,
        concurrency=1,
        batch=BatchLimits(max_items=1),
        rate=RateLimits(rpm=10**6, tpm=10**9),
    )
    stats = JobStats()
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        stream = embed_stream(texts, model=M3, settings=settings, client=client, stats=stats)
        rows = [batch.embeddings async for batch in stream]
    assert server.stats.stalls >= 1
    assert stats.retries >= 1
    assert_rows(np.concatenate(rows), texts)
