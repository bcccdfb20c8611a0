"""A batch job: an input file through the pipeline into an output file, every record accounted for.

Records stream from the reader into the pipeline; rows come back in input order and go straight
to the writer. Record ids and line numbers wait in a queue only while their rows are in flight
(the pipeline runs a bounded distance ahead), so memory does not grow with the corpus. Every
failure, from the reader or the server, goes to the errors file with its id, line and reason.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

from ._client import EmbeddingClient
from ._config import Settings
from ._exceptions import ConfigError
from ._models import ModelSpec
from ._packer import Packer
from ._pipeline import JobStats, catalog_for, embed_stream
from ._readers import Record, read_records
from ._reorder import EmbeddedBatch
from ._tokens import counter_for
from ._types import Chunk, Unusable
from ._writers import open_writer

__all__ = ["DryRun", "JobSummary", "dry_run", "price_of", "run_job"]

_DRY_BLOCK = 2048  # records counted per tokenizer call in a dry run


@dataclass(slots=True)
class JobSummary:
    """What a finished job did; ``failed`` counts entries written to the errors file."""

    stats: JobStats
    wall_s: float
    rows: int = 0
    failed: int = 0
    errors_path: Path | None = None


@dataclass(slots=True)
class _Ids:
    """(id, line) of records whose rows are still in flight, in input order."""

    pending: deque[tuple[str, int]] = field(default_factory=deque)
    first: int = 0  # input position of pending[0]

    def feed(self, records: Iterator[Record]) -> Iterator[str | dict[str, str] | Unusable]:
        for record in records:
            self.pending.append((record.id, record.line))
            yield record.item if record.item is not None else Unusable(record.error or "unusable")

    def take(self, batch: EmbeddedBatch) -> list[tuple[str, int]]:
        """The (id, line) of each row, dropping records whose last row this batch holds."""
        ids = [self.pending[position - self.first] for position in batch.positions.tolist()]
        self._drop_until(int(batch.positions[-1]) + (0 if batch.chunk_numbers is not None else 1))
        return ids

    def _drop_until(self, position: int) -> None:
        # In chunks mode the last record of a batch may continue in the next: keep it.
        while self.first < position:
            self.pending.popleft()
            self.first += 1


async def run_job(
    input_path: str | Path,
    output_path: str | Path,
    settings: Settings,
    *,
    client: EmbeddingClient,
    errors_path: str | Path | None = None,
    on_batch: Callable[[JobStats], None] | None = None,
) -> JobSummary:
    """Embed every record of ``input_path`` into ``output_path`` in input order.

    Failed records keep their row (NaN) and get a line in ``errors_path`` (default: the output
    path with ``.errors.jsonl``), created only when something failed. Raises ConfigError for bad
    paths or formats, and an APIError that no retry can get past.
    """
    spec = catalog_for(settings, client.catalog)[settings.model]
    records = _records(input_path, settings)
    errors = Path(errors_path) if errors_path else Path(f"{output_path}.errors.jsonl")
    summary = JobSummary(JobStats(), 0.0)
    ids = _Ids()
    dims = spec.output_dimensions(settings.dimensions)
    io = settings.io
    with (
        open_writer(output_path, format=io.output_format, dims=dims, dtype=io.dtype) as writer,
        _ErrorLog(errors) as error_log,
    ):
        async for batch in embed_stream(
            ids.feed(records),
            model=spec.name,
            settings=settings,
            client=client,
            stats=summary.stats,
        ):
            where = ids.take(batch)
            writer.write([record_id for record_id, _ in where], batch)
            summary.failed += error_log.write(batch, where)
            summary.rows += len(batch)
            if on_batch is not None:
                on_batch(summary.stats)
    summary.wall_s = time.monotonic() - summary.stats.started_s
    summary.errors_path = errors if summary.failed else None
    return summary


def _records(input_path: str | Path, settings: Settings) -> Iterator[Record]:
    io = settings.io
    return read_records(
        input_path,
        format=io.input_format,
        id_field=io.id_field,
        text_field=io.text_field,
        image_field=io.image_field,
    )


class _ErrorLog:
    """The errors file: one JSON line per failure, opened on the first one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def __enter__(self) -> _ErrorLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, batch: EmbeddedBatch, where: list[tuple[str, int]]) -> int:
        """Log the failures of this batch; returns how many."""
        rows = {position: row for row, position in enumerate(batch.positions.tolist())}
        for failure in batch.failures:
            record_id, line = where[rows[failure.position]]
            entry: dict[str, object] = {"id": record_id, "line": line, "reason": failure.reason}
            if failure.chunk is not None:
                entry["chunk"] = failure.chunk
            self._out().write(orjson.dumps(entry) + b"\n")
        return len(batch.failures)

    def _out(self) -> IO[bytes]:
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        return self._file


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
    source = _records(input_path, settings)
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
