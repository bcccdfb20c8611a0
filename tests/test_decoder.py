"""The decoder: index order, base64 == float, and every malformed answer refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from sfembed import _decoder
from sfembed._exceptions import MalformedResponseError
from sfembed._types import EncodingFormat


def _body(vectors: np.ndarray, order: list[int], encoding: str) -> bytes:
    data = []
    for index in order:
        vector = vectors[index].astype("<f4")
        value = base64.b64encode(vector.tobytes()).decode() if encoding == "base64" else vector
        data.append({"object": "embedding", "embedding": value, "index": index})
    usage = {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    payload = {"object": "list", "model": "m", "data": data, "usage": usage}
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_rows_follow_index_not_position(encoding: EncodingFormat) -> None:
    vectors = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    body = _body(vectors, [3, 0, 4, 1, 2], encoding)
    rows, usage, model = _decoder.decode_body(
        body,
        items=5,
        dimensions=8,
        encoding_format=encoding,
    )
    np.testing.assert_array_equal(rows, vectors)
    assert rows.dtype == np.float32
    assert rows.flags.c_contiguous
    assert usage is not None
    assert usage["total_tokens"] == 7
    assert model == "m"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.pop("data"), "no 'data'"),
        (lambda p: p["data"].pop(), "expected 3"),
        (lambda p: p["data"][0].update(index=1), "duplicated or missing"),
        (lambda p: p["data"][0].update(index=9), "out of range"),
        (lambda p: p["data"][0].pop("index"), "integer 'index'"),
        (lambda p: p["data"][0].update(index="0"), "integer 'index'"),
        (lambda p: p["data"][0].update(index=0.0), "integer 'index'"),
        (lambda p: p["data"][1].update(index=True), "integer 'index'"),
        (lambda p: p["data"][0].update(embedding=["1.0"] * 4), "strings"),
        (lambda p: p["data"][0].update(embedding=[True, 0.5, 0.5, 0.5]), "booleans"),
        (lambda p: p["data"][0].update(embedding=[None, 0.5, 0.5, 0.5]), "nulls"),
        (lambda p: p["data"][0].update(embedding=[1e39, 0.5, 0.5, 0.5]), "NaN or infinity"),
        (lambda p: p["data"][0].update(embedding=[0.0] * 3), "bad embedding values"),
    ],
)
def test_malformed_answers(mutate: Callable[[dict[str, Any]], object], message: str) -> None:
    vectors = np.ones((3, 4), dtype=np.float32)
    payload = orjson.loads(_body(vectors, [0, 1, 2], "float"))
    mutate(payload)
    with pytest.raises(MalformedResponseError, match=message) as info:
        _decoder.decode_body(
            orjson.dumps(payload), items=3, dimensions=4, encoding_format="float", trace_id="t-1"
        )
    assert info.value.trace_id == "t-1"
    assert info.value.retryable


def test_base64_vectors_of_unequal_length_are_refused() -> None:
    vectors = np.ones((2, 6), dtype=np.float32)
    payload = orjson.loads(_body(vectors, [0, 1], "base64"))
    short = base64.b64encode(np.ones(5, "<f4").tobytes()).decode()
    longer = base64.b64encode(np.ones(7, "<f4").tobytes()).decode()
    payload["data"][0]["embedding"], payload["data"][1]["embedding"] = short, longer
    with pytest.raises(MalformedResponseError):
        _decoder.decode_body(
            orjson.dumps(payload), items=2, dimensions=None, encoding_format="base64"
        )


def test_invalid_json_is_malformed() -> None:
    with pytest.raises(MalformedResponseError, match="not valid JSON"):
        _decoder.decode_body(b'{"data": [', items=1, dimensions=4, encoding_format="float")


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_rows_in_order_are_the_callers_to_change(encoding: EncodingFormat) -> None:
    vectors = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    body = _body(vectors, [0, 1, 2, 3], encoding)
    rows, _, _ = _decoder.decode_body(
        body,
        items=4,
        dimensions=8,
        encoding_format=encoding,
    )
    np.testing.assert_array_equal(rows, vectors)
    rows[0] = 0.0  # writable, as an array made by the scatter is
    assert rows.flags.c_contiguous


@pytest.mark.parametrize(
    ("value", "refused"),
    [(np.nan, True), (np.inf, True), (-np.inf, True), (3e38, False)],
)
def test_base64_values_must_be_finite_however_large(value: float, refused: bool) -> None:
    vectors = np.full((3, 4), 3e38, dtype=np.float32)  # finite, though their sum is not
    vectors[1, 2] = value
    body = _body(vectors, [0, 1, 2], "base64")

    def decode() -> np.ndarray:
        return _decoder.decode_body(body, items=3, dimensions=4, encoding_format="base64")[0]

    if refused:
        with pytest.raises(MalformedResponseError, match="NaN or infinity"):
            decode()
    else:
        np.testing.assert_array_equal(decode(), vectors)


def _layouts(vectors: np.ndarray) -> dict[str, bytes]:
    """One answer written as different servers write JSON (all of them valid, all the same)."""
    body = _body(vectors, [2, 0, 1], "base64")
    payload = orjson.loads(body)
    spaced = json.dumps(payload).encode()  # ", " and ": " between tokens
    return {
        "compact": body,
        "spaced": spaced,
        "indented": json.dumps(payload, indent=2).encode(),
        "byte-order mark": b"\xef\xbb\xbf" + body,
        "slashes escaped": spaced.replace(b"/", b"\\/"),  # as some encoders write "/"
        "an embedding key elsewhere": body.replace(b'"usage":{', b'"usage":{"embedding":"QUFB",'),
    }


@pytest.mark.parametrize(
    "layout",
    [
        "compact",
        "spaced",
        "indented",
        "byte-order mark",
        "slashes escaped",
        "an embedding key elsewhere",
    ],
)
def test_base64_answers_decode_alike_however_written(layout: str) -> None:
    vectors = np.random.default_rng(3).standard_normal((3, 5)).astype(np.float32)
    vectors[1, 0] = np.float32(-0.0)
    body = _layouts(vectors)[layout]
    assert b"/" in base64.b64encode(vectors.astype("<f4").tobytes()) or layout != "slashes escaped"
    rows, usage, model = _decoder.decode_body(body, items=3, dimensions=5, encoding_format="base64")
    assert rows.tobytes() == vectors.astype("<f4").tobytes()
    assert usage is not None
    assert usage["total_tokens"] == 7
    assert model == "m"


def test_a_plain_base64_answer_is_decoded_without_parsing_its_vectors_text() -> None:
    vectors = np.ones((2, 4), dtype=np.float32)
    assert _decoder._split_base64(_body(vectors, [0, 1], "base64")) is not None
    assert _decoder._split_base64(_body(vectors, [0, 1], "base64").replace(b"/", b"\\/")) is None
    width = _decoder._text_width(4)
    assert width == len(base64.b64encode(vectors[0].tobytes()))
    for known in (None, width, width + 4):  # a wrong width is searched past, not trusted
        split = _decoder._split_base64(_body(vectors, [0, 1], "base64"), known)
        assert split is not None
        assert split[1] == [vectors[0].tobytes(), vectors[1].tobytes()]


@pytest.mark.parametrize(
    ("vector_text", "message"),
    [
        # A second key that JSON reads as "embedding" and that overrides the first: the answer
        # is what a JSON reader makes of it, and "0" is no vector.
        ('"AACAPwAAgD8=","embeddin\\u0067":"0"', "bad embedding values"),
        ('"AACAPwAAgD8=", "embedding" :"0"', "bad embedding values"),
        ('"AACAPwAAgD8"', "bad embedding values"),  # padding missing
        ('"AACAPwAA gD8="', "bad embedding values"),
        ("[1.0, 1.0]", "bad embedding values"),
        ('"AACAPwAAgD8=', "not valid JSON"),
        # A quote where a text of the expected width ends, and another before it.
        ('"AACA","x":"g"', "bad embedding values"),
    ],
)
def test_an_odd_base64_answer_is_judged_as_a_json_reader_reads_it(
    vector_text: str, message: str
) -> None:
    with pytest.raises(MalformedResponseError, match=message):
        _decoder.decode_body(
            _two_ones(vector_text), items=2, dimensions=2, encoding_format="base64"
        )


@pytest.mark.parametrize(
    "vector_text",
    [
        '"AACAPwAA\\u0067D8="',  # a "g" escaped
        '"QUFB","embedding":"AACAPwAAgD8="',  # the last of two keys is the one JSON keeps
        '"QUFB","embeddin\\u0067":"AACAPwAAgD8="',
        '"AACAPwAAgD8=","object":"embedding"',
    ],
)
def test_an_odd_base64_answer_that_a_json_reader_accepts_is_accepted(vector_text: str) -> None:
    rows, _, _ = _decoder.decode_body(
        _two_ones(vector_text), items=2, dimensions=2, encoding_format="base64"
    )
    assert rows.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def _two_ones(first_vector_text: str) -> bytes:
    """An answer of two vectors of two ones, the first one's JSON value as given."""
    good = '"AACAPwAAgD8="'
    return (
        '{"object":"list","model":"m","data":['
        f'{{"object":"embedding","embedding":{first_vector_text},"index":0}},'
        f'{{"object":"embedding","embedding":{good},"index":1}}]}}'
    ).encode()


def test_a_body_that_ends_at_an_embedding_key_is_not_json() -> None:
    with pytest.raises(MalformedResponseError, match="not valid JSON"):
        _decoder.decode_body(
            b'{"data":[{"embedding":', items=1, dimensions=2, encoding_format="base64"
        )


def _find_all(body: bytes, what: bytes) -> list[int]:
    found = [body.find(what)]
    while found[-1] >= 0:
        found.append(body.find(what, found[-1] + 1))
    return found[:-1]


def _spoil(text: bytes, how: str) -> bytes:
    middle = len(text) // 2
    return {
        "bad character": text[:middle] + b"!" + text[middle + 1 :],
        "url-safe character": text[:middle] + b"-" + text[middle + 1 :],
        "padding in the middle": text[:middle] + b"=" + text[middle + 1 :],
        "padding too long": text[:-3] + b"===",
        "padding too short": text[:-2] + b"A=",  # a byte more than the others
        "padding missing": text[:-2],
        "padding spaced": text[:-2] + b" =",
        "a quad longer": text[:-4] + b"AAAA" + text[-4:],
        "a quad shorter": text[4:],
    }[how]


@pytest.mark.parametrize(
    "how",
    [
        "bad character",
        "url-safe character",
        "padding in the middle",
        "padding too long",
        "padding too short",
        "padding missing",
        "padding spaced",
        "a quad longer",
        "a quad shorter",
    ],
)
@pytest.mark.parametrize("which", [0, 2])
def test_a_spoilt_vector_is_refused(how: str, which: int) -> None:
    vectors = np.random.default_rng(4).standard_normal((3, 1024)).astype(np.float32)
    good = _body(vectors, [1, 2, 0], "base64")
    start = [at + len(b'"embedding":"') for at in _find_all(good, b'"embedding":"')][which]
    end = good.index(b'"', start)
    body = good[:start] + _spoil(good[start:end], how) + good[end:]
    np.testing.assert_array_equal(
        _decoder.decode_body(good, items=3, dimensions=1024, encoding_format="base64")[0], vectors
    )
    with pytest.raises(MalformedResponseError, match="bad embedding values"):
        _decoder.decode_body(body, items=3, dimensions=1024, encoding_format="base64")


@pytest.mark.parametrize(
    ("rest", "plain"),
    [
        (b'[{"object":"embedding","embedding":0}]', True),
        (b'[{"embedding":0,"object":"embedding"}]', True),
        (b'[{"embedding":0,"tags":["embedding"]}]', True),
        (b'[{"embedding":0,"tags":["embedding","embedding"]}]', True),
        (b'[{"embedding":0,"object":"embedding" }]', False),  # a value followed by a space
        (b'[{"embedding":0,"embedding" :1}]', False),  # a key the search did not see
        (b'[{"embedding":0},{"embedding":1}]', False),  # two keys, one text found
    ],
)
def test_keys_found_tells_a_plain_structure(rest: bytes, plain: bool) -> None:
    assert _decoder._keys_found(rest, 1) is plain


def _fixed_body(vectors: np.ndarray, order: list[int]) -> tuple[bytes, int]:
    """A compact base64 answer and the width of its texts."""
    return _body(vectors, order, "base64"), _decoder._text_width(vectors.shape[1]) or 0


def test_texts_of_the_expected_width_are_cut_out_by_one_split() -> None:
    vectors = np.random.default_rng(5).standard_normal((3, 7)).astype(np.float32)
    body, width = _fixed_body(vectors, [2, 0, 1])
    split = _decoder._split_fixed(body, width)
    assert split is not None
    payload, chunks = split
    assert chunks == [vectors[i].astype("<f4").tobytes() for i in (2, 0, 1)]
    assert [entry["index"] for entry in payload["data"]] == [2, 0, 1]
    assert payload["usage"]["total_tokens"] == 7
    # JSON's whitespace after the colon, as a spaced or indented writer puts it.
    spaced = json.dumps(orjson.loads(body), indent=1).encode()
    assert _decoder._split_fixed(spaced, width) is not None


def _spoilt_for_the_split(body: bytes, width: int, how: str) -> bytes:
    first = body.index(b'"embedding":"') + len(b'"embedding":"')
    text = body[first : first + width]
    return {
        # An escape in the rest: the split cannot tell what it spells.
        "backslash": body.replace(b'"model":"m"', b'"model":"\\u006d"'),
        # A key the split does not see ("embedding" :), which JSON reads as the vector.
        "key unseen": body.replace(b'"index":0', b'"index":0,"embedding" :"QUFB"'),
        # A text of the full width where no entry's vector is: ordinals out of place.
        "key elsewhere": body.replace(b'"usage":{', b'"usage":{"embedding":"' + text + b'",'),
        # A shorter text whose quote falls where a full one ends: a quote inside the "text".
        "quote inside": body.replace(
            b'"embedding":"' + text + b'"',
            b'"embedding":"' + text[: width - 12] + b'","x":"' + text[-5:] + b'"',
        ),
        "not base64": body.replace(text, text[:-5] + b"!" + text[-4:]),
    }[how]


@pytest.mark.parametrize(
    ("how", "refused"),
    [
        ("backslash", False),
        ("key unseen", True),  # JSON keeps the later key: a vector of 3 bytes
        ("key elsewhere", False),
        ("quote inside", True),
        ("not base64", True),
    ],
)
def test_an_answer_the_split_cannot_explain_is_judged_as_a_json_reader_reads_it(
    how: str, refused: bool
) -> None:
    vectors = np.random.default_rng(6).standard_normal((3, 7)).astype(np.float32)
    body, width = _fixed_body(vectors, [1, 2, 0])
    odd = _spoilt_for_the_split(body, width, how)
    assert odd != body
    assert _decoder._split_fixed(odd, width) is None
    if refused:
        with pytest.raises(MalformedResponseError, match="bad embedding values"):
            _decoder.decode_body(odd, items=3, dimensions=7, encoding_format="base64")
        return
    rows, usage, model = _decoder.decode_body(odd, items=3, dimensions=7, encoding_format="base64")
    np.testing.assert_array_equal(rows, vectors)
    assert usage is not None
    assert usage["total_tokens"] == 7
    assert model == "m"


def test_more_texts_than_ordinals_kept_are_split_alike() -> None:
    count = _decoder._ORDINALS_KEPT + 5
    vectors = np.arange(count * 2, dtype=np.float32).reshape(count, 2)
    body, width = _fixed_body(vectors, list(range(count))[::-1])
    assert _decoder._split_fixed(body, width) is not None
    rows, _, _ = _decoder.decode_body(body, items=count, dimensions=2, encoding_format="base64")
    np.testing.assert_array_equal(rows, vectors)


@pytest.mark.parametrize("where", [None, (0, 0), (63, 1023), (64, 0), (299, 1023)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_looks_at_every_block_of_rows(where: tuple[int, int] | None, bad: float) -> None:
    rows = np.full((300, 1024), 3e38, dtype=np.float32)  # more rows than one block checks
    if where is not None:
        rows[where] = bad
    assert _decoder.all_finite(rows) is (where is None)
    assert _decoder.all_finite(rows[:0]) is True
