"""The dry run: what a job would send and cost, counted exactly without sending anything."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._bounds import may_exceed
from ._config import Settings
from ._estimator import CharClassEstimator
from ._exceptions import ConfigError
from ._models import ModelSpec
from ._packer import packer_for
from ._sources import Record, read_records
from ._tokenizers import FAMILIES, counter_for
from ._types import Chunk

__all__ = ["DryRun", "dry_run", "price_of"]

_DRY_BLOCK = 2048  # records counted per tokenizer call in a dry run


@dataclass(frozen=True, slots=True)
class DryRun:
    """What a job would cost, counted exactly without sending anything."""

    records: int
    unusable: int
    tokens: int
    items: int
    requests: int
    wall_s: float
    cost: float


def dry_run(
    input_path: str | Path | Sequence[str | Path], settings: Settings, spec: ModelSpec, price: float
) -> DryRun:
    """Count the job's tokens exactly and estimate requests, wall time at the configured limits
    (in seconds) and cost (``price`` per million tokens). Sends nothing.

    Requests are packed as the job packs them: the same packer, fed the same estimated counts
    (``tokens`` of each item); a record over the limit is taken as equal pieces."""
    counter = counter_for(spec)
    estimator = CharClassEstimator(spec.special_tokens, family=FAMILIES.get(spec.tokenizer or ""))
    packer = packer_for(settings, spec)
    truncating = settings.long_mode == "truncate"
    totals = [0, 0, 0, 0, 0]  # records, unusable, tokens, items, requests
    io = settings.io
    source = read_records(
        input_path,
        format=io.input_format,
        id_field=io.id_field,
        text_field=io.text_field,
        image_field=io.image_field,
    )
    for block in _blocks_of(source, totals):
        exact = counter.count(block)
        estimated = estimator.count(block)
        for text, count, guess in zip(block, exact, estimated, strict=True):
            tokens, items = _plan(count, spec, settings.long_mode)
            totals[2] += tokens
            totals[3] += items
            # Intake knows the exact count only of a text that can really be over the limit.
            known = truncating is False and may_exceed(text, guess, spec)
            chunks = _items(count, guess, items, spec, known)
            totals[4] += sum(1 for _ in packer.add(chunks))
    totals[4] += sum(1 for _ in packer.flush())
    rate = settings.rate
    windows = max(totals[2] / rate.tpm, totals[4] / rate.rpm) / (1 - rate.headroom)
    records, unusable, tokens, items, requests = totals
    cost = tokens / 1e6 * price
    return DryRun(records, unusable, tokens, items, requests, windows * rate.window_s, cost)


def _items(count: int, guess: int, items: int, spec: ModelSpec, exact: bool) -> list[Chunk]:
    """The chunks a text of ``count`` exact (``guess`` estimated) tokens goes as, for packing:
    whole, with its estimate capped at the limit as intake caps it (and its exact count where
    intake knows it: ``exact``), or cut as the chunker cuts: full pieces, then the rest."""
    if items == 1:
        return [Chunk(0, 0, 0, "", min(guess, spec.max_input_tokens), weight=count * exact)]
    full = spec.max_input_tokens
    sizes = [full] * (items - 1)
    sizes.append(max(1, count - (items - 1) * (full - spec.special_tokens)))
    return [Chunk(0, 0, 0, "", math.ceil(guess * n / count), weight=n) for n in sizes]


def _blocks_of(records: Iterator[Record], totals: list[int]) -> Iterator[list[str]]:
    """Texts in blocks for the tokenizer; counts records and unusable ones into ``totals``."""
    block: list[str] = []
    for record in records:
        totals[0] += 1
        if isinstance(record.item, str):
            block.append(record.item)
        totals[1] += record.item is None
        if len(block) == _DRY_BLOCK:
            yield block
            block = []
    if block:
        yield block


def _plan(count: int, spec: ModelSpec, long_mode: str) -> tuple[int, int]:
    """(tokens sent, items) for a text of ``count`` tokens, split or truncated as a job would."""
    if long_mode == "truncate":
        return min(count, spec.max_input_tokens), 1
    limit = spec.max_input_tokens - spec.special_tokens
    parts = max(1, math.ceil((count - spec.special_tokens) / limit))
    return count + (parts - 1) * spec.special_tokens, parts


_PRICES = "prices_per_million_tokens"


def price_of(model: str, path: Path) -> float:
    """The price per million tokens of ``model`` in the TOML file at ``path`` (0 when absent)."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"prices file {str(path)!r}: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8: a file saved in another encoding
        raise ConfigError(
            f"prices file {str(path)!r}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    unknown = sorted(set(document) - {_PRICES})  # a mistyped table would price every model 0
    if unknown:
        raise ConfigError(
            f"prices file {str(path)!r}: unknown key(s) {', '.join(unknown)}; known: {_PRICES}"
        )
    table = document.get(_PRICES, {})
    if not isinstance(table, dict):
        raise ConfigError(f"prices file {str(path)!r}: prices_per_million_tokens must be a table")
    price = table.get(model, 0.0)
    if not isinstance(price, int | float) or isinstance(price, bool) or not 0 <= price < math.inf:
        raise ConfigError(
            f"prices file {str(path)!r}: prices_per_million_tokens.{model!r} = {price!r} is "
            "not allowed: a finite number 0 or more"
        )
    return float(price)
