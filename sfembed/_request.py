"""User input -> the JSON body of one ``POST /embeddings``, validated before anything is sent.

Every check names the item and the cause, so a caller can tell which of 64 inputs was wrong. A
local image path is read and sent as a base64 data URI, as the provider accepts.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._exceptions import InputError
from ._models import ModelSpec
from ._types import EncodingFormat, InputItem, Truncate, WireRequest

__all__ = ["IMAGE_SUFFIXES", "build_request"]

_PLAIN = frozenset({str})  # exactly str: a subclass goes the long way, as any other item

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")


def build_request(
    input: InputItem | Sequence[InputItem],
    *,
    model: str,
    spec: ModelSpec | None,
    max_items: int,
    encoding_format: EncodingFormat = "float",
    dimensions: int | None = None,
    user: str | None = None,
    truncate: Truncate | None = None,
) -> tuple[WireRequest, int]:
    """Validate and build (body, number of items). ``spec`` is ``None`` for a model we do not know,
    which is then sent as is and left to the server to judge. Raises InputError."""
    items = _as_items(input)
    if len(items) > max_items:
        raise InputError(f"{len(items)} items exceed the batch cap of {max_items}")
    if _PLAIN.issuperset(map(type, items)) and all(items):
        wire = items  # plain non-empty texts, as a job sends them: nothing to convert, checked in C
    else:
        wire = [_wire_item(item, index, spec) for index, item in enumerate(items)]
        _check_homogeneous(wire)
    body = WireRequest(model=model, input=wire, encoding_format=_encoding(encoding_format))
    _add_options(body, spec, dimensions=dimensions, user=user, truncate=truncate)
    return body, len(wire)


def _as_items(input: object) -> list[Any]:
    if isinstance(input, str | dict) or _is_int_list(input):  # one token list is one item
        return [input]
    if not isinstance(input, Sequence) or isinstance(input, bytes):
        raise InputError(f"input must be a string or a list of inputs, not {type(input).__name__}")
    if not input:
        raise InputError("input is empty")
    return list(input)


def _is_int_list(value: object) -> bool:
    # The first item decides for a list of texts, as a job sends: no generator for it.
    return (
        isinstance(value, list)
        and bool(value)
        and type(value[0]) is int
        and all(type(t) is int for t in value)
    )


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and _is_int_list(value) and min(value) >= 0


def _wire_item(item: object, index: int, spec: ModelSpec | None) -> object:
    if isinstance(item, str):
        if not item:
            raise InputError("empty string", item=index)
        return item
    if isinstance(item, list):
        if not _is_token_list(item):
            raise InputError("a token list must be a non-empty list of ids >= 0", item=index)
        return item
    if isinstance(item, dict):
        return _content_object(item, index, spec)
    raise InputError(f"unsupported type {type(item).__name__}", item=index)


def _content_object(item: dict[str, Any], index: int, spec: ModelSpec | None) -> dict[str, str]:
    if spec is not None and not spec.accepts_images:
        kind = "an image" if "image" in item else "a content object"
        raise InputError(f"{kind} sent to text-only model {spec.name}", item=index)
    if set(item) == {"text"} and isinstance(item["text"], str) and item["text"]:
        return {"text": item["text"]}
    if set(item) == {"image"} and isinstance(item["image"], str | Path) and item["image"]:
        return {"image": _image_value(item["image"], index)}
    raise InputError('a content object must be {"text": str} or {"image": str}', item=index)


def _image_value(image: str | Path, index: int) -> str:
    """URLs and base64 pass through; a local file becomes a data URI (the API takes no paths)."""
    text = str(image)
    if text.startswith(("http://", "https://", "data:")):
        return text
    path = Path(image)
    if isinstance(image, Path) or text.lower().endswith(IMAGE_SUFFIXES):
        return _data_uri(path, index)
    return text


def _data_uri(path: Path, index: int) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image {str(path)!r}: {exc.strerror}", item=index) from None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _check_homogeneous(wire: list[object]) -> None:
    kinds = [isinstance(item, list) for item in wire]
    if any(kinds) and not all(kinds):
        odd = kinds.index(not kinds[0])
        raise InputError("token-id lists cannot be mixed with other inputs", item=odd)


def _encoding(encoding_format: str) -> EncodingFormat:
    if encoding_format not in ("float", "base64"):
        raise InputError(f"encoding_format must be 'float' or 'base64', not {encoding_format!r}")
    return "float" if encoding_format == "float" else "base64"


def _add_options(
    body: WireRequest,
    spec: ModelSpec | None,
    *,
    dimensions: int | None,
    user: str | None,
    truncate: Truncate | None,
) -> None:
    if dimensions is not None:
        if type(dimensions) is not int or dimensions <= 0:
            raise InputError(f"dimensions must be a positive int, not {dimensions!r}")
        _check_dimensions(spec, dimensions)
        body["dimensions"] = dimensions
    if user is not None:
        if not isinstance(user, str):
            raise InputError(f"user must be a string, not {type(user).__name__}")
        body["user"] = user
    if truncate is not None:
        if truncate not in ("left", "right"):
            raise InputError(f"truncate must be 'left' or 'right', not {truncate!r}")
        body["truncate"] = truncate


def _check_dimensions(spec: ModelSpec | None, dimensions: int) -> None:
    if spec is None:
        return
    if not spec.accepts_dimensions:
        raise InputError(f"model {spec.name} takes no 'dimensions' (it gives {spec.dimensions[0]})")
    if dimensions not in spec.dimensions:
        allowed = ", ".join(map(str, spec.dimensions))
        raise InputError(f"dimensions {dimensions} not offered by {spec.name} (allowed: {allowed})")
