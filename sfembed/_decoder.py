"""Response bodies -> float32 arrays in input order, with the response's indices checked.

The hot path of a job: base64 goes from decoded bytes straight to numpy (``frombuffer``); float
lists go through orjson and one numpy conversion. No per-float Python work happens here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pybase64

from ._exceptions import MalformedResponseError
from ._types import EncodingFormat, FloatArray, Usage

__all__ = ["DecodedBody", "decode_body"]

DecodedBody = tuple[FloatArray, Usage, str]


def decode_body(
    body: bytes,
    *,
    items: int,
    dimensions: int | None,
    encoding_format: EncodingFormat,
    trace_id: str | None = None,
) -> DecodedBody:
    """Decode a 200 body into (embeddings of shape (items, dims), usage, model).

    ``dimensions`` is the expected vector length (``None``: take it from the answer). Row i holds
    the vector whose ``index`` is i. Raises MalformedResponseError for a body that is not JSON,
    lacks ``data``, has a missing, duplicate or out-of-range index, or a vector of the wrong length.
    """
    payload = _parse(body, trace_id)
    data = payload["data"]
    order = _indices(data, items, trace_id)
    try:
        rows = _rows(data, encoding_format, dimensions)
    except KeyError:
        raise _malformed("an embedding lacks its 'embedding'", trace_id) from None
    except (ValueError, TypeError) as exc:
        raise _malformed(f"bad embedding values: {exc}", trace_id) from None
    try:
        usage = _usage(payload)
    except (AttributeError, ValueError, TypeError):
        raise _malformed("bad 'usage'", trace_id) from None
    out = np.empty(rows.shape, dtype=np.float32)
    out[order] = rows  # scatter by index: row i of out belongs to input item i
    return out, usage, str(payload.get("model", ""))


def _parse(body: bytes, trace_id: str | None) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _malformed("response body is not valid JSON", trace_id) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise _malformed("response has no 'data' list", trace_id)
    return payload


def _indices(data: list[Any], items: int, trace_id: str | None) -> np.ndarray[Any, Any]:
    if len(data) != items:
        raise _malformed(f"expected {items} embeddings, got {len(data)}", trace_id)
    try:
        order = np.fromiter((entry["index"] for entry in data), dtype=np.int64, count=items)
    except (KeyError, TypeError, ValueError):
        raise _malformed("an embedding lacks an integer 'index'", trace_id) from None
    if items and (order.min() < 0 or order.max() >= items):
        raise _malformed("an embedding index is out of range", trace_id)
    if np.unique(order).size != items:
        raise _malformed("embedding indices are duplicated or missing", trace_id)
    return order


def _rows(data: list[Any], encoding_format: EncodingFormat, dimensions: int | None) -> FloatArray:
    if encoding_format == "base64":
        chunks = [pybase64.b64decode(entry["embedding"]) for entry in data]
        if len({len(chunk) for chunk in chunks}) > 1:
            raise ValueError("vectors differ in length")
        rows = np.frombuffer(b"".join(chunks), dtype="<f4").reshape(len(data), -1)
    else:
        rows = np.asarray([entry["embedding"] for entry in data], dtype=np.float32)
    if rows.ndim != 2 or (dimensions is not None and rows.shape[1] != dimensions):
        raise ValueError(f"vectors have shape {rows.shape[1:]}, expected ({dimensions},)")
    return rows


def _usage(payload: dict[str, Any]) -> Usage:
    usage = payload.get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=int(usage.get("completion_tokens", 0)),
        total_tokens=int(usage.get("total_tokens", prompt)),
    )


def _malformed(message: str, trace_id: str | None) -> MalformedResponseError:
    return MalformedResponseError(message, status=200, trace_id=trace_id)
