"""sfembed.ray.Embedder called as Ray Data calls it, with the batches of each ``batch_format``:
a batch in Ray's default format (a dict of numpy arrays) is embedded in that format, a batch of
another is refused saying which to pass, and no column of the batch is shadowed. A call
interrupted in its caller's thread leaves no job running on the embedder's loop."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pyarrow as pa
import pytest

from sfembed import BatchLimits, RateLimits
from sfembed._exceptions import ConfigError
from sfembed.ray import Embedder
from sfembed.testing import Faults, LocalServer, ServerConfig, expected_embedding

MODEL = "BAAI/bge-m3"
KEY_ENV = "SFEMBED_HUNT_RAY_KEY"
UNLIMITED = RateLimits(rpm=10**7, tpm=10**10)


@pytest.fixture
async def embedder(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Embedder]:
    monkeypatch.setenv(KEY_ENV, "sk-local-test")
    async with LocalServer() as server:  # the embedder blocks its caller: run it on a thread
        made = await asyncio.to_thread(
            Embedder,
            model=MODEL,
            quota="local",
            base_url=server.url,
            api_key_env=KEY_ENV,
            rate=UNLIMITED,
        )
        try:
            yield made
        finally:
            await asyncio.to_thread(made.close)


async def test_a_batch_in_rays_default_format_comes_back_in_it(embedder: Embedder) -> None:
    # map_batches without batch_format hands the callable a dict of numpy arrays.
    ids = np.arange(4)
    texts = np.array(["first", None, "third", "fourth"], dtype=object)
    plain = np.array(["one", "two"])  # a column of fixed-width strings
    batch = await asyncio.to_thread(embedder, {"id": ids, "text": texts})
    fixed = await asyncio.to_thread(embedder, {"text": plain})

    assert list(batch) == ["id", "text", "embedding", "error"]
    assert batch["id"] is ids
    assert batch["error"].tolist() == [None, "text is null", None, None]
    rows = batch["embedding"]
    assert rows.shape == (4, 1024)
    assert rows.dtype == np.float32
    assert np.isnan(rows[1]).all()
    for i in (0, 2, 3):
        np.testing.assert_array_equal(rows[i], expected_embedding(MODEL, texts[i]))
    np.testing.assert_array_equal(fixed["embedding"][1], expected_embedding(MODEL, "two"))
    assert fixed["error"].tolist() == [None, None]


async def test_a_batch_of_another_format_is_refused_naming_the_one_to_pass(
    embedder: Embedder,
) -> None:
    frame = pa.table({"text": ["a"]}).to_pandas()
    with pytest.raises(ConfigError, match='not DataFrame: pass batch_format="pyarrow"'):
        await asyncio.to_thread(embedder, frame)


async def test_a_batch_with_an_embedding_or_error_column_is_refused_naming_it(
    embedder: Embedder,
) -> None:
    # Vectors of another model, or the batch's own error column: never a second column of
    # the same name beside them.
    older = pa.table({"text": ["a", "b"], "embedding": [[0.5], [0.25]]})
    with pytest.raises(ConfigError, match="a column 'embedding' already"):
        await asyncio.to_thread(embedder, older)
    with pytest.raises(ConfigError, match="a column 'error' already"):
        await asyncio.to_thread(embedder, {"text": np.array(["a"]), "error": np.array([""])})
    kept = await asyncio.to_thread(embedder, older.rename_columns(["text", "old"]))
    assert kept.column_names == ["text", "old", "embedding", "error"]


class _Interrupted(Exception):
    """Raised by the test's signal handler in the thread waiting on the embedder."""


@pytest.fixture
def slow_server() -> Iterator[LocalServer]:
    """A LocalServer answering each request after 50 ms, on a thread and a loop of its own
    (the test's thread blocks in the embedder, as a Ray actor's does)."""
    ready = threading.Event()
    found: list[tuple[LocalServer, asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        done = asyncio.Event()
        async with LocalServer(ServerConfig(faults=Faults(latency_s=0.05))) as server:
            found.append((server, asyncio.get_running_loop(), done))
            ready.set()
            await done.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    ready.wait()
    server, loop, done = found[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join()


def test_an_interrupted_call_leaves_no_job_running_on_the_actors_loop(
    slow_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C in a notebook calling the embedder (a KeyboardInterrupt, as the handler's error
    # here) ends the wait: the job it waited for must end too, not go on spending the quota
    # unseen beside the next call.
    monkeypatch.setenv(KEY_ENV, "sk-local-test")
    embedder = Embedder(
        model=MODEL,
        quota="local",
        base_url=slow_server.url,
        api_key_env=KEY_ENV,
        rate=UNLIMITED,
        concurrency=1,
        batch=BatchLimits(max_items=1),
    )

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    texts = [f"text number {n}" for n in range(200)]  # 200 requests of 50 ms, one at a time
    try:
        # Interrupted once the job is sending: the caller's thread is waiting on it then.
        watcher = threading.Thread(target=_interrupt_once_sending, args=(slow_server,), daemon=True)
        watcher.start()
        with pytest.raises(_Interrupted):
            embedder(pa.table({"text": texts}))
        watcher.join()
        left = asyncio.run_coroutine_threadsafe(_running(), embedder._loop).result()
        assert left == []
        sent = slow_server.stats.requests
        assert sent < len(texts)
        again = embedder(pa.table({"text": texts[:2]}))
    finally:
        signal.signal(signal.SIGUSR1, previous)
        embedder.close()
    assert again.column("error").to_pylist() == [None, None]
    assert slow_server.stats.requests <= sent + 2
    np.testing.assert_array_equal(
        np.array(again.column("embedding")[1].as_py(), np.float32),
        expected_embedding(MODEL, texts[1]),
    )


def _interrupt_once_sending(server: LocalServer) -> None:
    """Send this process SIGUSR1 once ``server`` has had three requests."""
    while server.stats.requests < 3:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGUSR1)


async def _running() -> list[str]:
    """The names of the tasks of the current loop still running, but this one."""
    me = asyncio.current_task()
    return [task.get_name() for task in asyncio.all_tasks() if task is not me]
