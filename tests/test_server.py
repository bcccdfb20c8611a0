"""sfembed.testing.LocalServer over real HTTP with a raw aiohttp client: shapes, limits, faults."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from hostile import MakeServer

from sfembed._exceptions import ConfigError
from sfembed._models import DEFAULT_CATALOG
from sfembed._testing import quota, tokenizer
from sfembed._testing.faults import FaultPlan
from sfembed.testing import (
    IMAGE_TOKENS,
    TRACE_HEADER,
    Faults,
    LocalServer,
    ModelLimits,
    ServerConfig,
    count_tokens,
    expected_embedding,
    serve,
)

KEY = "sk-local-test"
BGE = "BAAI/bge-m3"  # 8192 tokens, 1024 dims, 2 special tokens
BGE_EN = "BAAI/bge-large-en-v1.5"  # 512 tokens
QWEN = "Qwen/Qwen3-Embedding-0.6B"  # dimensions 64..1024
VL = "Qwen/Qwen3-VL-Embedding-8B"  # images, 19 special tokens
INVALID = {"code": 20015, "message": "The parameter is invalid. Please check again.", "data": None}
NO_MODEL = {
    "code": 20012,
    "message": "Model does not exist. Please check it carefully.",
    "data": None,
}
OVERLOADED = {
    "code": 50505,
    "message": "Model service overloaded. Please try again later.",
    "data": None,
}
LIMITED = (
    "Request was rejected due to rate limiting. If you want more, please contact "
    "contact@siliconflow.cn. Details:{} limit reached."
)


class Reply:
    """One answer: status, headers and the raw body (parsed with ``json``)."""

    def __init__(self, status: int, headers: Any, raw: bytes) -> None:
        self.status, self.headers, self.raw = status, headers, raw

    def json(self) -> Any:
        return orjson.loads(self.raw)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    server: LocalServer,
    body: Any,
    *,
    key: str | None = KEY,
    path: str = "/embeddings",
    **kwargs: Any,
) -> Reply:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(server.url + path, data=data, headers=headers, **kwargs) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


def vectors(reply: Reply) -> np.ndarray[Any, Any]:
    """Rows ordered by ``index``, decoding float or base64."""
    data = sorted(reply.json()["data"], key=lambda entry: entry["index"])
    rows = [
        np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
        if isinstance(e["embedding"], str)
        else np.asarray(e["embedding"], dtype=np.float32)
        for e in data
    ]
    return np.stack(rows)


def words(count: int, start: int = 0) -> list[str]:
    """Distinct 5-letter words: one token each under the server's tokenizer."""
    return [f"{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}xyz" for i in range(start, start + count)]


# --- success ----------------------------------------------------------------------------------


async def test_success_shape_usage_and_shuffled_indices(
    server: LocalServer, http: aiohttp.ClientSession
) -> None:
    items = ["hello world", "中文文本", "x"]
    reply = await post(http, server, {"model": BGE, "input": items})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["object"] == "list"
    assert body["model"] == BGE
    spec = DEFAULT_CATALOG[BGE]
    total = sum(count_tokens(item, spec) for item in items)
    assert body["usage"] == {"prompt_tokens": total, "completion_tokens": 0, "total_tokens": total}
    assert [entry["index"] for entry in body["data"]] == [2, 1, 0]  # not in input order
    assert {entry["object"] for entry in body["data"]} == {"embedding"}
    expected = np.stack([expected_embedding(BGE, item) for item in items])
    np.testing.assert_array_equal(vectors(reply), expected)
    assert expected.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-6)


async def test_base64_equals_float_exactly(
    server: LocalServer, http: aiohttp.ClientSession
) -> None:
    items = [f"document number {i}" for i in range(64)]
    as_float = await post(http, server, {"model": BGE, "input": items})
    as_b64 = await post(http, server, {"model": BGE, "input": items, "encoding_format": "base64"})
    assert isinstance(as_b64.json()["data"][0]["embedding"], str)
    assert vectors(as_b64).shape == (64, 1024)
    np.testing.assert_array_equal(vectors(as_float), vectors(as_b64))


async def test_vectors_are_deterministic_and_distinct(
    server: LocalServer, http: aiohttp.ClientSession
) -> None:
    first = vectors(await post(http, server, {"model": BGE, "input": ["a", "b", "a"]}))
    again = vectors(await post(http, server, {"model": BGE, "input": "a"}))
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], first[1])
    other_model = expected_embedding("Pro/BAAI/bge-m3", "a")
    assert not np.array_equal(first[0], other_model)


async def test_token_id_lists(server: LocalServer, http: aiohttp.ClientSession) -> None:
    single = await post(http, server, {"model": BGE, "input": [5, 6, 7]})
    assert len(single.json()["data"]) == 1
    assert single.json()["usage"]["total_tokens"] == 3 + 2
    several = await post(http, server, {"model": BGE, "input": [[5, 6, 7], [8]]})
    assert several.json()["usage"]["total_tokens"] == 5 + 3
    np.testing.assert_array_equal(vectors(several)[0], vectors(single)[0])
    np.testing.assert_array_equal(vectors(several)[1], expected_embedding(BGE, [8]))


async def test_dimensions(server: LocalServer, http: aiohttp.ClientSession) -> None:
    default = await post(http, server, {"model": QWEN, "input": "hi"})
    assert vectors(default).shape == (1, 1024)
    small = await post(http, server, {"model": QWEN, "input": "hi", "dimensions": 256})
    assert vectors(small).shape == (1, 256)
    np.testing.assert_array_equal(vectors(small)[0], expected_embedding(QWEN, "hi", dimensions=256))


async def test_vl_model_takes_images_text_objects_and_mixed_lists(
    server: LocalServer, http: aiohttp.ClientSession
) -> None:
    image = "https://example.com/cat.jpg"
    raw = base64.b64encode(b"\x89PNG fake").decode()
    data_uri = "data:image/png;base64," + raw
    items: list[str | dict[str, str]] = [
        "a caption",
        {"text": "a caption"},
        {"image": image},
        {"image": data_uri},
    ]
    items.append({"image": raw})
    reply = await post(http, server, {"model": VL, "input": items, "dimensions": 64})
    assert reply.status == 200
    got = vectors(reply)
    np.testing.assert_array_equal(got[0], got[1])  # {"text": s} is the string s
    np.testing.assert_array_equal(got[2], expected_embedding(VL, {"image": image}, dimensions=64))
    spec = DEFAULT_CATALOG[VL]
    assert count_tokens({"image": image}, spec) == IMAGE_TOKENS + spec.special_tokens
    assert reply.json()["usage"]["total_tokens"] == sum(count_tokens(i, spec) for i in items)
    lone = await post(http, server, {"model": VL, "input": {"image": image}, "dimensions": 64})
    np.testing.assert_array_equal(vectors(lone)[0], got[2])


# --- tokenizer and truncation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("hello", 1),
        ("hello world", 2),
        ("internationalization", 4),  # 20 letters: ceil(20 / 5)
        ("1234567", 3),  # ceil(7 / 3)
        ("中文字符", 4),
        ("ひらがなカタカナ", 8),
        ("한국어", 3),
        ("a, b!", 4),
        ("v2.0", 4),
        ("  spaced   out  ", 3),  # "spaced" is 6 letters: 2 tokens
        ("_", 1),
        ("emoji 😀😀", 3),
    ],
)
def test_count_tokens(text: str, tokens: int) -> None:
    spec = DEFAULT_CATALOG[BGE]
    assert count_tokens(text, spec) == tokens + spec.special_tokens


def test_the_token_class_table_classifies_every_bmp_point_as_one_at_a_time() -> None:
    # The table is filled in bulk as points are met; the rule is ``_classify``.
    table = tokenizer._bmp_classes(np.arange(0x10000, dtype=np.uint32))
    one_by_one = [tokenizer._classify(code) for code in range(0x10000)]
    assert table.tolist() == one_by_one


def test_count_tokens_rejects_what_the_server_rejects() -> None:
    with pytest.raises(ValueError, match="empty"):
        count_tokens("", DEFAULT_CATALOG[BGE])
    with pytest.raises(ValueError, match="content objects"):
        count_tokens({"image": "https://x/y.png"}, DEFAULT_CATALOG[BGE])


@pytest.mark.parametrize("side", ["right", "left"])
async def test_truncate_keeps_the_limit_and_the_right_end(
    server: LocalServer, http: aiohttp.ClientSession, side: str
) -> None:
    limit = DEFAULT_CATALOG[BGE_EN].max_input_tokens
    keep = limit - DEFAULT_CATALOG[BGE_EN].special_tokens
    vocabulary = words(600)
    text = " ".join(vocabulary)
    too_long = await post(http, server, {"model": BGE_EN, "input": text})
    assert (too_long.status, too_long.json()) == (400, INVALID)
    reply = await post(http, server, {"model": BGE_EN, "input": [text, "short"], "truncate": side})
    assert reply.status == 200
    assert reply.json()["usage"]["total_tokens"] == limit + count_tokens(
        "short", DEFAULT_CATALOG[BGE_EN]
    )
    kept = vocabulary[:keep] if side == "right" else vocabulary[-keep:]
    got = vectors(reply)[0]
    np.testing.assert_array_equal(got, expected_embedding(BGE_EN, " ".join(kept)))
    np.testing.assert_array_equal(got, expected_embedding(BGE_EN, text, truncate=side))


async def test_truncate_token_ids(server: LocalServer, http: aiohttp.ClientSession) -> None:
    ids = list(range(1, 601))
    reply = await post(http, server, {"model": BGE_EN, "input": [ids], "truncate": "left"})
    assert reply.json()["usage"]["total_tokens"] == 512
    np.testing.assert_array_equal(vectors(reply)[0], expected_embedding(BGE_EN, ids[-510:]))


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"model": BGE, "input": "x", "dimensions": 512},  # BGE takes no dimensions
        {"model": QWEN, "input": "x", "dimensions": 4096},  # not offered by this model
        {"model": QWEN, "input": "x", "dimensions": "256"},
        {"model": BGE, "input": "x", "encoding_format": "int8"},
        {"model": BGE, "input": "x", "truncate": "middle"},
        {"model": BGE, "input": "x", "user": 5},
        {"model": BGE, "input": ""},
        {"model": BGE, "input": ["ok", ""]},
        {"model": BGE, "input": []},
        {"model": BGE, "input": [[]]},
        {"model": BGE, "input": 42},
        {"model": BGE, "input": None},
        {"model": BGE, "input": [1.5]},
        {"model": BGE, "input": [[1, -2]]},
        {"model": BGE, "input": ["text", [1, 2]]},
        {"model": BGE, "input": {"image": "https://example.com/a.png"}},
        {"model": BGE, "input": [{"text": "x"}]},
        {"model": VL, "input": {"image": "not an image!"}},
        {"model": VL, "input": {"image": "abc"}},  # not whole base64 groups
        {"model": VL, "input": {"text": "x", "image": "https://x/y.png"}},
        {"model": BGE_EN, "input": "word " * 600},
        {"model": 7, "input": "x"},
        {"input": "x"},
        [1, 2],
        b"{not json",
    ],
)
async def test_invalid_parameters_get_20015(
    server: LocalServer, http: aiohttp.ClientSession, body: Any
) -> None:
    reply = await post(http, server, body)
    assert (reply.status, reply.json()) == (400, INVALID)
    assert reply.headers["Content-Type"].startswith("application/json")


async def test_unknown_model_gets_20012(server: LocalServer, http: aiohttp.ClientSession) -> None:
    reply = await post(http, server, {"model": "Org/nope", "input": "x"})
    assert (reply.status, reply.json()) == (400, NO_MODEL)


async def test_batch_too_large_gets_413(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_batch_items=8)
    reply = await post(http, server, {"model": BGE, "input": ["x"] * 9})
    message = "input batch size 9 > maximum allowed batch size 8"
    assert (reply.status, reply.json()) == (413, {"code": 20042, "message": message, "data": None})
    assert (await post(http, server, {"model": BGE, "input": ["x"] * 8})).status == 200


@pytest.mark.parametrize(
    "key", [None, "", "sk-wrong", "Basic sk-local-test"], ids=["none", "empty", "wrong", "basic"]
)
async def test_bad_key_gets_401(
    server: LocalServer, http: aiohttp.ClientSession, key: str | None
) -> None:
    headers = {} if key is None else {"Authorization": key if " " in key else f"Bearer {key}"}
    body = orjson.dumps({"model": BGE, "input": "x"})
    async with http.post(server.url + "/embeddings", data=body, headers=headers) as resp:
        assert resp.status == 401
        assert orjson.loads(await resp.read()) == "Invalid token"


async def test_any_key_when_api_key_is_none(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(api_key=None)
    assert (await post(http, server, {"model": BGE, "input": "x"}, key="anything")).status == 200
    assert (await post(http, server, {"model": BGE, "input": "x"}, key=None)).status == 401


@pytest.mark.parametrize(("method", "path"), [("POST", "/chat"), ("GET", "/embeddings")])
async def test_other_paths_get_404_plain_text(
    server: LocalServer, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, server.url + path) as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert await resp.read() == b"404 page not found"
        assert resp.headers[TRACE_HEADER]


async def test_every_answer_has_a_unique_trace_id(
    server: LocalServer, http: aiohttp.ClientSession
) -> None:
    replies = [
        await post(http, server, {"model": BGE, "input": "x"}),
        await post(http, server, {"model": BGE, "input": ""}),
        await post(http, server, {"model": BGE, "input": "x"}, key="bad"),
        await post(http, server, {"model": BGE, "input": "x"}, path="/nope"),
    ]
    ids = [reply.headers[TRACE_HEADER] for reply in replies]
    assert all(ids)
    assert len(set(ids)) == len(ids)


# --- rate limits --------------------------------------------------------------------------------


async def test_rpm_limit_per_model(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await make_server(limits={BGE: ModelLimits(rpm=2)})
    statuses = [(await post(http, server, {"model": BGE, "input": "x"})).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = await post(http, server, {"model": BGE, "input": "x"})
    assert refused.json() == {"message": LIMITED.format("RPM"), "data": None}
    assert "Retry-After" not in refused.headers
    assert (await post(http, server, {"model": QWEN, "input": "x"})).status == 200  # unlimited
    assert server.stats.rate_limited_rpm == 2
    assert len(server.stats.accepted) == 3  # two of BGE, one of QWEN


async def test_tpm_limit_counts_accepted_tokens_only(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(default_limits=ModelLimits(tpm=10))
    six = {"model": BGE, "input": "aaaa bbbb cccc dddd"}  # 4 + 2 special
    four = {"model": BGE, "input": "aaaa bbbb"}  # 2 + 2 special
    assert (await post(http, server, six)).status == 200
    refused = await post(http, server, six)
    assert (refused.status, refused.json()["message"]) == (429, LIMITED.format("TPM"))
    assert (await post(http, server, four)).status == 200  # the refused 6 were not charged
    assert (await post(http, server, four)).status == 429
    assert server.stats.tokens_accepted == 10
    assert server.stats.rate_limited_tpm == 2
    assert [tokens for _, tokens in server.stats.accepted] == [6, 4]


async def test_window_expiry(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await make_server(default_limits=ModelLimits(rpm=1), window_s=0.2)
    body = {"model": BGE, "input": "x"}
    assert (await post(http, server, body)).status == 200
    assert (await post(http, server, body)).status == 429
    await asyncio.sleep(0.25)
    assert (await post(http, server, body)).status == 200


async def test_retry_after_on_429_and_503(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(default_limits=ModelLimits(rpm=1), faults=Faults(retry_after_s=1.5))
    body = {"model": BGE, "input": "x"}
    assert "Retry-After" not in (await post(http, server, body)).headers
    refused = await post(http, server, body)
    assert (refused.headers["Retry-After"], refused.headers["retry-after-ms"]) == ("2", "1500")
    server.inject("503")
    assert (await post(http, server, body)).headers["retry-after-ms"] == "1500"


# --- faults -------------------------------------------------------------------------------------


async def test_random_faults_replay_with_their_seed(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    faults = Faults(rate_503=0.3, rate_504=0.2, seed=7)
    runs = []
    for _ in range(2):
        server = await make_server(faults=faults)
        body = {"model": BGE, "input": "x"}
        runs.append([(await post(http, server, body)).status for _ in range(30)])
    assert runs[0] == runs[1]
    assert {200, 503, 504} <= set(runs[0])


async def test_fault_bodies_and_faults_spare_the_quota(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(
        default_limits=ModelLimits(rpm=1), faults=Faults(rate_503=1.0, seed=1)
    )
    body = {"model": BGE, "input": "x"}
    overloaded = await post(http, server, body)
    assert (overloaded.status, overloaded.json()) == (503, OVERLOADED)
    server.set_faults(Faults(rate_504=1.0))
    timeout = await post(http, server, body)
    assert (timeout.status, timeout.raw) == (504, b"upstream request timeout")
    server.set_faults(Faults())
    assert (await post(http, server, body)).status == 200  # quota untouched by the faults


async def test_reset_is_a_connection_error(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(rate_reset=1.0))
    async with aiohttp.ClientSession() as http:
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            await post(http, server, {"model": BGE, "input": "x"})
    assert server.stats.resets == 1
    assert server.stats.by_status == {}


async def test_stall_outlasts_a_read_timeout(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(faults=Faults(rate_stall=1.0, stall_s=0.5))
    timeout = aiohttp.ClientTimeout(sock_read=0.1)
    with pytest.raises(asyncio.TimeoutError):
        await post(http, server, {"model": BGE, "input": "x"}, timeout=timeout)
    assert server.stats.stalls == 1
    # Counted on arrival, as the provider's limits act, though never answered.
    assert server.stats.tokens_accepted == count_tokens("x", DEFAULT_CATALOG[BGE])
    assert server.stats.by_status == {}


async def test_model_time_grows_with_tokens_and_follows_admission(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    # 1,000 s per 1,000 tokens: a 3-token request is still being "embedded" at the read timeout,
    # but it was admitted (and charged) on arrival, as the provider's limits act.
    server = await make_server(faults=Faults(latency_per_1k_tokens_s=1000.0))
    assert server.stats.first_request_at is None
    timeout = aiohttp.ClientTimeout(sock_read=0.1)
    with pytest.raises(asyncio.TimeoutError):
        await post(http, server, {"model": BGE, "input": "x"}, timeout=timeout)
    assert server.stats.tokens_accepted == count_tokens("x", DEFAULT_CATALOG[BGE])
    assert server.stats.first_request_at is not None
    assert server.stats.by_status == {}


@pytest.mark.parametrize("field", ["latency_s", "latency_per_1k_tokens_s"])
def test_negative_latency_is_refused(field: str) -> None:
    options: dict[str, Any] = {field: -0.1}
    with pytest.raises(ValueError, match="latencies"):
        Faults(**options)


async def test_injected_stall_then_a_normal_answer(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(faults=Faults(stall_s=0.1))
    server.inject("stall")
    reply = await post(http, server, {"model": BGE, "input": "x"})
    assert reply.status == 200
    assert server.stats.stalls == 1


@pytest.mark.parametrize(
    ("kind", "status", "body"),
    [
        ("400", 400, INVALID),
        ("model", 400, NO_MODEL),
        ("401", 401, "Invalid token"),
        ("403", 403, "Forbidden"),
        ("503", 503, OVERLOADED),
        ("429-tpm", 429, {"message": LIMITED.format("TPM"), "data": None}),
        ("429-rpm", 429, {"message": LIMITED.format("RPM"), "data": None}),
        (
            "413",
            413,
            {
                "code": 20042,
                "message": "input batch size 2 > maximum allowed batch size 64",
                "data": None,
            },
        ),
    ],
)
async def test_inject_json_answers(
    server: LocalServer, http: aiohttp.ClientSession, kind: str, status: int, body: Any
) -> None:
    server.inject(kind)
    reply = await post(http, server, {"model": BGE, "input": ["a", "b"]})
    assert (reply.status, reply.json()) == (status, body)
    assert (await post(http, server, {"model": BGE, "input": "a"})).status == 200


@pytest.mark.parametrize(
    ("kind", "status", "raw"),
    [("404", 404, b"404 page not found"), ("504", 504, b"upstream request timeout")],
)
async def test_inject_plain_text_answers(
    server: LocalServer, http: aiohttp.ClientSession, kind: str, status: int, raw: bytes
) -> None:
    server.inject(kind)
    reply = await post(http, server, {"model": BGE, "input": "a"})
    assert (reply.status, reply.raw) == (status, raw)
    assert reply.headers["Content-Type"].startswith("text/plain")


async def test_inject_broken_200s(server: LocalServer, http: aiohttp.ClientSession) -> None:
    server.inject("bad-json")
    server.inject("no-data")
    bad = await post(http, server, {"model": BGE, "input": "a"})
    assert bad.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        bad.json()
    missing = await post(http, server, {"model": BGE, "input": "a"})
    assert missing.status == 200
    assert "data" not in missing.json()
    assert missing.json()["model"] == BGE


async def test_inject_is_queued_and_takes_precedence(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(faults=Faults(rate_504=1.0))
    server.inject("503", count=2)
    server.inject("reset")
    body = {"model": BGE, "input": "a"}
    statuses = [(await post(http, server, body)).status for _ in range(2)]
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await post(http, server, body)
    statuses.append((await post(http, server, body)).status)
    assert statuses == [503, 503, 504]


def test_inject_rejects_unknown_kinds(server: LocalServer) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        server.inject("418")


async def test_max_in_flight(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(max_in_flight=2, latency_s=0.3))
    async with aiohttp.ClientSession() as http:
        body = {"model": BGE, "input": "a"}
        replies = await asyncio.gather(*(post(http, server, body) for _ in range(5)))
    statuses = sorted(reply.status for reply in replies)
    assert statuses == [200, 200, 503, 503, 503]
    assert all(r.json() == OVERLOADED for r in replies if r.status == 503)
    assert server.stats.max_in_flight_seen >= 3


# --- lifecycle ----------------------------------------------------------------------------------


async def test_restart_comes_back_on_the_same_port(make_server: MakeServer) -> None:
    server = await make_server()
    url = server.url
    body = {"model": BGE, "input": "a"}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        assert (await post(http, server, body)).status == 200
        await server.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, server, body)
        await server.start()
        assert server.url == url
        await server.restart()
        assert server.url == url
        assert (await post(http, server, body)).status == 200


async def test_stop_drops_a_stalled_request(make_server: MakeServer) -> None:
    server = await make_server(faults=Faults(rate_stall=1.0, stall_s=30))
    async with aiohttp.ClientSession() as http:
        pending = asyncio.ensure_future(post(http, server, {"model": BGE, "input": "a"}))
        await asyncio.sleep(0.2)  # ample for the request to reach its stall on localhost
        assert server.stats.stalls == 1
        await server.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await pending


async def test_serve_runs_until_cancelled(http: aiohttp.ClientSession) -> None:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(LocalServer().config, on_ready=ready.set_result))
    url = await ready
    body = orjson.dumps({"model": BGE, "input": "a"})
    async with http.post(
        url + "/embeddings", data=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        assert resp.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_stats(server: LocalServer, http: aiohttp.ClientSession) -> None:
    await post(http, server, {"model": BGE, "input": ["a", "b"]})
    await post(http, server, {"model": BGE, "input": ""})
    await post(http, server, {"model": BGE, "input": "a"}, path="/x")
    assert server.stats.requests == 3
    assert server.stats.by_status == {200: 1, 400: 1, 404: 1}
    assert server.stats.tokens_accepted == count_tokens("a", DEFAULT_CATALOG[BGE]) * 2
    assert len(server.stats.accepted) == 1


def test_expected_embedding_validates_like_the_server() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        expected_embedding(BGE, "x", dimensions=256)
    with pytest.raises(ValueError, match="limit"):
        expected_embedding(BGE_EN, "word " * 600)
    with pytest.raises(ValueError, match="truncate"):
        expected_embedding(BGE_EN, "x", truncate="middle")
    with pytest.raises(ConfigError):
        expected_embedding("Org/nope", "x")


# --- shapes of other providers ------------------------------------------------------------------


async def test_token_factor_scales_the_charge_and_usage_rounded_up(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(default_limits=ModelLimits(tpm=20), token_factor=1.3)
    body = {"model": BGE, "input": "aaaa bbbb cccc dddd"}  # 4 + 2 special: 7.8, charged 8
    answer = await post(http, server, body)
    assert answer.json()["usage"]["total_tokens"] == 8
    assert (await post(http, server, body)).status == 200
    assert (await post(http, server, body)).status == 429  # 16 + 8 > 20
    assert [tokens for _, tokens in server.stats.accepted] == [8, 8]


def test_token_factor_must_be_positive() -> None:
    with pytest.raises(ValueError, match="token_factor"):
        ServerConfig(token_factor=0.0)


def test_a_fixed_window_starts_afresh_at_each_multiple_of_its_length() -> None:
    limits = ModelLimits(rpm=1)
    fixed, sliding = quota._Window(fixed=True), quota._Window()
    times = (9.9, 10.1, 10.95, 11.05)
    fixed_answers = [fixed.refusal(now, 1, limits, 1.0) for now in times]
    sliding_answers = [sliding.refusal(now, 1, limits, 1.0) for now in times]
    # 10.1: a new fixed window (from 10.0), the same sliding one; 10.95: the sliding window
    # has let 9.9 go, the fixed one holds 10.1.
    assert fixed_answers == [None, None, "RPM", None]
    assert sliding_answers == [None, "RPM", None, "RPM"]


async def test_random_429s_have_the_providers_body_and_spare_the_quota(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(
        default_limits=ModelLimits(rpm=1), faults=Faults(rate_429=1.0, retry_after_s=0.5)
    )
    body = {"model": BGE, "input": "x"}
    refused = await post(http, server, body)
    assert (refused.status, refused.json()) == (
        429,
        {"message": LIMITED.format("TPM"), "data": None},
    )
    assert refused.headers["retry-after-ms"] == "500"
    server.set_faults(Faults())
    assert (await post(http, server, body)).status == 200  # the quota was not charged
    assert server.stats.rate_limited_tpm == 1


def test_a_long_tail_of_latency_keeps_the_faults_draws_and_its_mean() -> None:
    plain = FaultPlan(Faults(rate_503=0.5, latency_per_1k_tokens_s=1.0, seed=4))
    tailed = FaultPlan(Faults(rate_503=0.5, latency_per_1k_tokens_s=1.0, latency_sigma=1.0, seed=4))
    draws, times = [], []
    for _ in range(4_000):
        draws.append((plain.draw(0), tailed.draw(0)))
        times.append((plain.work_s(1_000), tailed.work_s(1_000)))
    assert all(a == b for a, b in draws)  # the tail draws from a generator of its own
    assert {a for a, _ in times} == {1.0}
    tail = sorted(b for _, b in times)
    assert tail[-40] > 5.0  # the slowest 1% take over five times the mean ...
    assert 0.9 < sum(tail) / len(tail) < 1.1  # ... which is kept
