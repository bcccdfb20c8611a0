"""sfembed.ray.Embedder in a real local Ray (2 CPUs), two actors on one quota in Redis.

Ray starts once for the module (it takes seconds). The local server runs on the test's event
loop while Ray works in a thread, so the actors reach it as they would a remote API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
import ray

from sfembed import RateLimits, embed, load_settings
from sfembed._exceptions import ConfigError
from sfembed.ray import Embedder
from sfembed.testing import LocalServer, ModelLimits, RedisServer, ServerConfig, synthetic_corpus

pytestmark = [
    pytest.mark.timeout(240),
    # Ray warns about its own deprecated internals; sfembed's code stays under "error".
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]

MODEL = "BAAI/bge-m3"
KEY_ENV = "SFEMBED_RAY_TEST_KEY"


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    # The key reaches the actors through their environment, never through their arguments.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {KEY_ENV: "sk-local-test"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


def _table(count: int) -> pa.Table:
    texts: list[str | None] = list(synthetic_corpus(count, seed=3, long_every=80))
    texts[17] = None  # a row without a text fails alone
    texts[29] = ""
    return pa.table({"id": [f"r{i}" for i in range(count)], "text": texts})


async def test_two_actors_on_one_quota_return_every_row_once_with_single_process_vectors(
    ray_session: None, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-local-test")  # for the single-process run here
    table = _table(240)
    parts = [table.slice(start, 40) for start in range(0, 240, 40)]  # six blocks
    rate = RateLimits(rpm=240, tpm=120_000, window_s=1.0)
    limits = {MODEL: ModelLimits(rpm=rate.rpm, tpm=rate.tpm)}
    async with LocalServer(ServerConfig(window_s=rate.window_s, limits=limits)) as server:
        kwargs: dict[str, object] = {
            "model": MODEL,
            "quota": redis_server.url,
            "base_url": server.url,
        }
        kwargs |= {"api_key_env": KEY_ENV, "rate": rate}

        def pipeline() -> pa.Table:
            ds = ray.data.from_arrow(parts).map_batches(
                Embedder,
                fn_constructor_kwargs=kwargs,
                compute=ray.data.ActorPoolStrategy(size=2),
                num_cpus=0.5,  # waiting on the API, not computing: leave CPUs to the readers
                batch_size=32,
                batch_format="pyarrow",
            )
            return pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None))

        result = await asyncio.to_thread(pipeline)
        settings = load_settings(base_url=server.url, rate=rate)
        texts = table.column("text").to_pylist()
        single = await embed(
            [t or "" for t in texts],
            model=MODEL,
            settings=settings,
            errors="nan",
            api_key_env=KEY_ENV,
        )
        refused = server.stats.rate_limited_tpm + server.stats.rate_limited_rpm

    assert sorted(result.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
    ids = np.array(table.column("id").to_pylist())
    by_id = {row_id: i for i, row_id in enumerate(result.column("id").to_pylist())}
    embeddings = result.column("embedding")
    assert embeddings.type == pa.list_(pa.float32(), 1024)
    errors = result.column("error").to_pylist()
    for i, row_id in enumerate(ids):
        at = by_id[row_id]
        if i in (17, 29):
            assert embeddings[at].as_py() is None
            assert errors[at]
        else:
            assert errors[at] is None
            np.testing.assert_array_equal(np.array(embeddings[at].as_py(), np.float32), single[i])
    assert refused <= 2


def test_a_batch_without_the_text_column_is_refused_naming_it(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-local-test")
    embedder = Embedder(
        model=MODEL, quota=redis_server.url, text_column="body", api_key_env=KEY_ENV
    )
    try:
        with pytest.raises(ConfigError, match="no column 'body'"):
            embedder(pa.table({"text": ["a"]}))
    finally:
        embedder.close()


def test_chunks_mode_is_refused_as_it_would_break_one_row_per_input() -> None:
    with pytest.raises(ConfigError, match="one row per input"):
        Embedder(model=MODEL, quota="local", long_mode="chunks")


async def test_a_row_without_a_text_fails_alone_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-local-test")
    async with LocalServer() as server:  # the embedder blocks its caller: run it on a thread
        embedder = await asyncio.to_thread(
            Embedder, model=MODEL, quota="local", base_url=server.url, api_key_env=KEY_ENV
        )
        try:
            batch = pa.table({"text": pa.array(["a", None, "b"])})
            numbers = pa.table({"text": pa.array([1, 2])})
            result = await asyncio.to_thread(embedder, batch)
            as_numbers = await asyncio.to_thread(embedder, numbers)
        finally:
            await asyncio.to_thread(embedder.close)
    assert result.column("error").to_pylist() == [None, "text is null", None]
    assert result.column("embedding").null_count == 1
    assert as_numbers.column("error").to_pylist() == ["text is not a text but int"] * 2
