"""The dry run: what a job would send and cost, counted exactly without sending anything."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._config import Settings
from ._exceptions import ConfigError
from ._models import ModelSpec
from ._packer import Packer
from ._sources import Record, read_records
from ._tokens import counter_for
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


def dry_run(input_path: str | Path, settings: Settings, spec: ModelSpec, price: float) -> DryRun:
    """Count the job's tokens exactly and estimate requests, wall time at the configured limits
    (in seconds) and cost (``price`` per million tokens). Sends nothing."""
    counter = counter_for(spec)
    packer = Packer(max_items=settings.batch.max_items, max_tokens=settings.batch.max_tokens)
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
        for count in counter.count(block):
            tokens, items = _plan(count, spec, settings.long_mode)
            chunk = Chunk(0, 0, 0, "", math.ceil(tokens / items))
            totals[2] += tokens
            totals[3] += items
            totals[4] += sum(1 for _ in packer.add([chunk] * items))
    totals[4] += sum(1 for _ in packer.flush())
    rate = settings.rate
    windows = max(totals[2] / rate.tpm, totals[4] / rate.rpm) / (1 - rate.headroom)
    records, unusable, tokens, items, requests = totals
    cost = tokens / 1e6 * price
    return DryRun(records, unusable, tokens, items, requests, windows * rate.window_s, cost)


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


def price_of(model: str, path: Path) -> float:
    """The price per million tokens of ``model`` in the TOML file at ``path`` (0 when absent)."""
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle).get("prices_per_million_tokens", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"prices file {str(path)!r}: {exc}") from None
    return float(table.get(model, 0.0))
