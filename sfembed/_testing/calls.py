"""A request body read as the provider reads it: its items (texts, token ids, images), their
token counts and truncation, and the options; an invalid one raises :class:`Reject`."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from .._models import ModelCatalog, ModelSpec
from .errors import NO_MODEL, Reject, batch_too_large
from .settings import IMAGE_TOKENS, ServerConfig
from .tokenizer import pieces, text_tokens

_MAX_TOKEN_ID = 2**31


# An image is a URL, a data URI or bare base64 (whole 4-character groups); it is never fetched.
_IMAGE = re.compile(
    r"https?://\S+"
    r"|data:image/[\w.+-]+;base64,[A-Za-z0-9+/=\s]+"
    r"|(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class Item:
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


def parse_item(value: object, spec: ModelSpec) -> Item:
    if isinstance(value, str):
        if value:
            return Item("text", value)
        raise Reject("empty string item")
    if isinstance(value, list):
        if value and all(map(_is_token_id, value)):
            return Item("ids", ids=value)
        raise Reject("a token list must be a non-empty list of token ids")
    if isinstance(value, Mapping):
        return _content_object(value, spec)
    raise Reject(f"unsupported item type {type(value).__name__}")


def _content_object(value: Mapping[Any, Any], spec: ModelSpec) -> Item:
    if not spec.accepts_images:
        raise Reject(f"{spec.name} takes no content objects")
    text, image = value.get("text"), value.get("image")
    if len(value) == 1 and isinstance(text, str) and text:
        return Item("text", text)
    if len(value) == 1 and isinstance(image, str) and _IMAGE.fullmatch(image):
        return Item("image", image)
    raise Reject('a content object must be {"text": str} or {"image": url or base64}')


def _input_items(value: object, spec: ModelSpec, max_items: int) -> list[Item]:
    if isinstance(value, str | dict):
        raw: list[Any] = [value]
    elif isinstance(value, list) and value:
        raw = [value] if all(map(_is_token_id, value)) else value  # one token list is one item
    else:
        raise Reject("input must be a string, a content object or a non-empty list")
    if len(raw) > max_items:
        raise batch_too_large(len(raw), max_items)
    items = [parse_item(entry, spec) for entry in raw]
    if len({item.kind == "ids" for item in items}) > 1:
        raise Reject("token-id lists cannot be mixed with other items")
    return items


def token_counts(items: list[Item], spec: ModelSpec) -> list[int]:
    """Tokens of each item as the server charges them, special tokens included."""
    counts = [IMAGE_TOKENS if item.kind == "image" else len(item.ids) for item in items]
    texts = [index for index, item in enumerate(items) if item.kind == "text"]
    if texts:
        for index, count in zip(texts, text_tokens([items[i].text for i in texts]), strict=True):
            counts[index] = count
    return [count + spec.special_tokens for count in counts]


def _cut(item: Item, keep: int, side: str) -> Item:
    """``item`` cut to its first (``right``) or last (``left``) ``keep`` tokens."""
    if item.kind == "ids":
        return Item("ids", ids=item.ids[:keep] if side == "right" else item.ids[-keep:])
    begin, end = pieces(item.text)
    first, last = (0, keep - 1) if side == "right" else (begin.size - keep, begin.size - 1)
    return Item("text", item.text[int(begin[first]) : int(end[last])])


def fit_items(
    items: list[Item], counts: list[int], spec: ModelSpec, truncate: str | None
) -> tuple[list[Item], list[int]]:
    """Items within ``spec.max_input_tokens``: over-long ones cut, or a 20015 without truncate."""
    limit = spec.max_input_tokens
    if max(counts) <= limit:
        return items, counts
    keep = limit - spec.special_tokens
    if truncate is None or keep < 1:
        raise Reject(f"an item is over the {limit}-token limit of {spec.name}")
    if any(n > limit and item.kind == "image" for item, n in zip(items, counts, strict=True)):
        raise Reject("an image is over the token limit")
    fitted = [
        _cut(item, keep, truncate) if n > limit else item
        for item, n in zip(items, counts, strict=True)
    ]
    return fitted, [min(n, limit) for n in counts]


@dataclass(frozen=True, slots=True)
class Call:
    """A valid request: what to embed and how to answer."""

    model: str
    items: list[Item]
    tokens: int
    dimensions: int
    base64: bool


def _load(raw: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Reject("body is not JSON") from None
    if not isinstance(payload, dict):
        raise Reject("body is not a JSON object")
    return payload


def _spec(model: object, catalog: ModelCatalog) -> ModelSpec:
    if not isinstance(model, str):
        raise Reject("model must be a string")
    if model not in catalog:
        raise Reject(f"unknown model {model!r}", 400, NO_MODEL)
    return catalog[model]


def dimensions_for(value: object, spec: ModelSpec) -> int:
    if value is None:
        return spec.default_dimensions
    if type(value) is not int or not spec.accepts_dimensions or value not in spec.dimensions:
        raise Reject(f"dimensions {value!r} not offered by {spec.name}")
    return value


def parse_options(payload: dict[str, Any]) -> tuple[bool, str | None]:
    """(base64 wanted, truncate side) from the body's options."""
    encoding = payload.get("encoding_format") or "float"
    truncate = payload.get("truncate")
    if encoding not in ("float", "base64") or truncate not in (None, "left", "right"):
        raise Reject("encoding_format must be float|base64 and truncate left|right")
    if not isinstance(payload.get("user", ""), str):
        raise Reject("user must be a string")
    return encoding == "base64", truncate


def parse_call(raw: bytes, config: ServerConfig) -> Call:
    """Validate a request body as the provider does. Raises Reject."""
    payload = _load(raw)
    spec = _spec(payload.get("model"), config.catalog)
    items = _input_items(payload.get("input"), spec, config.max_batch_items)
    dimensions = dimensions_for(payload.get("dimensions"), spec)
    base64, truncate = parse_options(payload)
    items, counts = fit_items(items, token_counts(items, spec), spec, truncate)
    tokens = sum(counts)
    if config.token_factor != 1.0:
        tokens = math.ceil(tokens * config.token_factor)
    return Call(spec.name, items, tokens, dimensions, base64)


def batch_size(raw: bytes) -> int:
    """How many items a body holds, as far as it can be read (for a scripted 413)."""
    try:
        value = orjson.loads(raw).get("input")
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    if isinstance(value, list) and not all(map(_is_token_id, value)):
        return len(value)
    return 1
