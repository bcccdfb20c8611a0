"""Hostile client settings and inputs, against sfembed.testing.LocalServer over real HTTP.

A key pasted with its newline, credentials or a query in the base URL, a bare string where a list
was meant, a text that is not valid Unicode, a server that refuses connections: each gets a clear
error naming the setting or the input (never the key or the credentials), or simply works.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from sfembed import (
    APIConnectionError,
    ConfigError,
    EmbeddingCache,
    EmbeddingClient,
    InputError,
    JobError,
    JobStats,
    RateLimits,
    RetryPolicy,
    embed,
    embed_stream,
    load_settings,
)
from sfembed._client import _retry_after
from sfembed._types import TextInput
from sfembed.testing import LocalServer, expected_embedding, synthetic_corpus

MakeServer = Callable[..., Awaitable[LocalServer]]

KEY = "sk-local-test"
SECRET = "hunter2-pass"
M3 = "BAAI/bge-m3"


@pytest.mark.parametrize("padding", ["\n", "\r\n", " ", "\t\n"])
async def test_a_key_with_surrounding_whitespace_works(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch, padding: str
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", KEY + padding)
    async with EmbeddingClient(base_url=server.url) as client:
        result = await client.embed("one", model=M3)
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(M3, "one"))
    async with EmbeddingClient(api_key=" " + KEY + padding, base_url=server.url) as client:
        await client.embed("one", model=M3)


@pytest.mark.parametrize("key", [KEY[:5] + "\n" + KEY[5:], KEY + "\x00x", KEY[:3] + "é" + KEY[3:]])
def test_a_key_a_header_cannot_carry_is_refused_without_echo(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    with pytest.raises(ConfigError, match="api_key argument") as info:
        EmbeddingClient(api_key=key)
    assert KEY[5:] not in str(info.value)
    assert KEY[:5] not in str(info.value)
    if "\x00" in key:
        return  # no environment variable can hold a NUL
    monkeypatch.setenv("SILICONFLOW_API_KEY", key)
    with pytest.raises(ConfigError, match="SILICONFLOW_API_KEY") as info:
        EmbeddingClient()
    assert KEY[5:] not in str(info.value)
    assert KEY[:5] not in str(info.value)


def test_a_blank_key_is_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", " \n")
    with pytest.raises(ConfigError, match="no API key"):
        EmbeddingClient()


@pytest.mark.parametrize(
    "url",
    [
        f"https://user:{SECRET}@api.siliconflow.cn/v1",
        f"https://{SECRET}@api.siliconflow.cn/v1",
        f"http://user:{SECRET}@127.0.0.1:9/v1",
        f"ftp://user:{SECRET}@example.com/v1",
    ],
)
def test_credentials_in_the_base_url_are_refused_without_echo(url: str) -> None:
    with pytest.raises(ConfigError, match="credentials") as info:
        EmbeddingClient(api_key=KEY, base_url=url)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.siliconflow.cn/v1?key=1",
        "https://api.siliconflow.cn/v1?",
        "https://api.siliconflow.cn/v1#top",
    ],
)
def test_a_base_url_with_a_query_or_fragment_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="query or fragment") as info:
        EmbeddingClient(api_key=KEY, base_url=url)
    assert "'https://api.siliconflow.cn/v1'" in str(info.value)  # the URL to use instead


def test_a_base_url_with_a_bad_port_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a valid URL"):
        EmbeddingClient(api_key=KEY, base_url="https://api.siliconflow.cn:port/v1")


async def test_a_lone_surrogate_fails_its_item_only(server: LocalServer) -> None:
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        with pytest.raises(InputError, match="not valid Unicode") as info:
            await client.embed(["fine", "bad \udc80 text", "also fine"], model=M3)
        assert info.value.item == 1
        with pytest.raises(InputError) as info:
            await client.embed([TextInput(text="a\ud800")], model="Qwen/Qwen3-VL-Embedding-8B")
        assert info.value.item == 0
    assert server.stats.requests == 0  # nothing was sent


async def test_a_bare_string_is_one_input(server: LocalServer) -> None:
    settings = load_settings(base_url=server.url, rate=RateLimits(rpm=10**6, tpm=10**9))
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        rows = await embed("hello", model=M3, settings=settings, client=client)
        vl = "Qwen/Qwen3-VL-Embedding-8B"
        one = await embed({"text": "hello"}, model=vl, settings=settings, client=client)
        text = await embed(["hello"], model=vl, settings=settings, client=client)
    assert rows.shape == (1, 1024)
    np.testing.assert_array_equal(rows[0], expected_embedding(M3, "hello"))
    np.testing.assert_array_equal(one, text)
    assert one.shape == (1, 4096)
    with pytest.raises(TypeError, match="not bytes"):
        await embed(b"hello", model=M3, settings=settings)  # type: ignore[arg-type]


async def test_a_lone_surrogate_fails_one_record_of_a_job(server: LocalServer) -> None:
    texts = [f"text {n}" for n in range(10)]
    texts[4] = "broken \udc80 text"
    settings = load_settings(base_url=server.url, rate=RateLimits(rpm=10**6, tpm=10**9))
    stats = JobStats()
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        rows = await embed(
            texts, model=M3, settings=settings, client=client, stats=stats, errors="nan"
        )
        with pytest.raises(JobError, match="input 4"):
            await embed(texts, model=M3, settings=settings, client=client)
    assert [failure.position for failure in stats.failures] == [4]
    assert "Unicode" in stats.failures[0].reason
    assert np.isnan(rows[4]).all()
    good = [n for n in range(10) if n != 4]
    np.testing.assert_array_equal(
        rows[good], np.stack([expected_embedding(M3, texts[n]) for n in good])
    )


async def test_a_refused_connection_is_retried_then_reported() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    async with EmbeddingClient(api_key=KEY, base_url=url) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.embed("one", model=M3)
    assert info.value.retryable
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "nan", "Retry-After": "2"}, 2.0),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "-5"}, 0.0),
        ({"Retry-After": "soon"}, None),
    ],
)
def test_retry_after_values(headers: dict[str, str], seconds: float | None) -> None:
    assert _retry_after(headers) == seconds


def test_a_policy_caps_what_it_honours() -> None:
    from sfembed._retry import honoured_wait_s

    class Asked(Exception):
        retry_after_s = 3600.0

    policy = RetryPolicy(max_backoff_s=12.0)
    assert honoured_wait_s(Asked(), policy) == 12.0
    assert honoured_wait_s(ValueError(), policy) is None


async def test_a_key_pasted_with_its_scheme_works(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", f"Bearer {KEY}\n")
    async with EmbeddingClient(base_url=f" {server.url}\n") as client:
        result = await client.embed("one", model=M3)
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(M3, "one"))


@pytest.mark.parametrize(
    "url", ["https://api.siliconflow.cn/v1/embeddings", "https://api.siliconflow.cn/v1/embeddings/"]
)
def test_a_base_url_naming_the_endpoint_is_refused_with_the_root(url: str) -> None:
    with pytest.raises(ConfigError, match="without /embeddings") as info:
        EmbeddingClient(api_key=KEY, base_url=url)
    assert "use 'https://api.siliconflow.cn/v1'" in str(info.value)


@pytest.mark.parametrize("key", [f'"{KEY}"', f"'{KEY}'\n", f"Bearer {KEY}", f"bearer  {KEY} "])
async def test_a_key_quoted_or_with_its_scheme_works(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", key)
    async with EmbeddingClient(base_url=server.url) as client:
        await client.embed("one", model=M3)


def test_a_base_url_without_a_scheme_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="must be https://") as info:
        EmbeddingClient(api_key=KEY, base_url="api.siliconflow.cn/v1")
    assert "'api.siliconflow.cn/v1'" in str(info.value)


async def test_an_unknown_errors_choice_is_refused(server: LocalServer) -> None:
    with pytest.raises(ConfigError, match="'raise' or 'nan'"):
        await embed(["one"], model=M3, errors="ignore")  # type: ignore[arg-type]
    assert server.stats.requests == 0


@pytest.mark.parametrize("mode", ["pool", "chunks", "truncate"])
async def test_a_long_text_with_a_lone_surrogate_fails_alone(
    server: LocalServer, tmp_path: Path, mode: str
) -> None:
    words = " ".join(synthetic_corpus(600, seed=3, long_every=0))
    long = words[:20000] + " \udc80 " + words[20000:40000]  # over bge-m3's 8,192 tokens
    texts = ["before", long, "after"]
    settings = load_settings(base_url=server.url, rate=RateLimits(rpm=10**6, tpm=10**9))
    stats = JobStats()
    async with (
        EmbeddingClient(api_key=KEY, base_url=server.url) as client,
        EmbeddingCache(tmp_path / "cache.sqlite") as cache,
    ):
        rows = [
            batch.embeddings
            async for batch in embed_stream(
                texts,
                model=M3,
                settings=settings,
                client=client,
                stats=stats,
                cache=cache,
                long_mode=mode,
            )
        ]
    result = np.concatenate(rows)
    assert [failure.position for failure in stats.failures] == [1]
    assert "Unicode" in stats.failures[0].reason
    assert np.isnan(result[1]).all()
    np.testing.assert_array_equal(
        result[[0, 2]], np.stack([expected_embedding(M3, t) for t in ("before", "after")])
    )
