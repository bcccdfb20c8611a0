"""What the server charges and answers for one item, for a test to compare a client's results
with."""

from __future__ import annotations

from collections.abc import Mapping

from .._models import DEFAULT_CATALOG, ModelCatalog, ModelSpec
from .._types import FloatArray
from .bodies import unit_vector, vector_seed
from .calls import dimensions_for, fit_items, parse_item, parse_options, token_counts

#: One input item as a request carries it: a text, token ids, or a content object.
WireItem = str | list[int] | Mapping[str, object]


def count_tokens(item: WireItem, spec: ModelSpec) -> int:
    """Tokens the server charges for one wire item under ``spec``, special tokens included.

    A text costs one token per CJK/kana/hangul character or other symbol, ceil(n/5) per run of n
    letters and ceil(n/3) per run of n digits; a token-id list its length; an image
    :data:`IMAGE_TOKENS`. Raises ValueError for an item the server would reject.
    """
    return token_counts([parse_item(item, spec)], spec)[0]


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
    size = dimensions_for(dimensions, spec)
    parse_options({"truncate": truncate})
    parsed = [parse_item(item, spec)]
    fitted, _ = fit_items(parsed, token_counts(parsed, spec), spec, truncate)
    return unit_vector(vector_seed(spec.name, size, fitted[0]), size).copy()
