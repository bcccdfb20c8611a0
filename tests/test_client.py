"""EmbeddingClient end to end against sfembed.testing.LocalServer over real HTTP.

Every parameter and input form, results in input order equal to the server's known vectors, every
error answer mapped to its class, nothing sent for invalid input, and the key never leaked.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import struct
import traceback
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sfembed._client import EmbeddingClient, _retry_after
from sfembed._config import Timeouts
from sfembed._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchTooLargeError,
    ConfigError,
    GatewayTimeoutError,
    InputError,
    MalformedResponseError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)
from sfembed._models import DEFAULT_CATALOG, ModelSpec
from sfembed._types import EncodingFormat, InputItem
from sfembed.testing import (
    IMAGE_TOKENS,
    INJECT_KINDS,
    Faults,
    LocalServer,
    ModelLimits,
    count_tokens,
    expected_embedding,
)

KEY = "sk-local-test"  # what the default LocalServer accepts
SECRET = "sk-SECRET-4c1d9e7f0a2b"  # distinctive, to search for in every error and log
BGE = "BAAI/bge-m3"  # 1024 dims, 8192 tokens
BGE_EN = "BAAI/bge-large-en-v1.5"  # 512 tokens
QWEN = "Qwen/Qwen3-Embedding-0.6B"  # dimensions 64..1024
VL = "Qwen/Qwen3-VL-Embedding-8B"  # text and images
URL = "https://example.com/cat.jpg"
TEXTS = ["alpha", "bravo charlie", "delta 42", "中文文本", "echo\nfoxtrot"]

#: The ``make_server`` fixture of conftest: ``await make_server(**ServerConfig fields)``.
MakeServer = Callable[..., Awaitable[LocalServer]]


@pytest.fixture
async def client(server: LocalServer) -> AsyncIterator[EmbeddingClient]:
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as running:
        yield running


def expected_rows(model: str, items: list[Any], **options: Any) -> np.ndarray:
    return np.stack([expected_embedding(model, item, **options) for item in items])


def assert_result_shape(embeddings: np.ndarray, rows: int, dims: int) -> None:
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (rows, dims)
    assert embeddings.flags.c_contiguous


def tiny_png() -> bytes:
    """A valid 1x1 RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x80\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@asynccontextmanager
async def raw_http(response: bytes) -> AsyncIterator[str]:
    """A bare TCP server answering every request with ``response`` verbatim (for answers the
    LocalServer never gives: broken status lines, odd statuses, odd 200 bodies)."""
    handlers: list[asyncio.Task[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(response)
            await writer.drain()
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/v1"
    finally:
        listener.close()
        await listener.wait_closed()
        await asyncio.gather(*handlers, return_exceptions=True)


def http_response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nx-siliconcloud-trace-id: raw-trace-1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


# --- input forms and parameters ---------------------------------------------------------------


async def test_a_string_gives_one_row_with_usage_model_and_trace(
    client: EmbeddingClient, server: LocalServer
) -> None:
    result = await client.embed("hello world", model=BGE)
    assert_result_shape(result.embeddings, 1, 1024)
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(BGE, "hello world"))
    tokens = count_tokens("hello world", DEFAULT_CATALOG[BGE])
    assert result.usage == {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
    assert result.model == BGE
    assert isinstance(result.trace_id, str)
    assert len(result.trace_id) == 32
    assert server.stats.requests == 1


async def test_rows_follow_input_order_although_the_server_reverses_data(
    client: EmbeddingClient,
) -> None:
    result = await client.embed(TEXTS, model=BGE)
    assert_result_shape(result.embeddings, len(TEXTS), 1024)
    np.testing.assert_array_equal(result.embeddings, expected_rows(BGE, TEXTS))
    assert len({row.tobytes() for row in result.embeddings}) == len(TEXTS)
    spec = DEFAULT_CATALOG[BGE]
    assert result.usage is not None
    assert result.usage["prompt_tokens"] == sum(count_tokens(text, spec) for text in TEXTS)


async def test_a_tuple_of_strings_works_like_a_list(client: EmbeddingClient) -> None:
    result = await client.embed(tuple(TEXTS[:2]), model=BGE)
    np.testing.assert_array_equal(result.embeddings, expected_rows(BGE, TEXTS[:2]))


async def test_token_id_lists(client: EmbeddingClient) -> None:
    single = await client.embed([101, 2023, 102], model=BGE)
    assert_result_shape(single.embeddings, 1, 1024)
    np.testing.assert_array_equal(single.embeddings[0], expected_embedding(BGE, [101, 2023, 102]))
    lists = [[1, 2, 3], [4], [5, 6]]
    several = await client.embed(lists, model=BGE)
    np.testing.assert_array_equal(several.embeddings, expected_rows(BGE, lists))
    assert several.usage is not None
    assert several.usage["prompt_tokens"] == 6 + 3 * DEFAULT_CATALOG[BGE].special_tokens


@pytest.mark.parametrize("model", list(DEFAULT_CATALOG))
async def test_every_catalogue_model_gives_its_default_dimensions(
    client: EmbeddingClient, model: str
) -> None:
    result = await client.embed(TEXTS[:2], model=model)
    spec = DEFAULT_CATALOG[model]
    assert_result_shape(result.embeddings, 2, spec.default_dimensions)
    np.testing.assert_array_equal(result.embeddings, expected_rows(model, TEXTS[:2]))
    assert result.model == model


async def test_vl_text_objects_embed_like_plain_text(client: EmbeddingClient) -> None:
    # A list literal, unannotated: `make types` checks that the signature takes it as it is.
    result = await client.embed([{"text": "quick fox"}, "quick fox"], model=VL)
    assert_result_shape(result.embeddings, 2, 4096)
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(VL, "quick fox"))
    np.testing.assert_array_equal(result.embeddings[0], result.embeddings[1])


async def test_vl_single_content_object(client: EmbeddingClient) -> None:
    result = await client.embed({"image": URL}, model=VL)
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(VL, {"image": URL}))
    assert result.usage is not None
    assert result.usage["prompt_tokens"] == IMAGE_TOKENS + DEFAULT_CATALOG[VL].special_tokens


async def test_vl_image_url_data_uri_and_bare_base64(client: EmbeddingClient) -> None:
    png = base64.b64encode(tiny_png()).decode()
    images: list[Any] = [{"image": URL}, {"image": f"data:image/png;base64,{png}"}, {"image": png}]
    result = await client.embed(images, model=VL)
    np.testing.assert_array_equal(result.embeddings, expected_rows(VL, images))
    assert len({row.tobytes() for row in result.embeddings}) == 3


@pytest.mark.parametrize("as_path", [True, False])
async def test_vl_local_image_is_sent_as_a_data_uri(
    client: EmbeddingClient, tmp_path: Path, as_path: bool
) -> None:
    path = tmp_path / "pixel.png"
    path.write_bytes(tiny_png())
    uri = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    result = await client.embed({"image": path if as_path else str(path)}, model=VL)
    # The server embeds what it received: equal to the data URI's vector, not the path's text.
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(VL, {"image": uri}))


async def test_vl_mixed_list(client: EmbeddingClient, tmp_path: Path) -> None:
    path = tmp_path / "pixel.png"
    path.write_bytes(tiny_png())
    uri = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    sent: list[Any] = ["First text", {"text": "Second text"}, {"image": URL}, {"image": path}]
    received: list[Any] = ["First text", "Second text", {"image": URL}, {"image": uri}]
    result = await client.embed(sent, model=VL, dimensions=768)
    assert_result_shape(result.embeddings, 4, 768)
    np.testing.assert_array_equal(result.embeddings, expected_rows(VL, received, dimensions=768))


@pytest.mark.parametrize(("model", "items"), [(BGE, TEXTS), (VL, ["a", {"image": URL}])])
async def test_base64_and_float_give_equal_arrays(
    client: EmbeddingClient, model: str, items: list[Any]
) -> None:
    as_float = await client.embed(items, model=model, encoding_format="float")
    as_base64 = await client.embed(items, model=model, encoding_format="base64")
    assert_result_shape(as_base64.embeddings, len(items), as_float.embeddings.shape[1])
    np.testing.assert_array_equal(as_float.embeddings, as_base64.embeddings)
    np.testing.assert_array_equal(as_base64.embeddings, expected_rows(model, items))
    assert as_float.usage == as_base64.usage


@pytest.mark.parametrize(
    ("model", "dims"),
    [(QWEN, 64), (QWEN, 1024), ("Qwen/Qwen3-Embedding-4B", 2560), (VL, 768)],
)
@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_dimensions(
    client: EmbeddingClient, model: str, dims: int, encoding: EncodingFormat
) -> None:
    result = await client.embed(
        TEXTS[:3],
        model=model,
        dimensions=dims,
        encoding_format=encoding,
    )
    assert_result_shape(result.embeddings, 3, dims)
    np.testing.assert_array_equal(
        result.embeddings, expected_rows(model, TEXTS[:3], dimensions=dims)
    )


async def test_user_is_accepted_and_changes_nothing(client: EmbeddingClient) -> None:
    result = await client.embed(TEXTS[:2], model=QWEN, user="user_123")
    np.testing.assert_array_equal(result.embeddings, expected_rows(QWEN, TEXTS[:2]))


async def test_truncate_left_and_right_on_an_over_long_input(
    client: EmbeddingClient, server: LocalServer
) -> None:
    long_text = " ".join(f"w{i:03d}" for i in range(700))  # 700 tokens > 512
    assert count_tokens(long_text, DEFAULT_CATALOG[BGE_EN]) > 512
    with pytest.raises(BadRequestError) as info:
        await client.embed(long_text, model=BGE_EN)
    assert (info.value.status, info.value.code) == (400, 20015)
    rows = {}
    for side in ("left", "right"):
        result = await client.embed(["short", long_text], model=BGE_EN, truncate=side)
        expected = expected_rows(BGE_EN, ["short", long_text], truncate=side)
        np.testing.assert_array_equal(result.embeddings, expected)
        assert result.usage is not None
        assert result.usage["prompt_tokens"] == count_tokens("short", DEFAULT_CATALOG[BGE_EN]) + 512
        rows[side] = result.embeddings[1]
    assert not np.array_equal(rows["left"], rows["right"])
    assert server.stats.requests == 3


async def test_truncate_applies_to_token_lists(client: EmbeddingClient) -> None:
    ids = list(range(1, 600))
    result = await client.embed([ids], model=BGE_EN, truncate="left")
    expected = expected_embedding(BGE_EN, ids, truncate="left")
    np.testing.assert_array_equal(result.embeddings[0], expected)


async def test_a_model_the_user_added_to_the_catalogue(make_server: MakeServer) -> None:
    spec = ModelSpec(
        name="Acme/embed-v2",
        max_input_tokens=64,
        default_dimensions=256,
        dimensions=(128, 256),
        accepts_dimensions=True,
        special_tokens=1,
    )
    catalog = DEFAULT_CATALOG.with_models(spec)
    server = await make_server(catalog=catalog)
    async with EmbeddingClient(api_key=KEY, base_url=server.url, catalog=catalog) as client:
        assert client.catalog[spec.name] is spec
        result = await client.embed(TEXTS, model=spec.name)
        assert_result_shape(result.embeddings, len(TEXTS), 256)
        expected = expected_rows(spec.name, TEXTS, catalog=catalog)
        np.testing.assert_array_equal(result.embeddings, expected)
        assert result.model == spec.name

        small = await client.embed(TEXTS, model=spec.name, dimensions=128, encoding_format="base64")
        expected = expected_rows(spec.name, TEXTS, dimensions=128, catalog=catalog)
        np.testing.assert_array_equal(small.embeddings, expected)

        long_text = "word " * 100
        cut = await client.embed(long_text, model=spec.name, truncate="right")
        expected = expected_rows(spec.name, [long_text], truncate="right", catalog=catalog)
        np.testing.assert_array_equal(cut.embeddings, expected)

        requests = server.stats.requests
        with pytest.raises(InputError, match="not offered"):
            await client.embed("x", model=spec.name, dimensions=64)
        with pytest.raises(InputError, match="text-only"):
            await client.embed({"image": URL}, model=spec.name)
        assert server.stats.requests == requests

    # A client that does not know the model sends it as is; the answer decides the dimensions.
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as unaware:
        result = await unaware.embed(TEXTS[:2], model=spec.name, dimensions=128)
        assert_result_shape(result.embeddings, 2, 128)
        expected = expected_rows(spec.name, TEXTS[:2], dimensions=128, catalog=catalog)
        np.testing.assert_array_equal(result.embeddings, expected)


# --- error answers ------------------------------------------------------------------------------

ERRORS: list[tuple[str, type[APIError], int, int | None, bool, str]] = [
    # (inject kind, class, status, code, retryable, message part)
    ("400", BadRequestError, 400, 20015, False, "parameter is invalid"),
    ("model", ModelNotFoundError, 400, 20012, False, "Model does not exist"),
    ("401", AuthenticationError, 401, None, False, "Invalid token"),
    ("403", PermissionDeniedError, 403, None, False, "Forbidden"),
    ("404", NotFoundError, 404, None, False, "404 page not found"),
    ("413", BatchTooLargeError, 413, 20042, False, "input batch size 2 > maximum allowed"),
    ("429-tpm", RateLimitError, 429, None, True, "Details:TPM limit reached"),
    ("429-rpm", RateLimitError, 429, None, True, "Details:RPM limit reached"),
    ("503", OverloadedError, 503, 50505, True, "Model service overloaded"),
    ("504", GatewayTimeoutError, 504, None, True, "upstream request timeout"),
]


@pytest.mark.parametrize(("kind", "cls", "status", "code", "retryable", "message"), ERRORS)
async def test_error_answers_map_to_their_class(
    client: EmbeddingClient,
    server: LocalServer,
    kind: str,
    cls: type[APIError],
    status: int,
    code: int | None,
    retryable: bool,
    message: str,
) -> None:
    server.inject(kind)
    with pytest.raises(APIError) as info:
        await client.embed(["one", "two"], model=BGE)
    error = info.value
    assert type(error) is cls
    assert isinstance(error, APIStatusError)
    assert (error.status, error.code, error.retryable) == (status, code, retryable)
    assert message in error.message
    assert error.trace_id is not None
    assert len(error.trace_id) == 32
    assert error.trace_id in str(error)
    assert f"HTTP {status}" in str(error)
    assert error.retry_after_s is None  # the provider sends no Retry-After
    assert repr(error).startswith(f"{cls.__name__}(status={status}")
    assert server.stats.requests == 1  # the client never retries
    # The next request is answered normally: the failure left the session usable.
    result = await client.embed("after", model=BGE)
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(BGE, "after"))


def test_the_error_table_covers_every_status_kind() -> None:
    covered = {kind for kind, *_ in ERRORS}
    assert covered | {"reset", "stall", "bad-json", "no-data"} | HOSTILE == INJECT_KINDS


#: Kinds answered by tests/test_hostile_server.py (gateways, odd statuses, damaged answers).
HOSTILE = {"405", "redirect", "html-502", "html-200", "error-200", "429-hour", "429-date"} | {
    "no-usage",
    "negative-usage",
    "huge-usage",
    "zero-usage",
    "tiny-usage",
    "nan",
    "inf",
    "string-floats",
    "bool-floats",
    "missing-item",
    "extra-item",
    "duplicate-index",
    "wrong-dims",
    "other-model",
    "gzip",
    "trickle",
    "endless",
    "bom",
}
#: Kinds that end in a usable answer (or, trickling, in none within a test's time).
ANSWERED = {"no-usage", "negative-usage", "huge-usage", "zero-usage", "tiny-usage"} | {
    "other-model",
    "gzip",
    "trickle",
    "bom",
}


@pytest.mark.parametrize(("kind", "limit"), [("429-tpm", "tpm"), ("429-rpm", "rpm")])
async def test_rate_limit_names_the_limit(
    client: EmbeddingClient, server: LocalServer, kind: str, limit: str
) -> None:
    server.inject(kind)
    with pytest.raises(RateLimitError) as info:
        await client.embed("x", model=BGE)
    assert info.value.limit == limit


def test_class_hierarchy() -> None:
    assert issubclass(ModelNotFoundError, BadRequestError)
    assert issubclass(OverloadedError, ServerError)
    assert issubclass(GatewayTimeoutError, ServerError)
    assert issubclass(APITimeoutError, APIConnectionError)


async def test_real_rpm_limit(make_server: MakeServer) -> None:
    server = await make_server(limits={BGE: ModelLimits(rpm=1)})
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        await client.embed("first", model=BGE)
        with pytest.raises(RateLimitError) as info:
            await client.embed("second", model=BGE)
        await client.embed("other model", model=QWEN)  # limits are per model
    assert info.value.limit == "rpm"
    assert info.value.retryable
    assert info.value.trace_id
    assert server.stats.rate_limited_rpm == 1


async def test_real_tpm_limit(make_server: MakeServer) -> None:
    server = await make_server(limits={BGE: ModelLimits(tpm=20)})
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        await client.embed("tiny", model=BGE)
        with pytest.raises(RateLimitError) as info:
            await client.embed(" ".join(["word"] * 30), model=BGE)
    assert info.value.limit == "tpm"
    assert info.value.status == 429
    assert server.stats.rate_limited_tpm == 1


@pytest.mark.parametrize("kind", ["429-tpm", "429-rpm", "503"])
async def test_retry_after_is_read(make_server: MakeServer, kind: str) -> None:
    server = await make_server(faults=Faults(retry_after_s=1.25))
    server.inject(kind)
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        with pytest.raises(APIStatusError) as info:
            await client.embed("x", model=BGE)
    # retry-after-ms (1250) is preferred to the whole-second Retry-After (2).
    assert info.value.retry_after_s == pytest.approx(1.25)
    assert info.value.retryable


async def test_retry_after_is_not_invented(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(retry_after_s=3))
    server.inject("400")  # the server adds the headers to 429 and 503 only
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        with pytest.raises(BadRequestError) as info:
            await client.embed("x", model=BGE)
    assert info.value.retry_after_s is None


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "4", "retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "4", "retry-after-ms": "soon"}, 4.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"Retry-After": "tomorrow"}, None),
        ({}, None),
    ],
)
def test_retry_after_header_forms(headers: dict[str, str], seconds: float | None) -> None:
    assert _retry_after(CIMultiDict(headers)) == seconds


@pytest.mark.parametrize("zone", ["GMT", "+0000", "-0000"])
def test_retry_after_http_date_in_the_future(zone: str) -> None:
    wait_s = _retry_after(CIMultiDict({"Retry-After": f"Fri, 01 Jan 2100 00:00:00 {zone}"}))
    assert wait_s is not None
    assert wait_s > 365 * 86400


async def test_unknown_model_is_sent_and_refused_by_the_server(
    client: EmbeddingClient, server: LocalServer
) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        await client.embed("x", model="Acme/no-such-model")
    assert (info.value.status, info.value.code) == (400, 20012)
    assert info.value.trace_id
    assert server.stats.requests == 1


async def test_a_wrong_key(server: LocalServer) -> None:
    async with EmbeddingClient(api_key="sk-wrong", base_url=server.url) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.embed("x", model=BGE)
    assert (info.value.status, info.value.message) == (401, "Invalid token")
    assert not info.value.retryable
    assert info.value.trace_id


async def test_a_wrong_base_path(server: LocalServer) -> None:
    base = server.url.removesuffix("/v1") + "/v2/"
    async with EmbeddingClient(api_key=KEY, base_url=base) as client:
        with pytest.raises(NotFoundError) as info:
            await client.embed("x", model=BGE)
    assert info.value.status == 404
    assert info.value.message == "404 page not found"
    assert info.value.trace_id


async def test_a_reset_connection(client: EmbeddingClient, server: LocalServer) -> None:
    server.inject("reset")
    with pytest.raises(APIConnectionError) as info:
        await client.embed("x", model=BGE)
    assert type(info.value) is APIConnectionError
    assert info.value.retryable
    assert info.value.status is None
    assert server.stats.resets == 1
    result = await client.embed("x", model=BGE)  # a fresh connection works
    assert result.embeddings.shape == (1, 1024)


async def test_a_stalled_answer_times_out(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(stall_s=5.0))
    server.inject("stall")
    # 1 s, not less: the healthy request after the stall must not time out on a loaded machine.
    timeouts = Timeouts(connect_s=5.0, read_s=1.0)
    async with EmbeddingClient(api_key=KEY, base_url=server.url, timeouts=timeouts) as client:
        with pytest.raises(APITimeoutError) as info:
            await client.embed("x", model=BGE)
        assert info.value.retryable
        assert info.value.__cause__ is None
        assert info.value.__context__ is None
        result = await client.embed("x", model=BGE)
    assert result.embeddings.shape == (1, 1024)
    assert server.stats.stalls == 1


async def test_a_stall_deadline_shorter_than_the_clients_own_raises_the_builtin_timeout(
    make_server: MakeServer,
) -> None:
    # The sending stage's deadline for a stall shares the request's one timer with the client's
    # own: it raises TimeoutError, which the stage sends again, never the client's error.
    server = await make_server(faults=Faults(stall_s=5.0))
    server.inject("stall")
    timeouts = Timeouts(connect_s=5.0, read_s=4.0)
    async with EmbeddingClient(api_key=KEY, base_url=server.url, timeouts=timeouts) as client:
        with pytest.raises(TimeoutError) as info:
            await client.embed_within(
                1.0, ["x"], model=BGE, encoding_format="float", dimensions=None, truncate=None
            )
        assert not isinstance(info.value, APIError)
        result = await client.embed_within(
            1.0, ["x"], model=BGE, encoding_format="base64", dimensions=None, truncate=None
        )
    assert result.embeddings.shape == (1, 1024)
    assert server.stats.stalls == 1


async def test_a_stall_deadline_longer_than_the_clients_own_leaves_the_clients_error(
    make_server: MakeServer,
) -> None:
    server = await make_server(faults=Faults(stall_s=5.0))
    server.inject("stall")
    timeouts = Timeouts(connect_s=5.0, read_s=1.0)
    async with EmbeddingClient(api_key=KEY, base_url=server.url, timeouts=timeouts) as client:
        with pytest.raises(APITimeoutError) as info:
            await client.embed_within(
                4.0, ["x"], model=BGE, encoding_format="float", dimensions=None, truncate=None
            )
    assert info.value.retryable
    assert info.value.__context__ is None
    assert server.stats.stalls == 1


@pytest.mark.parametrize("kind", ["bad-json", "no-data"])
async def test_malformed_success_bodies(
    client: EmbeddingClient, server: LocalServer, kind: str
) -> None:
    server.inject(kind)
    with pytest.raises(MalformedResponseError) as info:
        await client.embed(["a", "b"], model=BGE)
    assert info.value.status == 200
    assert info.value.retryable
    assert info.value.trace_id


async def test_a_refused_connection() -> None:
    base = f"http://127.0.0.1:{closed_port()}/v1"
    async with EmbeddingClient(api_key=KEY, base_url=base) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.embed("x", model=BGE)
    assert type(info.value) is APIConnectionError
    assert info.value.retryable
    assert info.value.status is None
    assert info.value.__context__ is None


async def test_a_stopped_server_refuses(make_server: MakeServer) -> None:
    server = await make_server()
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        await client.embed("x", model=BGE)
        await server.stop()
        with pytest.raises(APIConnectionError):
            await client.embed("x", model=BGE)
        await server.start()
        assert (await client.embed("x", model=BGE)).embeddings.shape == (1, 1024)


def _ok_body(data: list[Any], usage: Any = None) -> bytes:
    usage = usage if usage is not None else {"prompt_tokens": 1, "total_tokens": 1}
    return orjson.dumps({"object": "list", "model": BGE, "data": data, "usage": usage})


ODD_ANSWERS: list[tuple[bytes, type[APIError], str]] = [
    (
        http_response("200 OK", _ok_body([{"object": "embedding", "index": 0}])),
        MalformedResponseError,
        "'embedding'",
    ),
    (
        http_response("200 OK", _ok_body([{"embedding": [0.5] * 8, "index": 0}])),
        MalformedResponseError,
        "shape",
    ),
    (
        http_response("200 OK", _ok_body([{"embedding": [0.5] * 1024, "index": 3}])),
        MalformedResponseError,
        "out of range",
    ),
    (http_response("418 I'm a teapot", b'"short and stout"'), APIStatusError, "short and stout"),
    (http_response("502 Bad Gateway", b"bad gateway", "text/plain"), ServerError, "bad gateway"),
    (http_response("400 Bad Request", b""), BadRequestError, "HTTP 400"),
]


@pytest.mark.parametrize(("answer", "cls", "message"), ODD_ANSWERS)
async def test_answers_the_local_server_never_gives(
    answer: bytes, cls: type[APIError], message: str
) -> None:
    async with raw_http(answer) as base, EmbeddingClient(api_key=KEY, base_url=base) as client:
        with pytest.raises(APIError) as info:
            await client.embed("x", model=BGE)
    assert type(info.value) is cls
    assert message in str(info.value)
    assert info.value.trace_id == "raw-trace-1"
    assert info.value.retryable == issubclass(cls, ServerError | MalformedResponseError)


async def test_a_broken_status_line_is_a_connection_error() -> None:
    async with (
        raw_http(b"HTTP/1.1 abc\r\n\r\n") as base,
        EmbeddingClient(api_key=KEY, base_url=base) as client,
    ):
        with pytest.raises(APIConnectionError) as info:
            await client.embed("x", model=BGE)
    assert info.value.retryable
    assert info.value.__cause__ is None
    assert info.value.__context__ is None  # aiohttp's error holds the request headers


async def test_embed_outside_the_context_manager_is_refused(server: LocalServer) -> None:
    client = EmbeddingClient(api_key=KEY, base_url=server.url)
    with pytest.raises(RuntimeError, match="async with"):
        await client.embed("x", model=BGE)
    assert server.stats.requests == 0


# --- validation: nothing is sent ----------------------------------------------------------------

INVALID: list[tuple[str, Any, dict[str, Any], str, int | None]] = [
    # (model, input, options, message pattern, item)
    (BGE, "", {}, "empty string", 0),
    (BGE, [], {}, "input is empty", None),
    (BGE, ["a", "b", ""], {}, "input item 2: empty string", 2),
    (BGE, 7, {}, "not int", None),
    (BGE, None, {}, "not NoneType", None),
    (BGE, b"raw", {}, "not bytes", None),
    (BGE, ["a", 7], {}, "unsupported type int", 1),
    (BGE, [["a"]], {}, "token list", 0),
    (BGE, [[1, 2], "text"], {}, "cannot be mixed", 1),
    (BGE, ["text", [1, 2]], {}, "cannot be mixed", 1),
    (BGE, "x", {"dimensions": 1024}, "takes no 'dimensions'", None),
    ("BAAI/bge-large-zh-v1.5", "x", {"dimensions": 512}, "takes no 'dimensions'", None),
    (QWEN, "x", {"dimensions": 2048}, "not offered", None),
    (QWEN, "x", {"dimensions": 1000}, "not offered", None),
    (QWEN, "x", {"dimensions": 512.0}, "positive int", None),
    (BGE, ["x"] * 65, {}, "batch cap of 64", None),
    (BGE, {"image": URL}, {}, "an image sent to text-only", 0),
    (BGE, ["a", {"text": "b"}], {}, "a content object sent to text-only", 1),
    (QWEN, [{"image": URL}], {}, "text-only", 0),
    (VL, ["a", {"image": "/no/such/dir/missing.png"}], {}, "cannot read image", 1),
    (VL, [{"text": ""}], {}, "content object must be", 0),
    (BGE, "x", {"encoding_format": "binary"}, "encoding_format", None),
    (BGE, "x", {"truncate": "middle"}, "truncate", None),
    (BGE, "x", {"user": 42}, "user must be a string", None),
]


@pytest.mark.parametrize(("model", "input", "options", "message", "item"), INVALID)
async def test_invalid_input_sends_nothing(
    client: EmbeddingClient,
    server: LocalServer,
    model: str,
    input: Any,
    options: dict[str, Any],
    message: str,
    item: int | None,
) -> None:
    with pytest.raises(InputError, match=message) as info:
        await client.embed(input, model=model, **options)
    assert info.value.item == item
    assert server.stats.requests == 0


async def test_a_missing_local_image_sends_nothing(
    client: EmbeddingClient, server: LocalServer, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.png"
    items: list[InputItem] = ["ok", "ok", {"image": missing}]
    with pytest.raises(InputError, match="cannot read image") as info:
        await client.embed(items, model=VL)
    assert info.value.item == 2
    assert str(missing) in str(info.value)
    assert server.stats.requests == 0


async def test_a_lower_batch_cap(server: LocalServer) -> None:
    async with EmbeddingClient(api_key=KEY, base_url=server.url, max_batch_items=2) as client:
        with pytest.raises(InputError, match="3 items exceed the batch cap of 2"):
            await client.embed(["a", "b", "c"], model=BGE)
        assert server.stats.requests == 0
        assert (await client.embed(["a", "b"], model=BGE)).embeddings.shape == (2, 1024)


async def test_the_server_cap_still_answers_413(make_server: MakeServer) -> None:
    server = await make_server(max_batch_items=4)
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        with pytest.raises(BatchTooLargeError) as info:
            await client.embed(["x"] * 5, model=BGE)
    assert (info.value.status, info.value.code) == (413, 20042)
    assert "input batch size 5 > maximum allowed batch size 4" in info.value.message


# --- the key stays secret -----------------------------------------------------------------------


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def assert_no_secret(error: BaseException) -> None:
    assert SECRET not in "".join(traceback.format_exception(error))
    for link in _chain(error):
        assert SECRET not in str(link)
        assert SECRET not in repr(link)
        assert not hasattr(link, "request_info"), f"{type(link).__name__} carries request info"
        for name, value in vars(link).items():
            assert SECRET not in repr(value), f"{type(link).__name__}.{name} holds the key"


async def test_the_key_never_leaks(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await make_server(api_key=SECRET, faults=Faults(stall_s=5.0, retry_after_s=1))
    errors: list[BaseException] = []

    async def attempt(client: EmbeddingClient, input: Any = "x", **options: Any) -> None:
        try:
            await client.embed(input, model=options.pop("model", BGE), **options)
        except Exception as error:  # every failure is inspected below
            errors.append(error)

    timeouts = Timeouts(read_s=1.0)  # the stall times out; healthy answers never do
    async with EmbeddingClient(api_key=SECRET, base_url=server.url, timeouts=timeouts) as client:
        assert SECRET not in repr(client)
        assert SECRET not in str(client)
        await client.embed("fine", model=BGE)
        for kind in sorted(INJECT_KINDS - ANSWERED):
            server.inject(kind)
            await attempt(client)
        await attempt(client, model="Acme/no-such-model")
        await attempt(client, "")  # InputError
        await attempt(client, "x", dimensions=7)
    assert len(errors) == len(INJECT_KINDS - ANSWERED) + 3

    async with EmbeddingClient(api_key="sk-other", base_url=server.url) as wrong_key:
        await attempt(wrong_key)
    bases = [
        server.url.removesuffix("/v1") + "/v2",
        f"http://127.0.0.1:{closed_port()}/v1",
    ]
    for base in bases:
        async with EmbeddingClient(api_key=SECRET, base_url=base) as client:
            await attempt(client)
    async with (
        raw_http(b"HTTP/1.1 abc\r\n\r\n") as base,
        EmbeddingClient(api_key=SECRET, base_url=base) as client,
    ):
        await attempt(client)
    # From the environment too, and for refused configurations.
    monkeypatch.setenv("SILICONFLOW_API_KEY", SECRET)
    async with EmbeddingClient(base_url=server.url) as client:
        assert SECRET not in repr(client)
        server.inject("401")
        await attempt(client)
    for bad in ("http://example.com/v1", "ftp://example.com/v1"):
        try:
            EmbeddingClient(base_url=bad)
        except ConfigError as refused:
            errors.append(refused)

    assert len(errors) == len(INJECT_KINDS - ANSWERED) + 3 + 1 + 2 + 1 + 1 + 2
    assert all(isinstance(error, ConfigError | InputError | APIError) for error in errors)
    for error in errors:
        assert_no_secret(error)
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(record.args)
        assert SECRET not in (record.exc_text or "")


# --- configuration ------------------------------------------------------------------------------


def test_no_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SILICONFLOW_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="SILICONFLOW_API_KEY"):
        EmbeddingClient()
    monkeypatch.setenv("SILICONFLOW_API_KEY", "")
    with pytest.raises(ConfigError, match="SILICONFLOW_API_KEY"):
        EmbeddingClient()
    with pytest.raises(ConfigError):
        EmbeddingClient(api_key="")


def test_no_key_in_a_custom_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", KEY)  # not the variable asked for
    monkeypatch.delenv("MY_SF_KEY", raising=False)
    with pytest.raises(ConfigError, match="MY_SF_KEY"):
        EmbeddingClient(api_key_env="MY_SF_KEY")


async def test_key_from_the_default_variable(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", KEY)
    async with EmbeddingClient(base_url=server.url) as client:
        result = await client.embed("x", model=BGE)
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(BGE, "x"))


async def test_key_from_a_custom_variable(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", "sk-wrong")
    monkeypatch.setenv("MY_SF_KEY", KEY)
    async with EmbeddingClient(api_key_env="MY_SF_KEY", base_url=server.url) as client:
        assert (await client.embed("x", model=BGE)).embeddings.shape == (1, 1024)


async def test_an_explicit_key_wins_over_the_environment(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", "sk-wrong")
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        assert (await client.embed("x", model=BGE)).embeddings.shape == (1, 1024)


@pytest.mark.parametrize(
    "base",
    [
        "http://api.siliconflow.cn/v1",
        "http://10.0.0.5:8000/v1",
        "http://localhost.example.com/v1",
        "http://127.0.0.1.example.com/v1",
    ],
)
def test_plain_http_to_another_host_is_refused(base: str) -> None:
    with pytest.raises(ConfigError, match="plain http"):
        EmbeddingClient(api_key=KEY, base_url=base)
    allowed = EmbeddingClient(api_key=KEY, base_url=base, allow_insecure_http=True)
    assert base.rstrip("/") + "/embeddings" in repr(allowed)


@pytest.mark.parametrize(
    "base",
    [
        "https://api.siliconflow.cn/v1",
        "https://api.siliconflow.com/v1/",
        "http://localhost:8000/v1",
        "http://127.0.0.1/v1",
        "http://127.8.9.10:1/v1",
        "http://[::1]:8000/v1",
    ],
)
def test_https_and_loopback_are_allowed(base: str) -> None:
    client = EmbeddingClient(api_key=KEY, base_url=base)
    assert repr(client) == f"EmbeddingClient(url={base.rstrip('/') + '/embeddings'!r})"


@pytest.mark.parametrize("base", ["ftp://example.com/v1", "api.siliconflow.cn/v1", "https:///v1"])
def test_a_base_url_that_is_not_http_is_refused(base: str) -> None:
    with pytest.raises(ConfigError, match="base URL"):
        EmbeddingClient(api_key=KEY, base_url=base, allow_insecure_http=True)


async def test_plain_http_allowed_explicitly_reaches_the_server(make_server: MakeServer) -> None:
    # Listening on every interface, reached through this machine's name rather than loopback.
    server = await make_server(host="0.0.0.0")
    base = server.url.replace("0.0.0.0", socket.gethostname())
    with pytest.raises(ConfigError):
        EmbeddingClient(api_key=KEY, base_url=base)
    async with EmbeddingClient(api_key=KEY, base_url=base, allow_insecure_http=True) as client:
        try:
            result = await client.embed("x", model=BGE)
        except APIConnectionError:
            pytest.skip("this machine's name does not resolve to a reachable address")
    np.testing.assert_array_equal(result.embeddings[0], expected_embedding(BGE, "x"))


async def test_cancelling_a_request_in_flight_leaves_the_client_usable(
    make_server: MakeServer,
) -> None:
    server = await make_server(faults=Faults(stall_s=5.0))
    server.inject("stall")
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        task = asyncio.create_task(client.embed("x", model=BGE))
        for _ in range(1000):  # bounded wait until the server holds the request
            if server.stats.stalls:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        result = await client.embed("y", model=BGE)
    assert result.embeddings.shape == (1, 1024)


async def test_a_small_compressed_answer_that_inflates_past_the_cap_is_refused() -> None:
    # Its Content-Length is far under the cap; what it inflates to is not, and is what counts.
    inflated = b'{"data":[' + b" " * (16 << 20) + b"]}"
    compressed = zlib.compress(inflated, 9)

    async def bomb(request: web.Request) -> web.Response:
        await request.read()
        headers = {"Content-Encoding": "deflate", "Content-Type": "application/json"}
        return web.Response(body=compressed, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/embeddings", bomb)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        async with EmbeddingClient(api_key=KEY, base_url=url) as client:
            with pytest.raises(MalformedResponseError, match="more than its vectors could take"):
                await client.embed("a", model=BGE)
    finally:
        await runner.cleanup()
    assert len(compressed) < 1 << 20
