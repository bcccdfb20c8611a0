"""The success bodies: each item's deterministic unit vector, in float or base64, and the
damaged bodies a scripted fault answers with."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
import pybase64

from .._types import FloatArray
from .calls import Call, Item

_VECTOR_CACHE = 2048  # vectors kept for repeated items (at most 2048 x dims x 4 bytes)


def vector_seed(model: str, dimensions: int, item: Item) -> int:
    head = f"{model}\0{dimensions}\0".encode()
    return int.from_bytes(hashlib.blake2b(head + item.key(), digest_size=8).digest(), "little")


@lru_cache(maxsize=_VECTOR_CACHE)
def unit_vector(seed: int, dimensions: int) -> FloatArray:
    """A unit float32 vector, a pure function of ``seed`` (read-only: it is shared by the cache)."""
    vector = np.random.default_rng(seed).standard_normal(dimensions)
    vector *= 1.0 / np.sqrt(vector.dot(vector))  # np.linalg.norm costs a third more, per vector
    out = vector.astype(np.float32)
    out.flags.writeable = False
    return out


def _vectors(call: Call) -> list[FloatArray]:
    return [
        unit_vector(vector_seed(call.model, call.dimensions, item), call.dimensions)
        for item in call.items
    ]


def success_body(call: Call) -> bytes:
    return orjson.dumps(_success_payload(call, _vectors(call)), option=orjson.OPT_SERIALIZE_NUMPY)


def _success_payload(call: Call, vectors: list[Any]) -> dict[str, Any]:
    if call.base64:
        vectors = [pybase64.b64encode_as_string(v.astype("<f4", copy=False).data) for v in vectors]
    # Reversed on purpose: a client must place vectors by "index", never by position.
    data = [
        {"object": "embedding", "embedding": vectors[index], "index": index}
        for index in reversed(range(len(vectors)))
    ]
    usage = {"prompt_tokens": call.tokens, "completion_tokens": 0, "total_tokens": call.tokens}
    return {"object": "list", "model": call.model, "data": data, "usage": usage}


def altered_body(call: Call, kind: str) -> bytes:
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


def broken_body(kind: str, raw: bytes) -> bytes:
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
