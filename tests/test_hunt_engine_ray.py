"""sfembed.ray.Embedder called as Ray Data calls it, with the batches of each ``batch_format``:
a batch in Ray's default format (a dict of numpy arrays) is embedded in that format, a batch of
another is refused saying which to pass, and no column of the batch is shadowed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pyarrow as pa
import pytest

from sfembed import RateLimits
from sfembed._exceptions import ConfigError
from sfembed.ray import Embedder
from sfembed.testing import LocalServer, expected_embedding

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
