"""The pieces of bench_versus.py that run in child processes: the server, and one client per run.

The server is the local server of :mod:`sfembed.testing` in its own process, as in _harness, and
it also notes when it answered 429 (it keeps no such log itself, so a task reads its counters every
10 ms). Each client runs in a fresh process of its own so that its peak RSS is its own; it embeds
the corpus, checks every row against the server's vector and sends back figures, not rows.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing as mp
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from _harness import server_process

from sfembed import testing

MODEL = "BAAI/bge-m3"
KEY = "sk-local-test"
BATCH = 64  # documents per request for the two OpenAI-client runs (the server's maximum)
PARALLEL = 16  # requests in flight for the openai-python run
_SAMPLE_S = 0.01


@dataclass
class ServerLog:
    """What the server saw: accepted (time, tokens), answers by status, and 429 times."""

    accepted: list[tuple[float, int]]
    by_status: Counter[int]
    limited_at: list[float]


@dataclass
class Job:
    """What a client run is given."""

    client: str
    url: str
    documents: int
    seed: int
    rpm: int
    tpm: int
    window_s: float
    cap_s: float


@dataclass
class Outcome:
    """What a client run sends back."""

    client: str
    started: float
    finished: float
    rss_mb: float
    returned: int
    lost: int
    misplaced: int
    swapped: int  # misplaced rows that hold the vector of another document of their 64-block
    error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.finished - self.started


# --- the server ---------------------------------------------------------------------------------


def _serve(config: testing.ServerConfig, conn: Connection) -> None:
    async def run() -> None:
        async with testing.LocalServer(config) as server:
            conn.send(server.url)
            stop = asyncio.get_running_loop().run_in_executor(None, conn.recv)
            limited_at: list[float] = []
            while not stop.done():
                stats = server.stats
                new = stats.rate_limited_tpm + stats.rate_limited_rpm - len(limited_at)
                limited_at += [time.monotonic()] * new
                await asyncio.wait({stop}, timeout=_SAMPLE_S)
            stats = server.stats
            conn.send(ServerLog(list(stats.accepted), Counter(stats.by_status), limited_at))

    asyncio.run(run())


@contextmanager
def sampled_server(config: testing.ServerConfig) -> Iterator[tuple[str, list[ServerLog]]]:
    """Yield (url, box); after the block the box holds the server's log."""
    with server_process(config, _serve) as (url, box):
        yield url, box


# --- the clients --------------------------------------------------------------------------------
# Each fills ``out`` (one slot per document, None until embedded) and may add to ``notes``.

Rows = list[Any]
Runner = Callable[[Job, list[str], Rows, dict[str, Any]], Awaitable[None]]


async def _sfembed(job: Job, documents: list[str], out: Rows, notes: dict[str, Any]) -> None:
    import sfembed

    rate = sfembed.RateLimits(rpm=job.rpm, tpm=job.tpm, window_s=job.window_s)
    settings = sfembed.load_settings(base_url=job.url, rate=rate)
    stats = sfembed.JobStats()
    try:
        async with sfembed.EmbeddingClient(api_key=KEY, base_url=job.url) as client:
            rows = await sfembed.embed(
                documents, model=MODEL, settings=settings, client=client, stats=stats, errors="nan"
            )
        for index, row in enumerate(rows):
            out[index] = row if np.isfinite(row).all() else None
    finally:
        notes.update(retries=stats.retries, failures=len(stats.failures))


async def _openai(job: Job, documents: list[str], out: Rows, notes: dict[str, Any]) -> None:
    import openai

    failed: list[str] = []
    gate = asyncio.Semaphore(PARALLEL)
    async with openai.AsyncOpenAI(base_url=job.url, api_key=KEY) as client:

        async def batch(start: int) -> None:
            async with gate:
                try:
                    response = await client.embeddings.create(
                        model=MODEL, input=documents[start : start + BATCH]
                    )
                except openai.OpenAIError as exc:
                    failed.append(type(exc).__name__)
                    return
            for offset, item in enumerate(response.data):
                out[start + offset] = item.embedding

        try:
            await asyncio.gather(*(batch(start) for start in range(0, len(documents), BATCH)))
        finally:
            batches = -(-len(documents) // BATCH)
            notes.update(batches=batches, failed_batches=len(failed), errors=dict(Counter(failed)))


async def _langchain(job: Job, documents: list[str], out: Rows, notes: dict[str, Any]) -> None:
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(
        model=MODEL,
        base_url=job.url,
        # Typed a SecretStr, which pydantic makes of a str (no check without the bench extra).
        api_key=KEY,  # type: ignore[arg-type, unused-ignore]
        check_embedding_ctx_length=False,
        chunk_size=BATCH,
    )
    vectors = await embedder.aembed_documents(documents)
    notes.update(rows_returned=len(vectors))
    out[: len(vectors)] = vectors[: len(out)]


# Imported before the clock starts: a library's import time is not the client's speed.
_MODULES = {"sfembed": "sfembed", "openai-python": "openai", "langchain-openai": "langchain_openai"}

RUNNERS: dict[str, Runner] = {
    "sfembed": _sfembed,
    "openai-python": _openai,
    "langchain-openai": _langchain,
}


async def _capped(
    runner: Runner, job: Job, documents: list[str], out: Rows, notes: dict[str, Any]
) -> str | None:
    try:
        await asyncio.wait_for(runner(job, documents, out, notes), job.cap_s)
    except TimeoutError:
        return f"stopped at the {job.cap_s:g} s cap"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).split(' - ')[0][:120]}"
    return None


def _check(out: Rows, documents: list[str]) -> tuple[int, int, int]:
    """(lost, misplaced, swapped): rows missing, rows not their document's vector, and of those
    the ones holding the vector of another document of the same 64-document block."""
    expected = np.stack([testing.expected_embedding(MODEL, text) for text in documents])
    lost = misplaced = swapped = 0
    for index, row in enumerate(out):
        if row is None:
            lost += 1
            continue
        vector = np.asarray(row, dtype=np.float32)
        if vector.shape == expected[index].shape and np.allclose(
            vector, expected[index], atol=1e-5
        ):
            continue
        misplaced += 1
        block = expected[index - index % BATCH : index - index % BATCH + BATCH]
        if vector.shape == block.shape[1:]:
            swapped += bool(np.isclose(block, vector, atol=1e-5).all(axis=1).any())
    return lost, misplaced, swapped


def run_client(job: Job, conn: Connection) -> None:
    """Child process: embed the corpus with ``job.client`` and send back an Outcome."""
    documents = list(testing.synthetic_corpus(job.documents, seed=job.seed, long_every=0))
    out: Rows = [None] * len(documents)
    notes: dict[str, Any] = {}
    importlib.import_module(_MODULES[job.client])
    started = time.monotonic()
    error = asyncio.run(_capped(RUNNERS[job.client], job, documents, out, notes))
    finished = time.monotonic()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    returned = sum(row is not None for row in out)
    lost, misplaced, swapped = _check(out, documents)
    conn.send(
        Outcome(
            job.client, started, finished, rss_mb, returned, lost, misplaced, swapped, error, notes
        )
    )


def client_process(job: Job, grace_s: float = 60.0) -> Outcome:
    """Run ``job`` in a fresh process; one that outlives its cap by ``grace_s`` is killed."""
    parent, child = mp.Pipe()
    process = mp.get_context("spawn").Process(target=run_client, args=(job, child), daemon=True)
    started = time.monotonic()
    process.start()
    try:
        if parent.poll(job.cap_s + grace_s):
            return parent.recv()  # type: ignore[no-any-return]
        error = f"killed after {job.cap_s + grace_s:g} s"
    except EOFError:
        error = f"process died (exit code {process.exitcode})"
    finally:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
    return Outcome(job.client, started, time.monotonic(), 0.0, 0, job.documents, 0, 0, error)
