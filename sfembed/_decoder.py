"""Response bodies -> float32 arrays in input order, with the response's indices checked.

The hot path of a job: base64 vectors are cut out of the body as bytes, never made into Python
strings, and go from decoded bytes straight to numpy (``frombuffer``); float lists go through
orjson and one numpy conversion. No per-float Python work happens here.
"""

from __future__ import annotations

import re
from itertools import repeat
from operator import itemgetter
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt
import orjson
import pybase64

from ._exceptions import MalformedResponseError
from ._types import EncodingFormat, FloatArray, Usage

__all__ = ["DecodedBody", "all_finite", "decode_body"]

_EMBEDDING_KEY = b'"embedding":'

#: (rows, usage or ``None`` when the answer carried none that can be trusted, model name).
DecodedBody = tuple[FloatArray, Usage | None, str]


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
    lacks ``data``, has a missing, duplicate or out-of-range index, a vector of the wrong length,
    or a value that is not a finite number (NaN, infinity, a string, a boolean, null).

    Usage is ``None`` when the answer has none, or one that is not a count (negative, not an
    integer): some gateways strip it, and the vectors are good all the same.
    """
    if body[:3] == b"\xef\xbb\xbf":  # a byte-order mark some gateways put before the JSON
        body = body[3:]
    split = _split_base64(body, _text_width(dimensions)) if encoding_format == "base64" else None
    payload, chunks = split if split is not None else (_parse(body, trace_id), None)
    data = payload["data"]
    order = _indices(data, items, trace_id)
    try:
        rows = _rows(data, encoding_format, dimensions, chunks, order)
    except KeyError:
        raise _malformed("an embedding lacks its 'embedding'", trace_id) from None
    except (ValueError, TypeError) as exc:
        raise _malformed(f"bad embedding values: {exc}", trace_id) from None
    return rows, _usage(payload), str(payload.get("model", ""))


def _split_base64(
    body: bytes, width: int | None = None
) -> tuple[dict[str, Any], list[bytes]] | None:
    """(payload, each entry's vector bytes) without a Python string made of any vector's text,
    or None for a body not plainly laid out so (it is then parsed whole, as any other).

    Texts of the expected ``width`` are cut out by one regular expression split (see
    :func:`_split_fixed`); any other answer, or one that split does not explain, is searched
    entry by entry (:func:`_split_searched`)."""
    if width is not None and (split := _split_fixed(body, width)) is not None:
        return split
    return _split_searched(body, width)


def _split_fixed(body: bytes, width: int) -> tuple[dict[str, Any], list[bytes]] | None:
    """:func:`_split_searched` for the usual answer, whose every text is ``width`` characters
    long, in C: one split of the body at each ``"embedding":"<width characters>"`` gives the
    texts (as bytes: strict decoding takes them quicker than views) and the rest between them,
    where each text's place is taken by ``"embedding":<ordinal>``. The split skips a text
    without reading it. So every check of the searched path holds here too: the rest has no
    backslash, its keys are the ones found, entry i holds ordinal i, and each text is strict
    base64 (a text holding a quote, being shorter than ``width``, is refused by decoding).
    None when any of them fails, or no text was found."""
    pieces = _fixed_pattern(width).split(body)
    count = len(pieces) // 2
    if not count:
        return None
    texts = pieces[1::2]
    pieces[1::2] = _KEYED[:count] if count <= _ORDINALS_KEPT else _keyed(count)
    rest = b"".join(pieces)
    if b"\\" in rest or not _keys_found(rest, count):
        return None
    try:
        payload = orjson.loads(rest)
        if list(map(_get_embedding, payload["data"])) != list(range(count)):
            return None
        chunks = list(map(pybase64.b64decode, texts, repeat(None), repeat(True)))  # validate
    except (ValueError, LookupError, TypeError):  # JSONDecodeError and binascii.Error included
        return None
    return payload, chunks


def _fixed_pattern(width: int) -> re.Pattern[bytes]:
    """``"embedding":"<text>"`` with a text of ``width`` characters (JSON's whitespace allowed
    after the colon, as :func:`_split_searched` allows it), the text captured. DOTALL: a run
    of any ``width`` characters is skipped, not matched one by one."""
    pattern = _PATTERNS.get(width)
    if pattern is None:
        pattern = _PATTERNS[width] = re.compile(
            rb'"embedding":[ \t\n\r]*"(.{%d})"' % width, re.DOTALL
        )
    return pattern


def _keyed(count: int) -> list[bytes]:
    return [b'"embedding":%d' % ordinal for ordinal in range(count)]


def _split_searched(
    body: bytes, width: int | None = None
) -> tuple[dict[str, Any], list[bytes]] | None:
    """:func:`_split_base64` for any width, each text found by a search of its own.

    Most of a base64 answer is its vectors' text, and parsing it into strings costs more than
    decoding it. So each ``"embedding":"<text>"`` is found by its key, its text decoded from the
    body itself, and the rest of the body, each quoted text replaced by its ordinal (a JSON
    number), parsed as JSON. That rest is the body's own structure when: it has no backslash (no
    escape can spell a key the search missed), every ``"embedding"`` in it is a key found (then
    followed by ``:``) or a value (followed by ``,``, ``}`` or ``]``: any other layout is parsed
    whole), entry i of ``data`` holds ordinal i (so each text is one entry's vector, and no key
    was met elsewhere), and each text is strict base64 (neither quote nor backslash: the first
    quote after its start ends it).

    ``width`` is the length of a text of the expected vector, when known: a text followed by a
    quote at that length is not searched for its end. A quote before it would be inside the
    text, which strict decoding then refuses, as any text holding a quote."""
    pieces: list[bytes] = []
    append = pieces.append
    starts: list[int] = []
    ends: list[int] = []
    find = body.find
    ordinals = _ORDINALS
    count = done = 0
    while (key := find(_EMBEDDING_KEY, done)) >= 0:
        value = key + len(_EMBEDDING_KEY)
        if body[value : value + 1] == b'"':  # as most servers write it: no space after the colon
            start = value + 1
        else:
            start = find(b'"', value) + 1
            if not start or body[value : start - 1].strip():
                return None  # not a string value
        if width is None or body[start + width : start + width + 1] != b'"':
            end = find(b'"', start)
            if end < 0:
                return None
        else:
            end = start + width
        append(body[done : start - 1])
        append(ordinals[count] if count < _ORDINALS_KEPT else b"%d" % count)
        starts.append(start)
        ends.append(end)
        count += 1
        done = end + 1
    append(body[done:])
    rest = b"".join(pieces)
    if not starts or b"\\" in rest or not _keys_found(rest, count):
        return None
    try:
        payload = orjson.loads(rest)
        if list(map(_get_embedding, payload["data"])) != list(range(count)):
            return None
        texts = map(memoryview(body).__getitem__, map(slice, starts, ends))
        chunks = list(map(pybase64.b64decode, texts, repeat(None), repeat(True)))  # validate
    except (ValueError, LookupError, TypeError):  # JSONDecodeError and binascii.Error included
        return None
    return payload, chunks


def _text_width(dimensions: int | None) -> int | None:
    """Characters of the base64 text of ``dimensions`` float32 values, padding included."""
    return None if dimensions is None else 4 * -(-4 * dimensions // 3)


#: Each vector's text is replaced by its ordinal: ``_ORDINALS[i]`` is ``b"i"``.
_ORDINALS_KEPT = 1024
_ORDINALS = [b"%d" % ordinal for ordinal in range(_ORDINALS_KEPT)]
#: Each key and text cut out by :func:`_split_fixed` is replaced by ``_KEYED[i]``.
_KEYED = _keyed(_ORDINALS_KEPT)
_PATTERNS: dict[int, re.Pattern[bytes]] = {}  # by text width
_get_embedding = itemgetter("embedding")
_get_index = itemgetter("index")
_INT = frozenset({int})


def _keys_found(rest: bytes, found: int) -> bool:
    """Whether the ``"embedding"`` keys of ``rest`` are the ``found`` ones: each is followed by
    its colon (no space: ``"embedding" :`` is a key the search did not see), and every other
    ``"embedding"`` is a value (``"object":"embedding"``), followed by ``,``, ``}`` or ``]``.
    Counts in C, where a regular expression costs more than the search itself: three of them
    for the usual answer."""
    count = rest.count
    if count(b'"embedding":') != found:
        return False
    others = count(b'"embedding"') - found
    if not others:
        return True
    # The usual answer's values are each followed by a comma ("object":"embedding",): the other
    # two counts only when some is not.
    values = count(b'"embedding",')
    return others == values or others == values + count(b'"embedding"}') + count(b'"embedding"]')


def _parse(body: bytes, trace_id: str | None) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _malformed("response body is not valid JSON", trace_id) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise _malformed(_no_data(payload), trace_id)
    return payload


def _no_data(payload: object) -> str:
    """Why a 200 body has no vectors; a gateway may send its error with status 200."""
    if isinstance(payload, dict) and payload.get("message"):
        code = payload.get("code")
        where = f" (code {code})" if isinstance(code, int) and not isinstance(code, bool) else ""
        return f"a 200 answer holding an error: {str(payload['message'])[:300]}{where}"
    return "response has no 'data' list"


def _indices(data: list[Any], items: int, trace_id: str | None) -> list[int] | None:
    """Where each entry's row goes, or None when entry i has index i."""
    if len(data) != items:
        raise _malformed(f"expected {items} embeddings, got {len(data)}", trace_id)
    try:
        indices = list(map(_get_index, data))
    except (KeyError, TypeError):
        indices = [None]
    # Exactly int: numpy would take "1", 1.5 and true as index 1 and misplace a vector.
    if not _INT.issuperset(map(type, indices)):
        raise _malformed("an embedding lacks an integer 'index'", trace_id)
    expected = list(range(items))
    if indices == expected:
        return None
    if sorted(indices) != expected:  # a few dozen ints: quicker in Python than through numpy
        if min(indices) < 0 or max(indices) >= items:
            raise _malformed("an embedding index is out of range", trace_id)
        raise _malformed("embedding indices are duplicated or missing", trace_id)
    return indices


def _rows(
    data: list[Any],
    encoding_format: EncodingFormat,
    dimensions: int | None,
    chunks: list[bytes] | None,
    order: list[int] | None,
) -> FloatArray:
    """The rows in input order: row i is the vector of the entry whose index is i (``order``
    says where each entry's row goes, None when entry i is row i). Base64 vectors already
    decoded may come as ``chunks``, in the answer's order."""
    if encoding_format == "base64":
        if chunks is None:
            chunks = [pybase64.b64decode(entry["embedding"], validate=True) for entry in data]
        if len(set(map(len, chunks))) > 1:
            raise ValueError("vectors differ in length")
        if order is not None:  # put in place before they are joined: no second copy of the rows
            # Row i is the entry whose index is i: the entries sorted by index.
            chunks = list(map(chunks.__getitem__, sorted(range(len(order)), key=order.__getitem__)))
        # A bytearray: the rows are the caller's to change, as any array it is given.
        rows = np.frombuffer(bytearray().join(chunks), dtype="<f4").reshape(len(data), -1)
    else:
        rows = _float_rows([entry["embedding"] for entry in data])
    if rows.ndim != 2 or (dimensions is not None and rows.shape[1] != dimensions):
        raise ValueError(f"vectors have shape {rows.shape[1:]}, expected ({dimensions},)")
    if not all_finite(rows):
        raise ValueError("a vector holds NaN or infinity")
    if encoding_format == "base64" or order is None:
        return rows
    out = np.empty(rows.shape, dtype=np.float32)
    out[order] = rows  # scatter by index: row i of out belongs to input item i
    return out


def all_finite(rows: FloatArray) -> bool:
    """True when no value is NaN or infinite. One pass of ``isfinite`` (SIMD in numpy), a block
    of rows at a time so that its temporary stays small: 10 us for 64 x 1,024 values, against
    13 for the largest and the smallest value (two passes), and 23 against 32 when the rows are
    not in the cache."""
    if rows.ndim != 2 or len(rows) <= _FINITE_BLOCK_VALUES // max(rows.shape[1], 1):
        return bool(np.isfinite(rows).all())
    step = _FINITE_BLOCK_VALUES // max(rows.shape[1], 1)
    return all(np.isfinite(rows[start : start + step]).all() for start in range(0, len(rows), step))


_FINITE_BLOCK_VALUES = 1 << 16  # values checked per call: a 64 KiB temporary


def _float_rows(lists: list[Any]) -> FloatArray:
    """JSON number lists -> float32, refusing strings, booleans and nulls.

    The dtype is inferred, not forced: forcing float32 would turn "1.5" into 1.5 and true into
    1.0 without a word. Inference gives a string or object array for strings and nulls; a boolean
    among floats becomes 0.0 or 1.0, so only entries equal to 0 or 1 have their type checked."""
    wide: npt.NDArray[Any] = np.asarray(lists)
    if wide.dtype.kind not in "fi":
        raise ValueError(f"vectors hold {_kind_name(wide.dtype.kind)}, not numbers")
    for row, column in np.argwhere((wide == 0) | (wide == 1)).tolist():
        if type(lists[row][column]) is bool:
            raise ValueError("vectors hold booleans, not numbers")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused by the caller
        return wide.astype(np.float32)


def _kind_name(kind: str) -> str:
    return {"U": "strings", "S": "strings", "b": "booleans", "O": "nulls or mixed values"}.get(
        kind, f"values of kind {kind!r}"
    )


def _usage(payload: dict[str, Any]) -> Usage | None:
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens", usage.get("prompt_tokens"))
    prompt = usage.get("prompt_tokens", total)
    completion = usage.get("completion_tokens", 0)
    if not (_is_count(prompt) and _is_count(total) and _is_count(completion)):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def _is_count(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0


def _malformed(message: str, trace_id: str | None) -> MalformedResponseError:
    return MalformedResponseError(message, status=200, trace_id=trace_id)
