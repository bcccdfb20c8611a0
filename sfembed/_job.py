"""A batch job: an input file through the pipeline into an output file, every record accounted for.

Records stream from the reader into the pipeline; rows come back in input order and go straight
to the writer. Record ids and line numbers wait in a queue only while their rows are in flight
(the pipeline runs a bounded distance ahead), so memory does not grow with the corpus. Every
failure, from the reader or the server, goes to the errors file with its id, line and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from ._cache import EmbeddingCache
from ._client import EmbeddingClient
from ._config import Settings
from ._engine import catalog_for, embed_stream
from ._exceptions import ConfigError
from ._limiter import Limiter
from ._manifest import (
    Checkpoint,
    InputIdentity,
    Manifest,
    check_resumable,
    identify,
    load_manifest,
    manifest_path_for,
    output_settings,
    save_manifest,
    sync_folder,
)
from ._models import ModelSpec
from ._packer import Packer
from ._sources import Record, read_records
from ._tokens import counter_for
from ._types import Chunk, EmbeddedBatch, JobStats, Unusable
from ._writers import Committed, Writer, _reopen, format_of, ids_path_for, open_writer

log = logging.getLogger("sfembed")

#: The cache's file name in the output's folder, unless ``io.cache_path`` names another.
CACHE_NAME = "sfembed-cache.sqlite"

__all__ = ["DryRun", "JobSummary", "dry_run", "price_of", "run_job"]

_DRY_BLOCK = 2048  # records counted per tokenizer call in a dry run


@dataclass(slots=True)
class JobSummary:
    """What a job did. ``rows`` and ``failed`` (entries in the errors file) count the whole
    output, a resumed run's earlier part included; ``resumed_records`` is how many records an
    earlier run had done; ``stopped`` is true when a stop ended the job before the input did."""

    stats: JobStats
    wall_s: float
    rows: int = 0
    failed: int = 0
    records: int = 0
    resumed_records: int = 0
    stopped: bool = False
    errors_path: Path | None = None
    manifest_path: Path | None = None


@dataclass(slots=True)
class _Ids:
    """(id, line) of records whose rows are still in flight, in input order."""

    pending: deque[tuple[str | None, int]] = field(default_factory=deque)
    first: int = 0  # input position of pending[0]

    def feed(self, records: Iterator[Record]) -> Iterator[str | dict[str, str] | Unusable]:
        for record in records:
            self.pending.append((record.id, record.line))
            yield record.item if record.item is not None else Unusable(record.error or "unusable")

    def take(self, batch: EmbeddedBatch) -> list[tuple[str | None, int]]:
        """The (id, line) of each row, dropping the records this batch ends (it ends records
        only: see ``_Carry``)."""
        ids = [self.pending[position - self.first] for position in batch.positions.tolist()]
        for _ in range(int(batch.positions[-1]) + 1 - self.first):
            self.pending.popleft()
        self.first = int(batch.positions[-1]) + 1
        return ids


class _Carry:
    """Batches cut at record ends. In ``chunks`` mode a record's rows may straddle two batches:
    its first rows are held back until the rest arrive, so that every write, and so every
    checkpoint, ends at a record boundary."""

    def __init__(self, chunks_mode: bool) -> None:
        self.chunks_mode = chunks_mode
        self.held: EmbeddedBatch | None = None

    def whole(self, batch: EmbeddedBatch) -> EmbeddedBatch | None:
        """The records ``batch`` (after what was held) completes, or None."""
        if not self.chunks_mode:
            return batch
        if self.held is not None:
            batch = _joined(self.held, batch)
        last = batch.positions == batch.positions[-1]
        cut = int(np.argmax(last))  # the first row of the last record, which may go on
        self.held = _rows(batch, cut, len(batch))
        return _rows(batch, 0, cut) if cut else None

    def rest(self) -> EmbeddedBatch | None:
        """What is held, once the stream has ended: its record is whole."""
        held, self.held = self.held, None
        return held


def _rows(batch: EmbeddedBatch, start: int, end: int) -> EmbeddedBatch:
    """Rows [start, end) of a chunks-mode batch, with their failures."""
    positions = batch.positions[start:end]
    numbers = batch.chunk_numbers[start:end] if batch.chunk_numbers is not None else None
    keep = set(
        zip(positions.tolist(), numbers.tolist() if numbers is not None else [], strict=False)
    )
    failures = tuple(f for f in batch.failures if (f.position, f.chunk) in keep)
    spans = batch.spans[start:end] if batch.spans is not None else None
    return EmbeddedBatch(positions, batch.embeddings[start:end], numbers, spans, failures)


def _joined(first: EmbeddedBatch, second: EmbeddedBatch) -> EmbeddedBatch:
    def both(a: Any, b: Any) -> Any:
        return None if a is None or b is None else np.concatenate([a, b])

    return EmbeddedBatch(
        np.concatenate([first.positions, second.positions]),
        np.concatenate([first.embeddings, second.embeddings]),
        both(first.chunk_numbers, second.chunk_numbers),
        both(first.spans, second.spans),
        first.failures + second.failures,
    )


async def run_job(
    input_path: str | Path,
    output_path: str | Path,
    settings: Settings,
    *,
    client: EmbeddingClient,
    errors_path: str | Path | None = None,
    on_batch: Callable[[JobStats], None] | None = None,
    resume: bool = False,
    stop: asyncio.Event | None = None,
    limiter: Limiter | None = None,
) -> JobSummary:
    """Embed every record of ``input_path`` into ``output_path`` in input order.

    Failed records keep their row (NaN) and get a line in ``errors_path`` (default: the output
    path with ``.errors.jsonl``), created only when something failed. Progress is checkpointed
    in ``<output>.manifest.json`` every ``io.checkpoint_rows`` rows and when the job ends in any
    way, so that ``resume=True`` continues a job that was killed: records already done are not
    sent again and the output ends byte-identical to an uninterrupted run's. ``stop`` ends the
    job gracefully (see ``embed_stream``), leaving it resumable. ``limiter`` paces the requests
    (default: as ``embed_stream`` chooses).

    Raises ConfigError for bad paths or formats, or a resume whose settings or input differ from
    the earlier run's (naming what differs); and an APIError that no retry can get past.
    """
    job = _FileJob(input_path, output_path, settings, client, errors_path, limiter)
    return await job.run(resume=resume, stop=stop, on_batch=on_batch)


class _FileJob:
    """One run of ``run_job``: its files, manifest and summary."""

    def __init__(
        self,
        input_path: str | Path,
        output_path: str | Path,
        settings: Settings,
        client: EmbeddingClient,
        errors_path: str | Path | None,
        limiter: Limiter | None = None,
    ) -> None:
        self.input_path = input_path
        self.output_path = output_path
        self.settings = settings
        self.client = client
        self.spec = catalog_for(settings, client.catalog)[settings.model]
        self.errors = Path(errors_path) if errors_path else Path(f"{output_path}.errors.jsonl")
        self.format = format_of(output_path, settings.io.output_format)
        self.manifest_path = manifest_path_for(output_path) if self.format != "parquet" else None
        self.summary = JobSummary(JobStats(), 0.0, errors_path=None)
        self.writing = False  # a batch is half written: the files and the counts disagree
        self.limiter = limiter

    async def run(
        self,
        *,
        resume: bool,
        stop: asyncio.Event | None,
        on_batch: Callable[[JobStats], None] | None,
    ) -> JobSummary:
        if resume and self.manifest_path is None:
            raise ConfigError("a Parquet file cannot be resumed: use .npy or .jsonl output")
        if not self.errors.parent.is_dir():  # found now, not at the first failure hours in
            raise ConfigError(f"the errors file's folder {str(self.errors.parent)!r} is missing")
        identity = await identify(self.input_path)
        wanted = output_settings(self.settings, self.spec, self.format, self.errors)
        earlier = self._earlier(identity, wanted) if resume else None
        done = earlier.checkpoint if earlier is not None else Checkpoint()
        manifest = Manifest(identity, wanted, done)
        if earlier is not None:
            self._check_lengths(done)  # before any file is cut back, so a refusal changes none
            if earlier.complete:
                return self._finished(done)
        else:
            self._forget_earlier_run()
        await self._embed(manifest, earlier is not None, stop, on_batch)
        return self._finished(None)

    def _forget_earlier_run(self) -> None:
        """A run from scratch drops an earlier run's manifest before truncating its files: a
        crash in between must not leave a manifest that vouches for emptied files. A stale
        errors file goes too (one is written only if this run has failures)."""
        if self.manifest_path is not None and self.manifest_path.exists():
            self.manifest_path.unlink()
            sync_folder(self.manifest_path.parent)
        self.errors.unlink(missing_ok=True)

    def _earlier(self, identity: InputIdentity, wanted: dict[str, Any]) -> Manifest | None:
        assert self.manifest_path is not None
        earlier = load_manifest(self.manifest_path)
        if earlier is None:
            log.info("no manifest at %s: starting from the first record", self.manifest_path)
            return None
        check_resumable(earlier, wanted, identity)
        return earlier

    def _finished(self, done: Checkpoint | None) -> JobSummary:
        summary = self.summary
        if done is not None:  # complete already: nothing to do
            summary.rows, summary.failed, summary.records = done.rows, done.failed, done.records
            summary.resumed_records = done.records
        summary.wall_s = time.monotonic() - summary.stats.started_s
        summary.errors_path = self.errors if summary.failed else None
        summary.manifest_path = self.manifest_path
        return summary

    async def _embed(
        self,
        manifest: Manifest,
        resumed: bool,
        stop: asyncio.Event | None,
        on_batch: Callable[[JobStats], None] | None,
    ) -> None:
        done = manifest.checkpoint
        summary = self.summary
        summary.rows, summary.failed = done.rows, done.failed
        summary.records = summary.resumed_records = summary.stats.resumed = done.records
        async with contextlib.AsyncExitStack() as files:
            writer = files.enter_context(self._writer(done if resumed else None))
            errors = files.enter_context(
                _ErrorLog(self.errors, done.lengths.get("errors", 0) if resumed else None)
            )
            cache = None
            if self.settings.io.cache:
                cache = await files.enter_async_context(self._cache())
            checkpoints = _Checkpoints(self, manifest, writer, errors)
            checkpoints.save(complete=False)
            complete = False
            try:
                await self._stream(done.records, writer, errors, checkpoints, cache, stop, on_batch)
                complete = not summary.stopped
            finally:
                checkpoints.save(complete=complete)

    def _check_lengths(self, done: Checkpoint) -> None:
        """Raise ConfigError unless each file holds at least what the checkpoint committed."""
        files = {"output": Path(self.output_path), "errors": self.errors}
        if self.format == "npy":
            files["ids"] = ids_path_for(self.output_path)
        for role, path in files.items():
            committed = done.lengths.get(role, 0)
            size = path.stat().st_size if path.exists() else -1
            if committed and size < committed:
                raise ConfigError(
                    f"cannot resume: {str(path)!r} holds {max(size, 0)} bytes, fewer than the "
                    f"{committed} its checkpoint committed; run again without --resume"
                )

    def _writer(self, done: Checkpoint | None) -> Writer:
        """The output, new or (``done``) reopened after an earlier run's last checkpoint."""
        return open_writer(
            self.output_path,
            format=self.format,
            dims=self.spec.output_dimensions(self.settings.dimensions),
            dtype=self.settings.io.dtype,
            fsync=self.manifest_path is not None,
            resume=Committed(done.rows, done.lengths) if done is not None else None,
        )

    def _cache(self) -> EmbeddingCache:
        """The cache at ``io.cache_path``, or in the output's folder."""
        path = self.settings.io.cache_path
        return EmbeddingCache(path or Path(self.output_path).parent / CACHE_NAME)

    async def _stream(
        self,
        skip: int,
        writer: Writer,
        errors: _ErrorLog,
        checkpoints: _Checkpoints,
        cache: EmbeddingCache | None,
        stop: asyncio.Event | None,
        on_batch: Callable[[JobStats], None] | None,
    ) -> None:
        """Embed the records after the first ``skip`` into ``writer``, record by whole record."""
        summary = self.summary
        ids, carry = _Ids(), _Carry(self.settings.long_mode == "chunks")
        records = itertools.islice(_records(self.input_path, self.settings), skip, None)
        stream = embed_stream(
            ids.feed(records),
            model=self.spec.name,
            settings=self.settings,
            client=self.client,
            stats=summary.stats,
            stop=stop,
            cache=cache,
            limiter=self.limiter,
        )
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                whole = carry.whole(batch)
                if whole is not None:
                    self._write(whole, ids, writer, errors, skip)
                    checkpoints.maybe_save()
                if on_batch is not None:
                    on_batch(summary.stats)
        summary.stopped = stop is not None and stop.is_set()
        rest = None if summary.stopped else carry.rest()  # a stop may cut a record short
        if rest is not None:
            self._write(rest, ids, writer, errors, skip)

    def _write(
        self, batch: EmbeddedBatch, ids: _Ids, writer: Writer, errors: _ErrorLog, offset: int
    ) -> None:
        # Until the counts below are updated, the files hold more than they say: a checkpoint
        # taken now (by an error's cleanup) would make a resume write these rows twice.
        self.writing = True
        where = ids.take(batch)
        self.summary.failed += errors.write(batch, where)
        placed = dataclasses.replace(batch, positions=batch.positions + offset)
        writer.write([record_id for record_id, _ in where], placed)
        self.summary.rows += len(batch)
        self.summary.records = offset + int(batch.positions[-1]) + 1
        self.writing = False


class _Checkpoints:
    """Saves the manifest after the files it describes are durable, every ``checkpoint_rows``."""

    def __init__(self, job: _FileJob, manifest: Manifest, writer: Writer, errors: _ErrorLog):
        self.job = job
        self.manifest = manifest
        self.writer = writer
        self.errors = errors
        self.every = job.settings.io.checkpoint_rows
        self.saved_rows = job.summary.rows

    def maybe_save(self) -> None:
        if self.job.summary.rows - self.saved_rows >= self.every:
            self.save(complete=False)

    def save(self, *, complete: bool) -> None:
        """Errors file, then output, then the manifest that points into both."""
        path = self.job.manifest_path
        if path is None:
            return
        if self.job.writing:
            log.warning("a batch was left half written: the last checkpoint stands")
            return
        errors_length = self.errors.commit()
        committed = self.writer.commit()
        summary = self.job.summary
        lengths = {**committed.lengths, "errors": errors_length}
        checkpoint = Checkpoint(summary.records, committed.rows, summary.failed, lengths)
        save_manifest(
            path, dataclasses.replace(self.manifest, checkpoint=checkpoint, complete=complete)
        )
        self.saved_rows = committed.rows


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
    """The errors file: one JSON line per failure, opened on the first one.

    ``resume_length`` (bytes committed by an earlier run) reopens the file cut back to it; 0
    removes what a crashed run may have left, as nothing of it was committed."""

    def __init__(self, path: Path, resume_length: int | None = None) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        if resume_length:
            self._file = _reopen(path, resume_length)
        elif resume_length == 0:
            path.unlink(missing_ok=True)

    def __enter__(self) -> _ErrorLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, batch: EmbeddedBatch, where: list[tuple[str | None, int]]) -> int:
        """Log the failures of this batch; returns how many."""
        if not batch.failures:
            return 0
        rows = {position: row for row, position in enumerate(batch.positions.tolist())}
        for failure in batch.failures:
            record_id, line = where[rows[failure.position]]
            entry: dict[str, object] = {"id": record_id, "line": line, "reason": failure.reason}
            if failure.chunk is not None:
                entry["chunk"] = failure.chunk
            self._out().write(orjson.dumps(entry) + b"\n")
        return len(batch.failures)

    def commit(self) -> int:
        """Make the entries written so far durable; returns the file's length in bytes."""
        if self._file is None:
            return 0
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

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
