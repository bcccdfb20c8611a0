"""build_request: every input form and option to its wire body; every invalid request refused."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson
import pytest

from sfembed._exceptions import InputError
from sfembed._models import DEFAULT_CATALOG, ModelSpec
from sfembed._request import build_request

BGE = "BAAI/bge-m3"
QWEN = "Qwen/Qwen3-Embedding-0.6B"  # dimensions 64..1024
QWEN_8B = "Qwen/Qwen3-Embedding-8B"
VL = "Qwen/Qwen3-VL-Embedding-8B"
URL = "https://example.com/cat.jpg"
PIXEL = b"\x89PNG\r\n\x1a\n-not-decoded-by-anyone"
SPECS = dict(DEFAULT_CATALOG.items())


def build(input: Any, model: str = BGE, *, max_items: int = 64, **options: Any) -> Any:
    spec = SPECS.get(model)  # None: a model the catalogue does not know
    return build_request(input, model=model, spec=spec, max_items=max_items, **options)


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


# --- input forms ------------------------------------------------------------------------------


def test_a_string_is_one_item_with_float_encoding_and_no_options() -> None:
    body, items = build("hello")
    assert items == 1
    assert body == {"model": BGE, "input": ["hello"], "encoding_format": "float"}


@pytest.mark.parametrize("texts", [["a", "b", "c"], ("a", "b", "c")])
def test_a_sequence_of_strings_keeps_its_order(texts: Any) -> None:
    body, items = build(texts)
    assert items == 3
    assert body["input"] == ["a", "b", "c"]


def test_a_flat_token_list_is_one_item() -> None:
    body, items = build([101, 7592, 102])
    assert items == 1
    assert body["input"] == [[101, 7592, 102]]


def test_a_list_of_token_lists_is_one_item_each() -> None:
    body, items = build([[1, 2], [3], [0, 4, 5]])
    assert items == 3
    assert body["input"] == [[1, 2], [3], [0, 4, 5]]


def test_content_objects_pass_through_for_the_vl_model() -> None:
    bare = base64.b64encode(PIXEL).decode()
    uri = data_uri(PIXEL)
    body, items = build(
        ["plain", {"text": "object"}, {"image": URL}, {"image": uri}, {"image": bare}], VL
    )
    assert items == 5
    assert body["input"] == [
        "plain",
        {"text": "object"},
        {"image": URL},
        {"image": uri},
        {"image": bare},
    ]


def test_a_single_content_object_is_one_item() -> None:
    body, items = build({"text": "alone"}, VL)
    assert (body["input"], items) == ([{"text": "alone"}], 1)


@pytest.mark.parametrize(
    ("name", "mime"),
    [("pic.png", "image/png"), ("PIC.JPG", "image/jpeg"), ("anim.gif", "image/gif")],
)
def test_a_local_image_path_becomes_a_data_uri(tmp_path: Path, name: str, mime: str) -> None:
    path = tmp_path / name
    path.write_bytes(PIXEL)
    for image in (str(path), path):
        body, _ = build([{"image": image}], VL)
        assert body["input"] == [{"image": data_uri(PIXEL, mime)}]


def test_a_path_object_is_read_whatever_its_suffix(tmp_path: Path) -> None:
    path = tmp_path / "scan"
    path.write_bytes(PIXEL)
    body, _ = build({"image": path}, VL)
    assert body["input"][0]["image"].endswith(base64.b64encode(PIXEL).decode())


def test_every_option_lands_in_the_body() -> None:
    body, _ = build(
        "x", QWEN, encoding_format="base64", dimensions=256, user="user_123", truncate="left"
    )
    assert body == {
        "model": QWEN,
        "input": ["x"],
        "encoding_format": "base64",
        "dimensions": 256,
        "user": "user_123",
        "truncate": "left",
    }
    assert orjson.loads(orjson.dumps(body)) == body  # plain JSON, nothing exotic


@pytest.mark.parametrize("dims", [64, 768, 4096])
def test_every_listed_dimension_is_accepted(dims: int) -> None:
    body, _ = build("x", QWEN_8B, dimensions=dims)
    assert body["dimensions"] == dims


def test_the_batch_cap_is_inclusive() -> None:
    _, items = build(["x"] * 8, max_items=8)
    assert items == 8


def test_an_unknown_model_is_sent_as_is_for_the_server_to_judge() -> None:
    body, items = build([{"image": URL}, "t"], "Acme/new-model", dimensions=333)
    assert items == 2
    assert body["model"] == "Acme/new-model"
    assert body["dimensions"] == 333


def test_a_user_spec_lets_its_own_dimensions_through() -> None:
    spec = ModelSpec(
        name="Acme/new-model",
        max_input_tokens=128,
        default_dimensions=96,
        dimensions=(48, 96),
        accepts_dimensions=True,
    )
    body, _ = build_request("x", model=spec.name, spec=spec, max_items=4, dimensions=48)
    assert body["dimensions"] == 48
    with pytest.raises(InputError, match="not offered"):
        build_request("x", model=spec.name, spec=spec, max_items=4, dimensions=64)


# --- refusals ---------------------------------------------------------------------------------

REFUSALS: list[tuple[str, Any, dict[str, Any], str, int | None]] = [
    # (model, input, options, message pattern, item)
    (BGE, "", {}, "empty string", 0),
    (BGE, [], {}, "input is empty", None),
    (BGE, (), {}, "input is empty", None),
    (BGE, ["a", "", "c"], {}, "empty string", 1),
    (BGE, 42, {}, "not int", None),
    (BGE, None, {}, "not NoneType", None),
    (BGE, b"bytes", {}, "not bytes", None),
    (BGE, 1.5, {}, "not float", None),
    (BGE, {"a", "b"}, {}, "not set", None),
    (BGE, ["a", 3.0], {}, "unsupported type float", 1),
    (BGE, ["a", "b", None], {}, "unsupported type NoneType", 2),
    (BGE, [True, False], {}, "unsupported type bool", 0),
    (BGE, [[1, "x"]], {}, "token list", 0),
    (BGE, [[1, 2], []], {}, "token list", 1),
    (BGE, [[1, 2], [-3]], {}, "ids >= 0", 1),
    (BGE, [[1, True]], {}, "token list", 0),
    (BGE, [-1, 2], {}, "ids >= 0", 0),
    (BGE, [[1, 2], "a"], {}, "cannot be mixed", 1),
    (BGE, ["a", "b", [1, 2]], {}, "cannot be mixed", 2),
    (BGE, {"image": URL}, {}, "an image sent to text-only model BAAI/bge-m3", 0),
    (BGE, ["a", {"text": "b"}], {}, "a content object sent to text-only", 1),
    (QWEN, [{"image": URL}], {}, "text-only model", 0),
    (VL, {"text": ""}, {}, "content object must be", 0),
    (VL, {"image": ""}, {}, "content object must be", 0),
    (VL, {"image": 7}, {}, "content object must be", 0),
    (VL, {"text": "a", "image": URL}, {}, "content object must be", 0),
    (VL, ["ok", {"video": URL}], {}, "content object must be", 1),
    (VL, ["ok", "ok", {"image": "/no/such/dir/pic.png"}], {}, "cannot read image", 2),
    (VL, {"image": Path("/no/such/dir/scan")}, {}, "cannot read image", 0),
    (BGE, "x", {"dimensions": 1024}, "takes no 'dimensions'", None),
    (QWEN, "x", {"dimensions": 100}, "not offered", None),
    (QWEN, "x", {"dimensions": 2048}, "not offered", None),
    (QWEN, "x", {"dimensions": 1024.0}, "positive int", None),
    (QWEN, "x", {"dimensions": True}, "positive int", None),
    (QWEN, "x", {"dimensions": "64"}, "positive int", None),
    ("Acme/new-model", "x", {"dimensions": -64}, "positive int", None),
    (BGE, "x", {"encoding_format": "binary"}, "encoding_format", None),
    (BGE, "x", {"encoding_format": None}, "encoding_format", None),
    (BGE, "x", {"truncate": "middle"}, "truncate", None),
    (BGE, "x", {"truncate": "LEFT"}, "truncate", None),
    (BGE, "x", {"user": 5}, "user must be a string", None),
    (BGE, ["x"] * 65, {}, "65 items exceed the batch cap of 64", None),
]


@pytest.mark.parametrize(("model", "input", "options", "message", "item"), REFUSALS)
def test_invalid_requests_are_refused_naming_the_item(
    model: str, input: Any, options: dict[str, Any], message: str, item: int | None
) -> None:
    with pytest.raises(InputError, match=message) as info:
        build(input, model, **options)
    assert info.value.item == item
    if item is not None:
        assert str(info.value).startswith(f"input item {item}: ")
    assert not info.value.retryable


def test_a_missing_image_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "gone.png"
    with pytest.raises(InputError) as info:
        build({"image": str(missing)}, VL)
    assert str(missing) in str(info.value)
    assert info.value.__cause__ is None


def test_a_custom_batch_cap_is_enforced() -> None:
    with pytest.raises(InputError, match="3 items exceed the batch cap of 2"):
        build(["a", "b", "c"], max_items=2)
