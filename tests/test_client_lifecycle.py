"""The client's lifecycle: unopened, open inside ``async with``, closed for good."""

from __future__ import annotations

import pytest

from sfembed import EmbeddingClient
from sfembed.testing import LocalServer

KEY = "sk-local-test"


async def test_a_client_is_entered_once_and_never_reopened(server: LocalServer) -> None:
    client = EmbeddingClient(api_key=KEY, base_url=server.url)
    with pytest.raises(RuntimeError, match="inside 'async with'"):
        await client.embed("hello", model="BAAI/bge-m3")
    async with client:
        with pytest.raises(RuntimeError, match="open already"):
            await client.__aenter__()  # a second session would leak the first
        result = await client.embed("hello", model="BAAI/bge-m3")
        assert result.embeddings.shape == (1, 1024)
    with pytest.raises(RuntimeError, match="closed: make another"):
        await client.embed("hello", model="BAAI/bge-m3")
    with pytest.raises(RuntimeError, match="cannot be reopened"):
        async with client:
            pass
