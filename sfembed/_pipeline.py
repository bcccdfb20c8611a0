"""The engine: inputs -> counted, split, packed requests -> paced, retried sends -> ordered rows.

Stages run as tasks of one TaskGroup joined by bounded queues:

    intake (count tokens in blocks, split over-long records, pack)  --requests-->
    senders x concurrency (limiter, client, retries, isolation)     --rows-->
    reorder buffer (bounded ring)                                   --batches--> caller

No task ever lets an exception escape into the group: a fatal error travels to the caller through
the output queue, so a failure never cancels the caller's own task behind its back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Coroutine,
    Iterable,
    Sequence,
    Sized,
)
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, cast

import numpy as np

from . import _exceptions as exc
from ._cache import EmbeddingCache, normalise, scope
from ._chunker import char_range, drop_blank, split_spans
from ._client import EmbeddingClient
from ._config import Settings, load_settings
from ._limiter import Limiter, RateLimiter
from ._models import DEFAULT_CATALOG, ModelCatalog, ModelSpec
from ._packer import Packer, bisect
from ._quota import SharedLimiter
from ._reorder import EmbeddedBatch, Failure, ReorderBuffer
from ._retry import (
    FailureStreak,
    call_with_retries,
    honoured_wait_s,
    request_wide,
    stopping_error,
)
from ._tokens import (
    FAMILIES,
    Calibration,
    CharClassEstimator,
    TokenCounter,
    count_async,
    counter_for,
    upper_bound,
)
from ._types import Chunk, EmbeddingResult, FloatArray, InputItem, Ticket, Unusable

__all__ = [
    "JobStats",
    "catalog_for",
    "client_for",
    "embed",
    "embed_stream",
    "shared_limiter_for",
]

log = logging.getLogger("sfembed")

_BLOCK = 512  # records counted per tokenizer call: large enough to amortise, small to stream
_IMAGE_TOKENS = 1024  # charged for an image before the server's count corrects it


class _Stopped(Exception):
    """A request not started because the job was told to stop."""


_FATAL = (
    exc.AuthenticationError,
    exc.PermissionDeniedError,
    exc.NotFoundError,
    exc.ModelNotFoundError,
)
Input = str | dict[str, str] | Unusable
Offsets = Sequence[tuple[int, int]]


@dataclass(slots=True)
class JobStats:
    """Live counters of a job, read by progress hooks and the summary. Tokens are the server's."""

    records: int = 0
    chunks: int = 0
    rows: int = 0
    requests: int = 0
    tokens: int = 0
    rate_limited: int = 0
    retries: int = 0
    resumed: int = 0  # records an earlier run of the job had done (progress counts from there)
    cached: int = 0  # items answered by the cache, not sent
    deduplicated: int = 0  # items that repeated one already on its way, not sent again
    in_flight: int = 0
    pace_tokens_per_s: float = 0.0  # the limiter's current pace, for an ETA
    pace_requests_per_s: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    started_s: float = field(default_factory=time.monotonic)


async def embed(
    inputs: Iterable[Input] | AsyncIterable[Input],
    *,
    model: str,
    settings: Settings | None = None,
    client: EmbeddingClient | None = None,
    stats: JobStats | None = None,
    errors: str = "raise",
    **options: Any,
) -> FloatArray:
    """Embed ``inputs`` and return one float32 row per input (per chunk in ``chunks`` mode).

    A bare ``str`` (or content object) is one input: ``embed("hello")`` gives one row.

    ``options`` override ``settings`` fields (``encoding_format``, ``dimensions``, ``long_mode``,
    ``concurrency``, ``rate``, ...). With ``errors="raise"`` (default) an input that could not be
    embedded raises JobError listing every failure; with ``errors="nan"`` its row is NaN.
    Raises ConfigError, or an APIError that no retry can get past (a wrong key, say).
    """
    inputs = _as_inputs(inputs)
    job_stats = stats if stats is not None else JobStats()
    rows = _Rows(len(inputs) if isinstance(inputs, Sized) else None)
    async for batch in embed_stream(
        inputs, model=model, settings=settings, client=client, stats=job_stats, **options
    ):
        rows.add(batch.embeddings)
    if job_stats.failures and errors == "raise":
        raise exc.JobError(job_stats.failures)
    if rows.filled == 0:  # no input: still the model's width, so results stack with others
        job_settings = settings or load_settings()
        spec = catalog_for(job_settings, client.catalog if client else DEFAULT_CATALOG)[model]
        dims = spec.output_dimensions(options.get("dimensions", job_settings.dimensions))
        return np.empty((0, dims), dtype=np.float32)
    return rows.result()


class _Rows:
    """The rows of ``embed``: written straight into one array when the count is known (no second
    copy of a result that can be gigabytes), else gathered and joined at the end."""

    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.filled = 0
        self.array: FloatArray | None = None
        self.parts: list[FloatArray] = []

    def add(self, rows: FloatArray) -> None:
        end = self.filled + len(rows)
        if self.array is None and not self.parts and self.expected is not None:
            self.array = np.empty((self.expected, rows.shape[1]), dtype=np.float32)
        if self.array is not None and end > len(self.array):  # chunks mode: more rows than inputs
            self.parts.append(self.array[: self.filled])
            self.array = None
        if self.array is not None:
            self.array[self.filled : end] = rows
        else:
            self.parts.append(rows)
        self.filled = end

    def result(self) -> FloatArray:
        if self.array is not None:
            return self.array[: self.filled]
        if self.parts:
            return np.concatenate(self.parts)
        return np.empty((0, 0), dtype=np.float32)


async def embed_stream(
    inputs: Iterable[Input] | AsyncIterable[Input],
    *,
    model: str,
    settings: Settings | None = None,
    client: EmbeddingClient | None = None,
    stats: JobStats | None = None,
    limiter: Limiter | None = None,
    stop: asyncio.Event | None = None,
    cache: EmbeddingCache | None = None,
    **options: Any,
) -> AsyncGenerator[EmbeddedBatch, None]:
    """Yield consecutive batches of rows in input order as they are ready.

    Failed inputs keep their place as NaN rows and are listed in ``stats.failures``. Close the
    iterator (``contextlib.aclosing``) when leaving it early. Setting ``stop`` ends the stream
    gracefully: no more input is read and no more requests start, requests in flight are awaited,
    and the stream ends after the last row that has every row before it (a shorter output, never
    a gap). With a ``cache``, texts it holds are not sent, a text repeated within the job is
    sent once, and every vector received is stored in it. ``limiter`` paces the requests (any
    :class:`Limiter`); without one, the quota shared through Redis at ``settings.quota`` if set
    (:class:`SharedLimiter`), else a local :class:`RateLimiter`. Raises as :func:`embed`.
    """
    inputs = _as_inputs(inputs)
    job_settings = dataclasses.replace(settings or load_settings(), model=model, **options)
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(client_for(job_settings))
        if limiter is None and job_settings.quota:
            limiter = await stack.enter_async_context(shared_limiter_for(job_settings))
        job = _Job(job_settings, client, stats or JobStats(), limiter, stop, cache)
        # Closed with us, so its stages stop before we return (not later, from a GC finaliser).
        batches = await stack.enter_async_context(contextlib.aclosing(job.run(inputs)))
        async for batch in batches:
            yield batch


def _as_inputs(
    inputs: Iterable[Input] | AsyncIterable[Input],
) -> Iterable[Input] | AsyncIterable[Input]:
    """A bare text or content object is one input, not a sequence of characters or keys."""
    if isinstance(inputs, str | dict):
        return [inputs]
    if isinstance(inputs, bytes | bytearray | memoryview):
        raise TypeError("inputs must be texts (str), not bytes: decode them first")
    return inputs


def client_for(settings: Settings) -> EmbeddingClient:
    """A client as the settings describe it (key, URL, timeouts, catalogue, caps); not opened."""
    return EmbeddingClient(
        api_key_env=settings.api_key_env,
        base_url=settings.base_url,
        allow_insecure_http=settings.allow_insecure_http,
        timeouts=settings.timeouts,
        catalog=catalog_for(settings),
        max_batch_items=settings.batch.max_items,
        max_connections=settings.concurrency,
    )


def shared_limiter_for(settings: Settings) -> SharedLimiter:
    """The shared quota at ``settings.quota`` for the settings' model and account; not opened.
    Raises ConfigError without redis-py or for a bad URL."""
    return SharedLimiter(
        settings.quota, settings.rate, model=settings.model, account=settings.quota_account
    )


def catalog_for(settings: Settings, base: ModelCatalog = DEFAULT_CATALOG) -> ModelCatalog:
    """``base`` extended by the settings' ``[models]`` table."""
    return base.with_table(settings.models) if settings.models else base


class _Job:
    """One run over one input stream; owns the limiter, packer, reorder buffer and counters."""

    def __init__(
        self,
        settings: Settings,
        client: EmbeddingClient,
        stats: JobStats,
        limiter: Limiter | None,
        stop: asyncio.Event | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self._waiting: dict[bytes, list[Chunk]] = {}  # key -> repeats of a text on its way
        self.spec: ModelSpec = catalog_for(settings, client.catalog)[settings.model]
        self.client = client
        self._cache_scope = scope(self.spec.name, client.endpoint)  # whose vectors these are
        self.stats = stats
        self.limiter: Limiter = limiter or RateLimiter(settings.rate)
        # Charges are always priced by the estimator, so one calibration against the server's
        # usage holds for every request; exact counts decide only where texts are cut.
        family = FAMILIES.get(self.spec.tokenizer or "")
        self.estimator = CharClassEstimator(self.spec.special_tokens, family=family)
        self.calibration = Calibration(exact=False)
        self._exact: TokenCounter | None = None
        self.packer = Packer(
            max_items=settings.batch.max_items,
            max_tokens=self._request_tokens(),
            alone_over=self.spec.max_input_tokens // 2,  # what _narrow would halve
        )
        self.chunks_mode = settings.long_mode == "chunks"
        self.reorder = ReorderBuffer(
            dims=self.spec.output_dimensions(settings.dimensions),
            capacity=max(1024, 4 * settings.concurrency * settings.batch.max_items),
            with_chunks=self.chunks_mode,
        )
        self.requests: asyncio.Queue[list[Chunk] | None] = asyncio.Queue(settings.concurrency)
        self.output: asyncio.Queue[EmbeddedBatch | BaseException | None] = asyncio.Queue(8)
        self.stop = stop
        self._stopping = False
        self._sending: set[asyncio.Task[Any] | None] = set()  # senders with a request out
        self._settled_in_intake = False  # rows failed or cached by intake, not yet released
        self._calibrated = asyncio.Event()
        self._release_lock = asyncio.Lock()
        self._probing = False
        self._usage_missing = False  # warned once that answers lack a usable usage
        self._streak = FailureStreak()  # the same error for every request stops the job

    def _request_tokens(self) -> int:
        # A request far above the per-second pace would make the limiter lurch; 1/32 of
        # the window's quota keeps the flow smooth and still fills requests at usual limits.
        quota = self.settings.rate.tpm * (1 - self.settings.rate.headroom)
        cap = min(self.settings.batch.max_tokens, int(quota / 32))
        return max(cap, self.spec.max_input_tokens)

    async def run(
        self, inputs: Iterable[Input] | AsyncIterable[Input]
    ) -> AsyncGenerator[EmbeddedBatch, None]:
        """Batches in order; the stages stop when the caller stops reading. Raises the first
        fatal error of any stage, unwrapped."""
        error: BaseException | None = None
        async with asyncio.TaskGroup() as group:
            intake = group.create_task(self._guard(self._intake(inputs)))
            senders = [
                group.create_task(self._guard(self._sender()))
                for _ in range(self.settings.concurrency)
            ]
            stages = [intake, *senders, group.create_task(self._finish(senders))]
            if self.stop is not None:
                stages.append(group.create_task(self._watch(self.stop, intake, senders)))
            try:
                while (item := await self.output.get()) is not None:
                    if isinstance(item, BaseException):
                        error = item
                        break
                    try:
                        yield item
                    except GeneratorExit:
                        break  # the caller closed us: cancel the stages and end quietly
            finally:
                for stage in stages:
                    stage.cancel()
        if error is not None:
            raise error

    async def _finish(self, senders: list[asyncio.Task[None]]) -> None:
        """Once every sender is done (or was stopped), hand over the last rows and end."""
        await asyncio.wait(senders)
        await self._release()
        await self.output.put(None)

    async def _watch(
        self, stop: asyncio.Event, intake: asyncio.Task[None], senders: list[asyncio.Task[None]]
    ) -> None:
        """On ``stop``: read no more input and start no more requests. Requests in flight are
        answered and their rows handed over; the stream then ends after the last contiguous row."""
        await stop.wait()
        self._stopping = True
        intake.cancel()
        for sender in senders:
            if sender not in self._sending:  # waiting for work, the limiter or a backoff
                sender.cancel()

    async def _guard(self, stage: Coroutine[Any, Any, None]) -> None:
        try:
            await stage
        except Exception as error:  # forwarded to the caller, see the module docstring
            await self.output.put(error)

    # -- intake ------------------------------------------------------------------------------

    async def _intake(self, inputs: Iterable[Input] | AsyncIterable[Input]) -> None:
        position = 0
        async for block in _blocks(inputs, _BLOCK):
            texts = [_text_of(item) for item in block]
            estimates = iter(self.estimator.count([t for t in texts if t]))
            tokens = [
                next(estimates) if text else _IMAGE_TOKENS if _is_image(item) else 0
                for item, text in zip(block, texts, strict=True)
            ]
            exact = await self._exact_counts(texts)
            if self.chunks_mode:
                await self._intake_chunks(position, block, texts, tokens, exact)
            else:
                await self._intake_rows(position, block, texts, tokens, exact)
            position += len(block)
            self.stats.records += len(block)
            await self._request_release()
        await self._enqueue(self.packer.flush())
        for _ in range(self.settings.concurrency):
            await self.requests.put(None)

    async def _intake_rows(
        self,
        first: int,
        block: Sequence[Input],
        texts: Sequence[str],
        tokens: Sequence[int],
        exact: dict[int, int],
    ) -> None:
        """One row per record (``pool``, ``truncate``): the block's rows are reserved at once and
        its chunks built without an await per record, the hot path of a large job."""
        unit = await self._reserve(len(block))
        chunks = [
            chunk
            for i, (item, text) in enumerate(zip(block, texts, strict=True))
            for chunk in self._record(unit + i, first + i, item, text, tokens[i], exact.get(i))
        ]
        await self._enqueue(self.packer.add(await self._uncached(chunks)))

    async def _intake_chunks(
        self,
        first: int,
        block: Sequence[Input],
        texts: Sequence[str],
        tokens: Sequence[int],
        exact: dict[int, int],
    ) -> None:
        """One row per chunk: each record reserves its rows as it goes, so that a record of more
        chunks than the ring holds still streams through it."""
        for i, (item, text) in enumerate(zip(block, texts, strict=True)):
            if self._fits(_problem(item, text), exact.get(i)):
                unit = await self._reserve(1)
                self._describe(unit, first + i, 0, (0, len(text)))
                chunks = self._record(unit, first + i, item, text, tokens[i], exact.get(i))
                await self._enqueue(self.packer.add(await self._uncached(chunks)))
            else:
                offsets, spans = self._cuts(text)
                await self._stream_chunks(first + i, text, offsets, spans)

    async def _uncached(self, chunks: list[Chunk]) -> list[Chunk]:
        """The chunks still to send. Those the cache holds are placed in the ring at once, and a
        repeat of a text already on its way waits for that copy's answer (``_share``)."""
        if self.cache is None:
            return chunks
        keyed = [chunk for chunk in chunks if self._cacheable(chunk)]
        if not keyed:
            return chunks
        keys = self.cache.keys([cast(str, chunk.item) for chunk in keyed])
        hits = await self.cache.lookup(self._cache_scope, self.reorder.dims, keys)
        served: list[Chunk] = []
        held: set[int] = set()
        for chunk, key in zip(keyed, keys, strict=True):
            chunk.key = key
            if key in hits:
                served.append(chunk)
            elif key in self._waiting:
                self._waiting[key].append(chunk)
            else:
                self._waiting[key] = []  # this copy is sent; later repeats wait for it
                continue
            held.add(id(chunk))
        if served:
            self.reorder.put(served, np.stack([hits[cast(bytes, c.key)] for c in served]))
            self.stats.cached += len(served)
            self._settled_in_intake = True
        self.stats.deduplicated += len(held) - len(served)
        return [chunk for chunk in chunks if id(chunk) not in held]

    def _cacheable(self, chunk: Chunk) -> bool:
        """A text whose vector depends on the text alone: in truncate mode, not one the server
        might cut (its vector depends on the cut side)."""
        if self.cache is None or not isinstance(chunk.item, str) or not chunk.item:
            return False
        truncating = self.settings.long_mode == "truncate"
        return not truncating or upper_bound(chunk.item, self.spec) <= self.spec.max_input_tokens

    def _share(self, request: list[Chunk], rows: FloatArray) -> None:
        """Give each answered text's vector to the repeats waiting for it."""
        if not self._waiting:
            return
        for i, chunk in enumerate(request):
            repeats = self._waiting.pop(chunk.key, None) if chunk.key is not None else None
            if repeats:
                self.reorder.put(repeats, np.repeat(rows[i : i + 1], len(repeats), axis=0))

    async def _store(self, request: list[Chunk], rows: FloatArray) -> None:
        """Keep the vectors of an answered request in the cache."""
        if self.cache is None:
            return
        keyed = [i for i, chunk in enumerate(request) if chunk.key is not None]
        if keyed:
            keys = [cast(bytes, request[i].key) for i in keyed]
            await self.cache.store(self._cache_scope, self.reorder.dims, keys, rows[keyed])

    async def _exact_counts(self, texts: Sequence[str]) -> dict[int, int]:
        """Exact counts of the texts that might be over the per-item limit, by index.

        A strict upper bound (UTF-8 bytes plus special tokens) proves most texts fit, so they are
        never tokenized; the rest are counted in one batch off the event loop. Truncate mode
        leaves cutting to the server and counts nothing exactly."""
        if self.settings.long_mode == "truncate":
            return {}
        limit = self._item_limit()
        doubtful = [i for i, text in enumerate(texts) if upper_bound(text, self.spec) > limit]
        if not doubtful:
            return {}
        counts = await count_async(await self._exact_counter(), [texts[i] for i in doubtful])
        return dict(zip(doubtful, counts, strict=True))

    async def _exact_counter(self) -> TokenCounter:
        """The exact counter, loaded off the event loop the first time a text may be too long:
        loading takes up to a second and, for XLM-R, some 280 MB that a job of short texts
        never needs."""
        if self._exact is None:
            loop = asyncio.get_running_loop()
            self._exact = await loop.run_in_executor(None, counter_for, self.spec)
        return self._exact

    async def _enqueue(self, requests: Iterable[list[Chunk]]) -> None:
        for request in requests:
            self.stats.chunks += len(request)
            await self.requests.put(request)

    async def _reserve(self, units: int) -> int:
        # Send the open request before waiting for room: the oldest unfinished row may be in it.
        if not self.reorder.has_room(units):
            await self._enqueue(self.packer.flush())
            await self._request_release()
        return await self.reorder.reserve(units)

    async def _request_release(self) -> None:
        """Have a sender hand over the rows intake settled itself (failed or cached): no request
        will, when a long run of records needs none. Intake never releases rows itself: a stop
        cancels it wherever it is, and rows taken from the ring but not yet handed over would
        be lost (a gap in the output)."""
        if self._settled_in_intake:
            self._settled_in_intake = False
            await self.requests.put([])

    def _fits(self, problem: str | None, exact: int | None) -> bool:
        """True when the record goes whole: unusable, proved short by its upper bound (``exact``
        is None), or short by its exact count."""
        return problem is not None or exact is None or exact <= self._item_limit()

    def _record(
        self, unit: int, position: int, item: Input, text: str, tokens: int, exact: int | None
    ) -> list[Chunk]:
        """The chunks of one record, all in row ``unit``: itself when it fits, else its pieces
        (pooled back into the row when the last one is answered). An unusable record fails."""
        problem = _problem(item, text)
        if not self._fits(problem, exact):
            offsets, spans = self._cuts(text)
            self.reorder.expect_parts(unit, len(spans) - 1)
            return [self._piece(position, unit, n, text, offsets, s) for n, s in enumerate(spans)]
        sendable = "" if isinstance(item, Unusable) else _sent(item)  # an Unusable never is
        tokens = min(tokens, self.spec.max_input_tokens)
        chunk = Chunk(unit, position, 0, sendable, tokens, 0, len(text), exact or 0)
        if problem is not None:
            self._fail(chunk, problem)
            self._settled_in_intake = True
            return []
        return [chunk]

    def _cuts(self, text: str) -> tuple[Offsets, list[tuple[int, int]]]:
        """Token offsets of an over-long text and the token ranges it is cut into."""
        assert self._exact is not None  # loaded by _exact_counts before any text is cut
        offsets = self._exact.spans(text)
        limit = self._item_limit() - self.spec.special_tokens
        spans = split_spans(text, offsets, limit, overlap=self.settings.overlap_tokens)
        return offsets, drop_blank(text, offsets, spans)

    async def _stream_chunks(
        self, position: int, text: str, offsets: Offsets, spans: Sequence[tuple[int, int]]
    ) -> None:
        """Rows of ``chunks`` mode, each a unit of its own, packed as soon as reserved so that a
        record of more chunks than the ring holds still streams through it."""
        for number, span in enumerate(spans):
            unit = await self._reserve(1)
            chunk = self._piece(position, unit, number, text, offsets, span)
            self._describe(unit, position, number, (chunk.start, chunk.end))
            await self._enqueue(self.packer.add(await self._uncached([chunk])))

    def _piece(
        self,
        position: int,
        unit: int,
        number: int,
        text: str,
        offsets: Offsets,
        span: tuple[int, int],
    ) -> Chunk:
        start, end = char_range(offsets, span)
        piece = normalise(text[start:end])
        weight = span[1] - span[0] + self.spec.special_tokens  # exact: pooling is by real tokens
        tokens = self.estimator.count([piece])[0]  # the charge basis, as for every item
        return Chunk(unit, position, number, piece, tokens, start, end, weight)

    def _item_limit(self) -> int:
        """Tokens one item may have by our exact count. Fixed, never learned from refusals: a
        record's cuts, and so its vector, must not depend on what happened earlier in the job."""
        return self.spec.max_input_tokens

    def _describe(self, unit: int, position: int, number: int, span: tuple[int, int]) -> None:
        if self.chunks_mode:
            meta = np.array([[position, number, span[0], span[1]]], dtype=np.int64)
            self.reorder.describe(np.array([unit], dtype=np.int64), meta)

    # -- senders -----------------------------------------------------------------------------

    async def _sender(self) -> None:
        me = asyncio.current_task()
        while not self._stopping and (request := await self.requests.get()) is not None:
            try:
                if request:
                    await self._send(request)
                else:  # intake asks for the rows it settled itself
                    self._sending.add(me)
                    await self._release()
            finally:
                self._sending.discard(me)  # in flight from its first admission to its release

    async def _send(self, request: list[Chunk]) -> None:
        try:
            result = await call_with_retries(
                lambda: self._attempt(request),
                self.settings.retry,
                on_retry=self._on_retry,
                sleep=self._backoff,
            )
        except _Stopped:
            return  # left unanswered: the stream ends before these rows
        except _FATAL:
            raise
        except exc.BatchTooLargeError:
            self.packer.halve()
            await self._bisect(request, "the server refused the batch as too large")
        except exc.BadRequestError as error:
            await self._narrow(request, error.message or "refused by the server", error)
        except exc.InputError as error:
            if error.item is None:
                raise  # an option, not an input: no request of this job can be sent
            await self._drop(request, error.item, error.reason)
        except exc.APIError as error:
            if request_wide(error):  # no request can get past it: one error, not one per record
                raise stopping_error(error) from None
            self._streak.gave_up(error)
            for chunk in request:
                self._fail(chunk, f"gave up after retries: {error}")
            await self._release()
        else:
            self._streak.success()
            self.reorder.put(request, result.embeddings)
            self._share(request, result.embeddings)
            await self._release()
            await self._store(request, result.embeddings)

    async def _attempt(self, request: list[Chunk]) -> EmbeddingResult:
        """One paced send. The job's first request goes alone: until the server's ``usage`` has
        said how it counts, every charge is a guess, and a window filled on a guess can overshoot
        the server's limit (a burst of 429s at the first window's edge)."""
        if self._calibrated.is_set():
            return await self._paced_send(request)
        if self._probing:
            await self._calibrated.wait()
            return await self._paced_send(request)
        self._probing = True
        try:
            return await self._paced_send(request)
        finally:
            self._calibrated.set()

    async def _paced_send(self, request: list[Chunk]) -> EmbeddingResult:
        if self._stopping:
            raise _Stopped  # a retry or a split after the stop: not in flight, not sent
        local = sum(chunk.tokens for chunk in request)
        ticket = await self.limiter.acquire(self.calibration.charge(local))
        if self._stopping:
            await self.limiter.refund(ticket)
            raise _Stopped
        self._sending.add(asyncio.current_task())  # a stop lets this request finish
        self.stats.in_flight += 1
        try:
            result = await self.client.embed(
                cast(list[InputItem], [chunk.item for chunk in request]),
                model=self.spec.name,
                encoding_format="base64" if self.settings.encoding_format == "base64" else "float",
                dimensions=self.settings.dimensions,
                truncate=self._truncate(),
            )
        except exc.RateLimitError as error:
            self.stats.rate_limited += 1
            await self.limiter.on_rate_limited(
                error.limit, honoured_wait_s(error, self.settings.retry, quiet=True)
            )
            raise
        except (exc.ServerError, exc.BadRequestError, exc.BatchTooLargeError, exc.InputError):
            await self.limiter.refund(
                ticket
            )  # refused or failed before the model ran: no quota used
            raise
        finally:
            self.stats.in_flight -= 1
        await self._account(ticket, local, result)
        return result

    async def _account(self, ticket: Ticket, local: int, result: EmbeddingResult) -> None:
        if result.usage is None:  # no count to trust: the charge stands, calibration learns nothing
            used = ticket.tokens
            self._warn_no_usage()
        else:
            used = result.usage["total_tokens"]
            self.calibration.observe(local, used)
        await self.limiter.settle(ticket, used)
        self.stats.requests += 1
        self.stats.tokens += used
        self.stats.pace_tokens_per_s = self.limiter.tokens_per_s
        self.stats.pace_requests_per_s = self.limiter.requests_per_s

    def _warn_no_usage(self) -> None:
        if not self._usage_missing:
            self._usage_missing = True
            log.warning(
                "an answer carried no usable 'usage' (missing, negative or impossibly large): "
                "such requests are paced by local token estimates"
            )

    async def _backoff(self, wait_s: float) -> None:
        """Sleep before a retry, cut short by a stop (the retry then finds the job stopping)."""
        if self.stop is None:
            await asyncio.sleep(wait_s)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), wait_s)

    def _truncate(self) -> Any:
        if self.settings.long_mode != "truncate":
            return None
        return "left" if self.settings.truncate_side == "left" else "right"

    def _on_retry(self, error: BaseException, attempt: int, wait_s: float) -> None:
        self.stats.retries += 1
        log.info(
            "retrying after %s (attempt %d, wait %.2f s)", type(error).__name__, attempt, wait_s
        )

    async def _narrow(
        self, request: list[Chunk], reason: str, error: exc.APIError | None = None
    ) -> None:
        """A 400. Most often the server counted a text near the limit as over it. Each such text
        is sent alone, and the rest together: a lone near-limit text refused is halved, anything
        else refused is isolated by bisection.

        Whether a text is halved thus depends on that text alone, never on which others shared
        its request, so a text's vector is the same in every run (a resumed job's output is
        byte-identical to an uninterrupted one's)."""
        near = [chunk for chunk in request if self._near_limit(chunk)]
        if not near:
            await self._bisect(request, reason, error)
        elif len(request) == 1:
            # Repeats of the text waited for one vector; each is halved alike instead.
            key = request[0].key
            repeats = self._waiting.pop(key, []) if key is not None else []
            for chunk in (request[0], *repeats):
                halves = await self._uncached(await self._halves(chunk))
                if not halves:
                    await self._release()
                # Within the item cap: with a cap of one, each half goes alone.
                for start in range(0, len(halves), self.packer.max_items):
                    await self._send(halves[start : start + self.packer.max_items])
        else:
            rest = [chunk for chunk in request if not self._near_limit(chunk)]
            for part in ([rest] if rest else []) + [[chunk] for chunk in near]:
                await self._send(part)

    async def _drop(self, request: list[Chunk], index: int, reason: str) -> None:
        """The client refused item ``index`` before sending (a content object to a text-only
        model, say): fail it and send the others."""
        self._fail(request[index], reason)
        rest = request[:index] + request[index + 1 :]
        if rest:
            await self._send(rest)
        else:
            await self._release()

    async def _bisect(
        self, request: list[Chunk], reason: str, error: exc.APIError | None = None
    ) -> None:
        """Send each half of a refused request; a lone refused item fails with ``reason``."""
        if len(request) > 1:
            left, right = bisect(request)
            await self._send(left)
            await self._send(right)
        else:
            if error is not None:
                self._streak.refused(error)  # raises when every request is refused alike
            self._fail(request[0], reason)
            await self._release()

    def _near_limit(self, chunk: Chunk) -> bool:
        """True for a text over half the per-item limit, which halving can bring under it."""
        known = chunk.weight or chunk.tokens  # the exact count when we have one
        return isinstance(chunk.item, str) and known * 2 > self.spec.max_input_tokens

    async def _halves(self, chunk: Chunk) -> list[Chunk]:
        """A near-limit text in two halves by exact tokens (one, if it is a single token)."""
        text = chunk.item
        assert isinstance(text, str)
        offsets = (await self._exact_counter()).spans(text)
        middle = len(offsets) // 2
        if middle == 0:
            return [chunk]  # refused again, it is then isolated and fails
        spans = drop_blank(text, offsets, [(0, middle), (middle, len(offsets))])
        self.reorder.expect_parts(chunk.unit, len(spans) - 1)
        halves = [
            self._piece(chunk.position, chunk.unit, chunk.number, text, offsets, span)
            for span in spans
        ]
        return [
            dataclasses.replace(h, start=chunk.start + h.start, end=chunk.start + h.end)
            for h in halves
        ]

    def _fail(self, chunk: Chunk, reason: str) -> None:
        log.warning("input %d failed: %s", chunk.position, reason)
        self.reorder.fail(chunk, reason)
        for repeat in self._waiting.pop(chunk.key, ()) if chunk.key is not None else ():
            self.reorder.fail(repeat, reason)

    async def _release(self) -> None:
        """Hand every finished contiguous run to the caller, with the failures it holds.

        Taking a run from the ring and handing it over happen under one lock: otherwise a sender
        that took a later run could hand it over first while this one waits (for the queue, or
        for the ring's condition), and rows would reach the caller out of order."""
        async with self._release_lock:
            batch, failures = self.reorder.take()
            if batch is None:
                return
            self.stats.failures.extend(failures)
            self.stats.rows += len(batch)
            await self.output.put(dataclasses.replace(batch, failures=tuple(failures)))
        await self.reorder.notify_room()


async def _blocks(
    inputs: Iterable[Input] | AsyncIterable[Input], size: int
) -> AsyncIterator[list[Input]]:
    """Lists of up to ``size`` inputs; a sync source is sliced without a per-item await."""
    if isinstance(inputs, AsyncIterable):
        block: list[Input] = []
        async for item in inputs:
            block.append(item)
            if len(block) == size:
                yield block
                block = []
        if block:
            yield block
        return
    iterator = iter(inputs)
    while block := list(islice(iterator, size)):
        yield block
        await asyncio.sleep(0)  # let senders run between blocks of a fast sync source


def _text_of(item: object) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return str(item["text"])
    return ""


def _sent(item: str | dict[str, str]) -> str | dict[str, str]:
    """What is sent for an input: a text normalised (see ``_cache``), anything else as it is.

    Always, with a cache or without: a text's vector is then a function of the key the cache
    files it under, so the cache never changes a job's output."""
    return normalise(item) if isinstance(item, str) else item


def _is_image(item: object) -> bool:
    return isinstance(item, dict) and "image" in item


def _problem(item: object, text: str) -> str | None:
    """Why an input cannot be sent at all, or None."""
    if type(item) is str:  # the usual case first; isspace, unlike strip, copies nothing
        return None if item and not item.isspace() else "empty text"
    if isinstance(item, Unusable):
        return item.reason
    if isinstance(item, str):
        return None if item and not item.isspace() else "empty text"
    if _is_image(item) or (isinstance(item, dict) and text):
        return None
    return f"unsupported input of type {type(item).__name__}"
