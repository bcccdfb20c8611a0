"""A batch job: an input file through the pipeline into an output file, every record accounted for.

Records stream from the reader into the pipeline; rows come back in input order and go straight
to the writer. Record ids and line numbers wait in a queue only while their rows are in flight
(the pipeline runs a bounded distance ahead), so memory does not grow with the corpus. Every
failure, from the reader or the server, goes to the errors file with its id, line and reason.

The job's files are checked and locked first (``_jobfiles``). A fresh run writes beside an
earlier run's files and moves its own into place at its first checkpoint that holds an embedded
row; a resumed run goes on in place after the manifest's last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._cache import EmbeddingCache
from ._cachestore import store_files
from ._config import Settings, model_spec
from ._diskthread import DiskThread
from ._engine import job_stream
from ._errorlog import ErrorLog
from ._exceptions import ConfigError
from ._jobfiles import JobFiles, staged_path
from ._limiter import Limiter
from ._manifest import (
    Checkpoint,
    InputIdentity,
    Manifest,
    check_resumable,
    identify_soon,
    load_manifest,
    output_settings,
    save_manifest,
)
from ._sources import Block, Place, Places, Source, find_sources, read_blocks
from ._types import EmbeddedBatch, JobStats, Unusable
from ._writers import Committed, Writer, format_of, open_writer

if TYPE_CHECKING:  # aiohttp loads with the client, apart from the job (see _commands)
    from ._client import EmbeddingClient

log = logging.getLogger("sfembed")

#: The cache's file name in the output's folder, unless ``io.cache_path`` names another.
CACHE_NAME = "sfembed-cache.sqlite"

__all__ = ["CACHE_NAME", "JobSummary", "run_job"]

#: Rows handed to the disk thread at once (1 MiB of float32 rows at 1,024 dims): each hand-over
#: wakes the thread and passes the interpreter's lock between threads, so not one per batch.
GROUP_ROWS = 256

#: A batch to write: ids, rows, places, kept fields, and the counts (rows, records) after it.
_Pending = tuple[
    list[str | None],
    EmbeddedBatch,
    list[tuple[str, int]] | None,
    list[tuple[object, ...]] | None,
    tuple[int, int],
]


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


@dataclass(frozen=True, slots=True)
class _Reporting:
    """Where the run report goes, and the price its cost is figured at."""

    path: Path
    price: float | None
    prices_file: str | None

    def write(self, job: _FileJob, status: str, error: str | None) -> None:
        """Rewrite the report of ``job`` (see ``_report``); ``error`` says why it failed."""
        from ._report import write_report  # a report is asked for: loaded only then

        write_report(self.path, self.made(job, status, error))

    def made(self, job: _FileJob, status: str, error: str | None) -> dict[str, Any]:
        """The report of ``job`` as it stands (see :meth:`write`)."""
        from ._report import run_report

        summary = job.summary
        counts = {
            "records": summary.records,
            "rows": summary.rows,
            "failed": summary.failed,
            "resumed_records": summary.resumed_records,
        }
        where = {
            "model": job.spec.name,
            "input": ", ".join(source.name for source in job.sources),
            "output": str(job.output_path),
        }
        if self.prices_file is not None:
            where["prices"] = self.prices_file
        report = run_report(
            summary.stats,
            job.settings.rate,
            status=status,
            counts=counts,
            reasons=job.reasons,
            wall_s=time.monotonic() - summary.stats.started_s,
            price=self.price,
            where=where,
        )
        if error is not None:
            report["error"] = error
        return report


@dataclass(frozen=True, slots=True)
class _Taken:
    """The places of a batch's rows, column by column."""

    ids: list[str | None]
    lines: list[int]
    sources: list[str]
    kept: list[tuple[object, ...] | None] | None  # None when no field is kept

    def places(self) -> list[Place]:
        """The place of each row."""
        kept = self.kept or itertools.repeat(None)
        columns = zip(self.ids, self.lines, self.sources, kept, strict=False)
        return [Place(*row) for row in columns]

    def picked(self, rows: list[int]) -> _Taken:
        """The places of ``rows`` (indices into these)."""
        kept = [self.kept[row] for row in rows] if self.kept is not None else None
        return _Taken(
            [self.ids[row] for row in rows],
            [self.lines[row] for row in rows],
            [self.sources[row] for row in rows],
            kept,
        )


@dataclass(slots=True)
class _Ids:
    """The places of records whose rows are still in flight, in input order and a block at a
    time (not the records: their texts need not stay alive until their rows are written)."""

    pending: deque[Places] = field(default_factory=deque)
    first: int = 0  # input position of the first record of pending[0]

    def feed(self, blocks: Iterator[Block]) -> Iterator[str | dict[str, str] | Unusable]:
        """The records of ``blocks``, each block's places kept as it is reached: chained in C,
        not a generator's step per record."""
        return itertools.chain.from_iterable(self._inputs(blocks))

    def _inputs(self, blocks: Iterator[Block]) -> Iterator[list[str | dict[str, str] | Unusable]]:
        for block in blocks:
            self.pending.append(block.places)
            yield block.inputs

    def take(self, batch: EmbeddedBatch) -> _Taken:
        """The places of the batch's rows, dropping the records this batch ends (it ends
        records only: see ``_Carry``)."""
        start, end = int(batch.positions[0]), int(batch.positions[-1]) + 1
        spanned = self._spanned(start, end)
        while self.pending and self.first + len(self.pending[0]) <= end:
            self.first += len(self.pending.popleft())
        if batch.chunk_numbers is None and len(batch) == end - start:
            return spanned  # one row for each record from start to end, the usual batch
        return spanned.picked((batch.positions - start).tolist())

    def _spanned(self, start: int, end: int) -> _Taken:
        """The places of the records from ``start`` to ``end`` (input positions)."""
        ids: list[str | None] = []
        lines: list[int] = []
        sources: list[str] = []
        kept: list[tuple[object, ...] | None] = []
        base = self.first
        for places in self.pending:
            low, high = max(start - base, 0), min(end - base, len(places))
            if low < high:
                ids += places.ids[low:high]
                lines += places.lines[low:high]
                sources += [places.source] * (high - low)
                kept += places.kept[low:high] if places.kept is not None else [None] * (high - low)
            base += len(places)
            if base >= end:
                break
        # Whether any record keeps fields, found in C: a generator took a step per record.
        return _Taken(ids, lines, sources, kept if kept.count(None) < len(kept) else None)


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
    input_path: str | Path | Sequence[str | Path],
    output_path: str | Path,
    settings: Settings,
    *,
    client: EmbeddingClient,
    errors_path: str | Path | None = None,
    on_batch: Callable[[JobStats], None] | None = None,
    resume: bool = False,
    restart: bool = False,
    stop: asyncio.Event | None = None,
    limiter: Limiter | None = None,
    report_path: str | Path | None = None,
    price_per_million: float | None = None,
    prices_file: str | None = None,
) -> JobSummary:
    """Embed every record of ``input_path`` into ``output_path`` in input order.

    ``input_path`` is a file, a folder, a glob, ``-`` for standard input, or a list of them (see
    ``find_sources``); several sources are read in sorted path order, and then the errors file
    (and an ``.npy`` output's id sidecar) name each record's source beside its line.

    Failed records keep their row (NaN) and get a line in ``errors_path`` (default: the output
    path with ``.errors.jsonl``), created only when something failed. Progress is checkpointed
    in ``<output>.manifest.json`` every ``io.checkpoint_rows`` rows and when the job ends in any
    way, so that ``resume=True`` continues a job that was killed: records already done are not
    sent again and the output ends byte-identical to an uninterrupted run's. With ``restart``
    as well, an earlier run whose input or settings differ is not refused but started over
    (with the cache, only changed texts are sent): one command serves every night. ``stop``
    ends the job gracefully (see ``embed_stream``), leaving it resumable. ``limiter`` paces the
    requests (default: as ``embed_stream`` chooses). ``report_path`` names a JSON run report
    (see ``_report``), rewritten at every checkpoint and at the end, its cost at
    ``price_per_million`` tokens (read from ``prices_file``).

    An earlier run's files stay as they were until this run's first checkpoint with an
    embedded row. Raises ConfigError for bad or clashing paths, an output another job is
    writing, a resume whose settings or input differ (naming what differs); an APIError that no
    retry can get past; OSError when the disk refuses a write.
    """
    job = _FileJob(input_path, output_path, settings, client, errors_path, limiter)
    if report_path is not None:
        job.reporting(Path(report_path), price_per_million, prices_file)
    return await job.run(resume=resume, restart=restart, stop=stop, on_batch=on_batch)


class _FileJob:
    """One run of ``run_job``: its files and their lock, whether it starts afresh or goes on
    after a checkpoint, its summary and report. A ``_Feed`` embeds the records into the files;
    ``_Checkpoints`` makes them durable and moves a fresh run's into place."""

    def __init__(
        self,
        input_path: str | Path | Sequence[str | Path],
        output_path: str | Path,
        settings: Settings,
        client: EmbeddingClient,
        errors_path: str | Path | None,
        limiter: Limiter | None = None,
    ) -> None:
        self.sources = find_sources(input_path, format=settings.io.input_format)
        self.several = len(self.sources) > 1
        self.settings = settings
        self.client = client
        self.spec = model_spec(settings, client.catalog)
        self.format = _output_format(output_path, settings)
        self.made_folder: Path | None = None  # a database folder this job made, if any
        if self.format == "lance":
            output_path, self.made_folder = _table_path(output_path, settings)
        self.output_path = Path(output_path)
        self.errors = Path(errors_path) if errors_path else Path(f"{output_path}.errors.jsonl")
        self.resumable = self.format != "parquet"  # a Parquet file is whole only once closed
        cache = None
        if settings.io.cache:
            cache = Path(settings.io.cache_path or self.output_path.parent / CACHE_NAME)
        inputs = [source.path for source in self.sources if source.path is not None]
        self.files = JobFiles.of(inputs, output_path, self.format, self.errors, cache)
        self.manifest_path = self.files.manifest
        self.summary = JobSummary(JobStats(window_s=settings.rate.window_s), 0.0)
        self.limiter = limiter
        self.reasons: Counter[str] = Counter()  # failures by reason group, for the report
        self.report: _Reporting | None = None
        self.identity: Future[tuple[InputIdentity, ...]] = Future()  # set as the run starts

    def reporting(self, path: Path, price: float | None, prices_file: str | None) -> None:
        """Write a run report to ``path`` (see ``_report``)."""
        self.report = _Reporting(path, price, prices_file)
        self.files = dataclasses.replace(self.files, report=path)

    async def run(
        self,
        *,
        resume: bool,
        restart: bool,
        stop: asyncio.Event | None,
        on_batch: Callable[[JobStats], None] | None,
    ) -> JobSummary:
        if restart and not all(source.rereadable for source in self.sources):
            resume = False  # a stream read once holds no earlier run to go on with: start over
        try:
            _check_runnable(self, resume=resume, restart=restart)
            self.files.check()  # the inputs were found readable by find_sources
            with self.files.locked():
                self.files.check_report()  # a refusal must not write the report it refused
                try:
                    return await self._run(resume, restart, stop, on_batch)
                except asyncio.CancelledError:
                    with contextlib.suppress(OSError):  # the job's own error comes first
                        self._report("stopped")
                    raise
                except Exception as error:
                    with contextlib.suppress(OSError):
                        self._report("failed", str(error))
                    raise
        except BaseException:
            if self.made_folder is not None:  # the database folder, if the job left it empty
                with contextlib.suppress(OSError):
                    self.made_folder.rmdir()
            raise

    async def _run(
        self,
        resume: bool,
        restart: bool,
        stop: asyncio.Event | None,
        on_batch: Callable[[JobStats], None] | None,
    ) -> JobSummary:
        self.files.finish_swap()  # an earlier run's move into place, cut short by a crash
        earlier = _earlier_run(self.manifest_path, strict=resume and not restart)
        self.files.check_owned(earlier)
        # Hashed beside the job: a fresh run first needs it at its first checkpoint.
        self.identity = identify_soon(self.sources)
        wanted = output_settings(self.settings, self.spec, self.format, self.errors)
        go_on = None
        if resume:
            identity = await asyncio.wrap_future(self.identity)
            go_on = _continued(earlier, identity, wanted, restart=restart, resumable=self.resumable)
        if go_on is None:
            await self._fresh(Manifest((), wanted, Checkpoint()), stop, on_batch)
        else:
            self.files.check_lengths(go_on.checkpoint)  # before any file is cut back
            if go_on.complete:
                summary = self._finished(go_on.checkpoint)
                self._report("complete")
                return summary
            manifest = Manifest((), wanted, go_on.checkpoint)
            await self._embed(manifest, resumed=True, stop=stop, on_batch=on_batch)
        summary = self._finished(None)
        self._report("stopped" if summary.stopped else "complete")
        return summary

    def _report(self, status: str, error: str | None = None) -> None:
        """Rewrite the run report, if one was asked for; ``error`` says why a job failed."""
        if self.report is not None:
            self.report.write(self, status, error)

    def _finished(self, done: Checkpoint | None) -> JobSummary:
        summary = self.summary
        if done is not None:  # complete already: nothing to do
            summary.rows, summary.failed, summary.records = done.rows, done.failed, done.records
            summary.resumed_records = done.records
        summary.wall_s = time.monotonic() - summary.stats.started_s
        summary.errors_path = self.errors if summary.failed else None
        summary.manifest_path = self.manifest_path if self.resumable else None
        return summary

    async def _fresh(
        self,
        manifest: Manifest,
        stop: asyncio.Event | None,
        on_batch: Callable[[JobStats], None] | None,
    ) -> None:
        """A run from the first record, beside the earlier run's files until it swaps them."""
        self.files.remove_staged()  # an earlier fresh run's, cut short before its swap
        swapped = False
        try:
            swapped = await self._embed(manifest, resumed=False, stop=stop, on_batch=on_batch)
        finally:
            if not swapped:
                self.files.remove_staged()

    async def _embed(
        self,
        manifest: Manifest,
        *,
        resumed: bool,
        stop: asyncio.Event | None,
        on_batch: Callable[[JobStats], None] | None,
    ) -> bool:
        """Embed the records after the manifest's checkpoint; True once the files are in
        place (always, for a resumed run)."""
        done = manifest.checkpoint
        summary = self.summary
        summary.rows, summary.failed = done.rows, done.failed
        summary.records = summary.resumed_records = summary.stats.resumed = done.records
        complete = False
        cache_path = self.files.cache
        new_cache = cache_path is not None and _absent(cache_path)
        cache: EmbeddingCache | None = None
        try:
            async with contextlib.AsyncExitStack() as files:
                writer = files.enter_context(self._writer(done if resumed else None))
                errors_at = self.errors if resumed else staged_path(self.errors)
                errors = files.enter_context(
                    ErrorLog(
                        errors_at,
                        done.lengths.get("errors", 0) if resumed else None,
                        reasons=self.reasons,
                    )
                )
                if cache_path is not None:
                    cache = await files.enter_async_context(EmbeddingCache(cache_path))
                # The output's writes and syncs, off the event loop (joined again on leaving).
                disk = files.enter_context(DiskThread())
                if not resumed and self.format == "lance":
                    # A fresh run's table is opened and checked beside its first requests
                    # (lancedb's import alone takes seconds), as the disk thread's first work:
                    # no row reaches it before, and a table of another shape ends the job at
                    # its next batch.
                    disk.put(functools.partial(_open_table, writer))
                feed = _Feed(self, writer, errors, disk, skip=done.records)
                checkpoints = _Checkpoints(self, manifest, feed, swapped=resumed)
                try:
                    await feed.run(checkpoints, cache, stop, on_batch)
                    await disk.drained()  # a failure of the last writes is the job's
                    complete = not summary.stopped
                except _TableRefused as refused:
                    raise _kept_meanwhile(refused, cache) from None
                finally:
                    disk.close()  # every write handed over done, or skipped after one failed
                    feed.settle()
                    if self.resumable:
                        checkpoints.save(complete=complete)
        finally:
            if new_cache and cache_path is not None and (cache is None or not cache.stored):
                _remove_cache(cache_path)  # made by this run (a wrong key, say): it holds nothing
        if not self.resumable and (complete or summary.stopped):
            checkpoints.save(complete=complete)  # the Parquet file is whole now it is closed
        return checkpoints.swapped

    def _writer(self, done: Checkpoint | None) -> Writer:
        """The output: new beside the earlier run's, or (``done``) reopened after its last
        checkpoint."""
        path, ids = self.output_path, self.files.ids
        if done is None and self.format != "lance":  # a table is upserted in place
            path, ids = staged_path(path), staged_path(ids) if ids is not None else None
        return open_writer(
            path,
            format=self.format,
            dims=self.spec.output_dimensions(self.settings.dimensions),
            keep_fields=self.settings.io.keep_fields,
            dtype=self.settings.io.dtype,
            fsync=self.resumable,
            resume=Committed(done.rows, done.lengths) if done is not None else None,
            ids_path=ids,
            open_now=done is not None,  # a resumed run goes on only once its table is checked
        )


class _TableRefused(ConfigError):
    """A fresh run's LanceDB table, opened beside its first requests, was refused."""


def _open_table(writer: Writer) -> None:
    """Open and check a LanceDB table its writer was made without opening. Raises
    _TableRefused (a ConfigError) as ``LanceWriter.open`` raises ConfigError."""
    from ._lance import LanceWriter  # LanceDB output only

    assert isinstance(writer, LanceWriter)
    try:
        writer.open(create=False)  # a table missing is made with the first rows merged
    except ConfigError as error:
        raise _TableRefused(str(error)) from None


def _kept_meanwhile(refused: _TableRefused, cache: EmbeddingCache | None) -> ConfigError:
    """The error of a job whose table was refused after its first requests were answered: the
    vectors received meanwhile are in the cache (a run using it does not pay for them again),
    deliberately kept, and the error says so."""
    if cache is None or not cache.stored:
        return ConfigError(str(refused))
    return ConfigError(
        f"{refused}. The {cache.stored:,} vectors received meanwhile are kept in the cache "
        f"{str(cache.path)!r}: a run using it does not send their texts again"
    )


class _Feed:
    """One pass of a job over its records after the first ``skip``: through the engine into the
    output and the errors file, record by whole record, the summary's counts kept with them.

    The rows are written by ``disk``'s thread (the errors file, rarely written, here), about
    ``GROUP_ROWS`` at a time: the counts are those of the rows taken, and ``settle`` takes them
    back to the rows written when a write failed."""

    def __init__(
        self, job: _FileJob, writer: Writer, errors: ErrorLog, disk: DiskThread, *, skip: int
    ) -> None:
        self.job = job
        self.writer = writer
        self.errors = errors
        self.disk = disk
        self.skip = skip
        self.writing = False  # a batch is half written: the files and the counts disagree
        summary = job.summary
        self.written = (summary.rows, summary.records)  # set by the disk thread
        self.appended = False  # set by the disk thread as it starts its first write
        self.held: list[_Pending] = []  # batches counted, not yet handed over
        self.held_rows = 0

    async def run(
        self,
        checkpoints: _Checkpoints,
        cache: EmbeddingCache | None,
        stop: asyncio.Event | None,
        on_batch: Callable[[JobStats], None] | None,
    ) -> None:
        """Embed the records into the files, a checkpoint every so often (``checkpoints``)."""
        job, summary = self.job, self.job.summary
        ids, carry = _Ids(), _Carry(job.settings.long_mode == "chunks")
        keep = job.format == "lance"
        blocks = _after(_blocks(job.sources, job.settings, keep), self.skip)
        stream = job_stream(
            ids.feed(blocks),
            job.settings,
            job.spec,
            client=job.client,
            stats=summary.stats,
            stop=stop,
            cache=cache,
            limiter=job.limiter,
        )
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                whole = carry.whole(batch)
                if whole is not None:
                    self._write(whole, ids)
                    if self.held_rows >= GROUP_ROWS:
                        self.hand_over()
                    await checkpoints.maybe_save()
                    await self.disk.room()  # the job waits while the disk is behind
                if on_batch is not None:
                    on_batch(summary.stats)
        summary.stopped = stop is not None and stop.is_set()
        rest = None if summary.stopped else carry.rest()  # a stop may cut a record short
        if rest is not None:
            self._write(rest, ids)
        self.hand_over()

    def _write(self, batch: EmbeddedBatch, ids: _Ids) -> None:
        # Until the counts below are updated, the errors file holds more than they say: a
        # checkpoint taken now (by an error's cleanup) would make a resume write these twice.
        self.writing = True
        summary, several, offset = self.job.summary, self.job.several, self.skip
        where = ids.take(batch)
        if batch.failures:
            summary.failed += self.errors.write(batch, where.places(), with_source=several)
        placed = dataclasses.replace(batch, positions=batch.positions + offset) if offset else batch
        places = list(zip(where.sources, where.lines, strict=True)) if several else None
        kept: list[tuple[object, ...]] | None = None
        if self.job.format == "lance":
            kept = [k or () for k in where.kept] if where.kept is not None else [()] * len(batch)
        counts = (summary.rows + len(batch), offset + int(batch.positions[-1]) + 1)
        # Nothing here uses the batch's arrays or lists again: the disk thread reads them alone.
        self.held.append((where.ids, placed, places, kept, counts))
        self.held_rows += len(batch)
        summary.rows, summary.records = counts
        self.writing = False

    def hand_over(self) -> None:
        """Hand the batches held to the disk thread. Raises the error of an earlier write."""
        if self.held:
            self.disk.put(functools.partial(self._append, self.held))
            self.held, self.held_rows = [], 0

    def _append(self, batches: list[_Pending]) -> None:
        """On the disk thread: ``batches`` into the output, in order, and their counts
        (rows, records) as written."""
        self.appended = True
        for ids, batch, places, kept, counts in batches:
            self.writer.write(ids, batch, places=places, kept=kept)
            self.written = counts

    def settle(self) -> None:
        """Once the disk thread is joined: the batches still held (a cancel came first) are
        written here; after a failed write, the counts go back to the rows written."""
        summary = self.job.summary
        if self.held and not self.disk.failed:
            held, self.held, self.held_rows = self.held, [], 0
            self.writing = True
            try:
                self._append(held)
            except BaseException:
                summary.rows, summary.records = self.written
                raise
            self.writing = False
        if self.disk.failed:
            summary.rows, summary.records = self.written


class _Checkpoints:
    """Saves the manifest after the files it describes are durable, every ``checkpoint_rows``.

    During the job a checkpoint is made durable by the disk thread, after the rows handed over
    before it and before those after it; at the job's end (the thread joined) on the caller's.
    A fresh run's first save after an answered request and an embedded row (or at the job's
    end) first moves its files over the earlier run's (``swapped``); until then the earlier
    run's files stand untouched."""

    def __init__(
        self,
        job: _FileJob,
        manifest: Manifest,
        feed: _Feed,
        *,
        swapped: bool,
    ) -> None:
        self.job = job
        self.manifest = manifest
        self.feed = feed
        self.writer = feed.writer
        self.errors = feed.errors
        self.every = job.settings.io.checkpoint_rows
        self.saved_rows = job.summary.rows
        self.swapped = swapped  # set by the disk thread, read once it has moved the files

    async def maybe_save(self) -> None:
        """Hand a save to the disk thread if ``checkpoint_rows`` rows were written since the
        last one and the inputs' identity is known (else at a later batch). The move into place
        is waited for: a first failure after it opens the errors file in place."""
        due = self.job.summary.rows - self.saved_rows >= self.every
        if not (self.job.resumable and due and self.job.identity.done()):
            return
        durable = self._durable(complete=False)
        if durable is not None:
            self.feed.hand_over()  # the rows it counts first
            self.feed.disk.put(durable)
            if not self.swapped:
                await self.feed.disk.drained()

    def save(self, *, complete: bool) -> None:
        """Save now, on this thread (the disk thread is joined or not used)."""
        durable = self._durable(complete=complete)
        if durable is not None:
            durable()

    def _durable(self, *, complete: bool) -> Callable[[], None] | None:
        """The save of the files as the counts stand, or None when there is none to make. The
        errors file is synced here, the rest by the returned call."""
        job, summary = self.job, self.job.summary
        feed = self.feed
        if feed.writing or (feed.disk.failed and feed.appended):
            log.warning("a batch was left half written: the last checkpoint stands")
            return None
        if feed.disk.failed:
            return None  # before any write (a table refused): nothing to vouch for
        if not self.swapped and not complete and not self._proven():
            return None  # nothing embedded yet: the earlier run's files stay as they were
        # At the job's end it may still be hashing a large input: waited for, and its error
        # (an input that can no longer be read) raised, before any file is touched.
        identity = job.identity.result()
        lengths = {"errors": self.errors.commit()}
        checkpoint = Checkpoint(summary.records, summary.rows, summary.failed, lengths)
        manifest = dataclasses.replace(
            self.manifest, input=identity, checkpoint=checkpoint, complete=complete
        )
        report = job.report.made(job, "running", None) if job.report is not None else None
        self.saved_rows = summary.rows
        return functools.partial(self._save, manifest, report)

    def _save(self, manifest: Manifest, report: dict[str, Any] | None) -> None:
        """Output, then the manifest that points into it and the errors file (synced)."""
        job, checkpoint = self.job, manifest.checkpoint
        if job.resumable:
            committed = self.writer.commit()
            lengths = {**committed.lengths, **checkpoint.lengths}
            checkpoint = dataclasses.replace(checkpoint, rows=committed.rows, lengths=lengths)
            manifest = dataclasses.replace(manifest, checkpoint=checkpoint)
        if self.swapped:
            save_manifest(job.manifest_path, manifest)
        else:  # the files move into place with the manifest that describes them
            job.files.swap_in(manifest)
            self.errors.path = job.errors  # a first failure from now on opens it in place
            self.swapped = True
        if job.report is not None and report is not None:
            from ._report import write_report

            write_report(job.report.path, report)

    def _proven(self) -> bool:
        """True once the server has answered a request and a row was embedded: a wrong key, a
        refused setting or a mistyped model would have stopped the job before."""
        summary = self.job.summary
        return summary.stats.requests > 0 and summary.rows > summary.failed


def _earlier_run(path: Path, *, strict: bool) -> Manifest | None:
    """The earlier run's manifest at ``path``. A fresh run passes over one it cannot read
    (``strict`` false): it replaces it at its first checkpoint."""
    try:
        return load_manifest(path)
    except ConfigError:
        if strict:
            raise
        log.warning("%s cannot be read: starting over", path)
        return None


def _continued(
    earlier: Manifest | None,
    identity: tuple[InputIdentity, ...],
    wanted: dict[str, Any],
    *,
    restart: bool,
    resumable: bool,
) -> Manifest | None:
    """The earlier run to go on with, or None to start over. Raises ConfigError naming what
    differs, unless ``restart``."""
    if earlier is None:
        log.info("no manifest: starting from the first record")
        return None
    try:
        if not resumable:
            raise ConfigError("a Parquet file cannot be resumed")
        check_resumable(earlier, wanted, identity)
    except ConfigError as difference:
        if not restart:
            raise
        log.warning("starting over (%s)", difference)
        return None
    return earlier


def _blocks(sources: Sequence[Source], settings: Settings, keep: bool) -> Iterator[Block]:
    """The records of ``sources`` in blocks, with the fields to keep when the output keeps
    them."""
    io = settings.io
    return read_blocks(
        sources,
        id_field=io.id_field,
        text_field=io.text_field,
        image_field=io.image_field,
        keep_fields=io.keep_fields if keep else (),
    )


def _after(blocks: Iterator[Block], skip: int) -> Iterator[Block]:
    """``blocks`` without their first ``skip`` records (done by an earlier run)."""
    for block in blocks:
        if skip >= len(block.inputs):
            skip -= len(block.inputs)
            continue
        yield block.after(skip) if skip else block
        skip = 0


def _table_path(output_path: str | Path, settings: Settings) -> tuple[Path, Path | None]:
    """A LanceDB table's own folder, ``DB/NAME.lance`` (the job's manifest and errors go
    beside), and the database folder ``DB`` if it was made here (else None)."""
    from ._lance import lance_location  # LanceDB output only

    folder, table = lance_location(output_path, settings.io.table or None)
    made = None
    if folder.parent.is_dir() and not os.path.lexists(folder):
        folder.mkdir()  # a new database folder, as LanceDB itself would make
        made = folder
    return folder / f"{table}.lance", made


def _absent(path: Path) -> bool:
    """True when nothing is at ``path``, not even a dangling link (a few microseconds)."""
    return not os.path.lexists(path)


def _remove_cache(path: Path) -> None:
    """Remove the files of the cache at ``path`` (its index, its journal, its vectors)."""
    for name in store_files(path):
        with contextlib.suppress(FileNotFoundError):
            name.unlink()


def _check_runnable(job: _FileJob, *, resume: bool, restart: bool) -> None:
    """Raise ConfigError, before anything is locked or written, for a job that cannot run as
    asked: a resume of what cannot be resumed, a table asked for chunks, a missing folder."""
    if resume and not job.resumable and not restart:
        raise ConfigError("a Parquet file cannot be resumed: use .npy or .jsonl output")
    if resume and not all(source.rereadable for source in job.sources):
        raise ConfigError(
            f"cannot resume: input {job.sources[0].name!r} is read once as it streams (a "
            "pipe or standard input); save it to a file to make the job resumable"
        )
    if job.format == "lance" and job.settings.long_mode == "chunks":
        raise ConfigError("LanceDB output holds one row per record: use --long pool or truncate")
    for role, path in (("output", job.output_path), ("errors file", job.errors)):
        if not path.parent.is_dir():  # found now, not at the first failure hours in
            raise ConfigError(
                f"the {role}'s folder {str(path.parent)!r} is missing or not a folder"
            )


def _output_format(output_path: str | Path, settings: Settings) -> str:
    """The output's format: the one set, else LanceDB when a table is named, else the suffix's.
    Raises ConfigError for a table or kept fields asked of an output that is not a LanceDB table
    (before a database folder is made where a file was meant)."""
    io = settings.io
    named = Path(output_path).suffix.lower() in (".npy", ".jsonl", ".parquet")
    if io.output_format is None and io.table and not named:
        return "lance"
    format = format_of(output_path, io.output_format)
    if format != "lance" and (io.table or io.keep_fields):
        option = "--table (io.table)" if io.table else "--keep-fields (io.keep_fields)"
        raise ConfigError(
            f"{option} is for LanceDB output, and {str(output_path)!r} is {format}: write to "
            "NAME.lance (or a database folder with --table), or leave the option out"
        )
    return format
