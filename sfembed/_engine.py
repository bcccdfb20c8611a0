"""The engine: wires the stages of one run and runs them as tasks of one TaskGroup.

    intake (_intake: count, split, dedup and cache (_dedup), pack)   --requests stream-->
    dispatch x concurrency (_dispatch: limiter, client, retries)     --rows, in the ring-->
    delivery (_delivery: the reorder ring, in input order)           --batches stream--> caller

Each stream closes when its senders are done, which ends its receivers: the run ends when intake
has read every input, dispatch has sent every request and delivery has handed over every row.
No stage lets an exception escape into the group (the group would cancel the caller's own task
behind its back): the first fatal error is kept, every stage is cancelled, and the caller's
stream raises it once it has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Sized,
)
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np

from . import _exceptions as exc
from ._cache import EmbeddingCache, scope
from ._config import Settings, load_settings, model_spec, with_options
from ._dedup import Dedup
from ._delivery import Delivery
from ._dispatch import Dispatch, PacedSender
from ._intake import Input, Intake, Splitter
from ._limiter import Limiter, RateLimiter, process_age_s
from ._models import ModelSpec
from ._packer import packer_for
from ._reorder import ReorderBuffer
from ._streams import ReceiveStream, SendStream, open_stream
from ._types import Chunk, EmbeddedBatch, FloatArray, JobStats

if TYPE_CHECKING:  # aiohttp loads with the client, apart from the stages (see _commands)
    from ._client import EmbeddingClient
    from ._quota import SharedLimiter  # loaded for a shared quota only (redis's client, its script)

__all__ = ["Engine", "embed", "embed_stream", "job_stream", "shared_limiter_for"]

_BATCHES_BUFFERED = 8  # batches delivery may run ahead of a caller that is busy with the last
OnFailure = Literal["raise", "nan"]


async def embed(
    inputs: Iterable[Input] | AsyncIterable[Input],
    *,
    model: str,
    settings: Settings | None = None,
    client: EmbeddingClient | None = None,
    stats: JobStats | None = None,
    errors: OnFailure = "raise",
    **options: Any,
) -> FloatArray:
    """Embed ``inputs`` and return one float32 row per input (per chunk in ``chunks`` mode).

    A bare ``str`` (or content object) is one input: ``embed("hello")`` gives one row.

    ``options`` override ``settings`` fields (``encoding_format``, ``dimensions``, ``long_mode``,
    ``concurrency``, ``rate``, ...). With ``errors="raise"`` (default) an input that could not be
    embedded raises JobError listing every failure; with ``errors="nan"`` its row is NaN.
    ``limiter``, ``stop`` and ``cache`` may be passed as to :func:`embed_stream`: a ``stop``
    set before the end returns the rows of the inputs that came before it, in order, so fewer
    rows than inputs.
    Raises ConfigError (a setting or option not allowed, an unknown model), or an APIError that
    no retry can get past (a wrong key, say).
    """
    if errors not in get_args(OnFailure):
        raise exc.ConfigError(f"errors = {errors!r} is not allowed: use 'raise' or 'nan'")
    job_stats = stats if stats is not None else JobStats()
    inputs = _as_inputs(inputs)
    rows = _Rows(len(inputs) if isinstance(inputs, Sized) else None)
    # As embed_stream's: the limiter, a stop event and a cache pass through ``options``.
    passed = {key: options.pop(key) for key in ("limiter", "stop", "cache") if key in options}
    options = {**options, "model": model}
    running = _running(inputs, settings, options, client=client, stats=job_stats, **passed)
    async with running as (engine, batches):
        async for batch in batches:
            rows.add(batch.embeddings)
    if job_stats.failures and errors == "raise":
        raise exc.JobError(job_stats.failures)
    if rows.filled == 0:  # no input: still the model's width, so results stack with others
        return np.empty((0, engine.ring.dims), dtype=np.float32)
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
    options = {**options, "model": model}
    async with _running(
        inputs,
        settings,
        options,
        client=client,
        stats=stats,
        limiter=limiter,
        stop=stop,
        cache=cache,
    ) as (_, batches):
        async for batch in batches:
            yield batch


async def job_stream(
    inputs: Iterable[Input],
    settings: Settings,
    spec: ModelSpec,
    *,
    client: EmbeddingClient,
    stats: JobStats,
    limiter: Limiter | None,
    stop: asyncio.Event | None,
    cache: EmbeddingCache | None,
) -> AsyncGenerator[EmbeddedBatch, None]:
    """``embed_stream`` for a file job (``_job``), whose settings are whole and whose model
    ``spec`` it has resolved already: the stages take that spec, not one resolved again."""
    running = _running(
        inputs,
        settings,
        {},
        client=client,
        stats=stats,
        limiter=limiter,
        stop=stop,
        cache=cache,
        spec=spec,
    )
    async with running as (_, batches):
        async for batch in batches:
            yield batch


@contextlib.asynccontextmanager
async def _running(
    inputs: Iterable[Input] | AsyncIterable[Input],
    settings: Settings | None,
    options: dict[str, Any],
    *,
    client: EmbeddingClient | None,
    stats: JobStats | None,
    limiter: Limiter | None = None,
    stop: asyncio.Event | None = None,
    cache: EmbeddingCache | None = None,
    spec: ModelSpec | None = None,
) -> AsyncIterator[tuple[Engine, AsyncGenerator[EmbeddedBatch, None]]]:
    """The engine over ``inputs`` and its batches, with the client and the shared limiter it
    opened itself (when not given one): all closed on leaving, so its stages stop before the
    caller goes on (not later, from a GC finaliser). ``spec``: the model's, if resolved already."""
    run_settings = with_options(settings or load_settings(), **options)
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            from ._client import client_for

            client = await stack.enter_async_context(client_for(run_settings))
        if limiter is None and run_settings.quota:
            limiter = await stack.enter_async_context(shared_limiter_for(run_settings))
        engine = Engine(run_settings, client, stats or JobStats(), limiter, stop, cache, spec)
        batches = await stack.enter_async_context(contextlib.aclosing(engine.run(inputs)))
        yield engine, batches


def _as_inputs(
    inputs: Iterable[Input] | AsyncIterable[Input],
) -> Iterable[Input] | AsyncIterable[Input]:
    """A bare text or content object is one input, not a sequence of characters or keys."""
    if isinstance(inputs, str | dict):
        return [inputs]
    if isinstance(inputs, bytes | bytearray | memoryview):
        raise TypeError("inputs must be texts (str), not bytes: decode them first")
    return inputs


def shared_limiter_for(settings: Settings) -> SharedLimiter:
    """The shared quota at ``settings.quota`` for the settings' model and account; not opened.
    Raises ConfigError without redis-py or for a bad URL."""
    from ._quota import SharedLimiter

    return SharedLimiter(
        settings.quota, settings.rate, model=settings.model, account=settings.quota_account
    )


class Engine:
    """One run of the stages over one input stream."""

    def __init__(
        self,
        settings: Settings,
        client: EmbeddingClient,
        stats: JobStats,
        limiter: Limiter | None,
        stop: asyncio.Event | None = None,
        cache: EmbeddingCache | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.stop = stop
        if spec is None:  # resolved once, for every stage (a file job resolved it already)
            spec = model_spec(settings, client.catalog)
        self.ring = ReorderBuffer(
            dims=spec.output_dimensions(settings.dimensions),
            capacity=max(1024, 4 * settings.concurrency * settings.batch.max_items),
            with_chunks=settings.long_mode == "chunks",
        )
        self.splitter = Splitter(
            spec, overlap_tokens=settings.overlap_tokens, exact=settings.long_mode != "truncate"
        )
        self.packer = packer_for(settings, spec)
        self.dedup = Dedup(
            cache,
            spec,
            self.ring.dims,
            stats,
            scope=scope(spec.name, client.endpoint),  # whose vectors these are
            truncating=settings.long_mode == "truncate",
        )
        # A fresh process may pay its start-up from the first window's quota (see RateLimiter).
        limiter = limiter or RateLimiter(settings.rate, startup_s=process_age_s())
        sender = PacedSender(settings, spec, client, limiter, stats)
        self.dispatch = Dispatch(
            settings,
            sender,
            self.dedup,
            halve=self.splitter.halves,
            packer=self.packer,
            stop=stop,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._error: BaseException | None = None

    async def run(
        self, inputs: Iterable[Input] | AsyncIterable[Input]
    ) -> AsyncGenerator[EmbeddedBatch, None]:
        """Batches in order; the stages stop when the caller stops reading. Raises the first
        fatal error of any stage, unwrapped."""
        requests_out, requests_in = _requests_stream(self.settings.concurrency)
        batches_out, batches_in = _batches_stream()
        delivery = Delivery(self.ring, self.stats, batches_out)
        ended = False  # every batch handed on, the stream closed by its writer
        async with asyncio.TaskGroup() as group:
            start = functools.partial(self._start, group)
            rows = delivery.writer()
            intake = Intake(
                self.settings,
                self.splitter,
                self.dedup,
                self.packer,
                self.stats,
                requests=requests_out,
                rows=rows,
            )
            intake_task = start("intake", functools.partial(intake.run, inputs), requests_out, rows)
            with requests_in:  # each worker holds its own clone
                for _ in range(self.settings.concurrency):
                    receive, rows = requests_in.clone(), delivery.writer()
                    start(
                        "dispatch",
                        functools.partial(self.dispatch.worker, receive, rows),
                        receive,
                        rows,
                    )
            start("delivery", delivery.run, batches_out)
            if self.stop is not None:
                start("stop", functools.partial(self._watch, self.stop, intake_task))
            try:
                with batches_in:
                    async for batch in batches_in:
                        try:
                            yield batch
                        except GeneratorExit:
                            break  # the caller closed us: cancel the stages and end quietly
                    else:
                        ended = True
            finally:
                for task in self._tasks:
                    task.cancel()
        if self._error is not None:
            raise self._error
        if ended and not self.dispatch.sender.stopping:  # not when told to stop, or closed
            self.dispatch.ended()

    def _start(
        self,
        group: asyncio.TaskGroup,
        name: str,
        stage: Callable[[], Coroutine[Any, Any, None]],
        *ends: _Closable,
    ) -> asyncio.Task[None]:
        """Start ``stage`` as a task of ``group``. The stream ends it was given are closed once
        it is done, however it ends: even a task cancelled before its first step, whose
        coroutine never ran, ends the streams it was to close."""
        task = group.create_task(self._guard(stage), name=f"sfembed:{name}")
        for end in ends:
            task.add_done_callback(functools.partial(_close, end))
        self._tasks.append(task)
        return task

    async def _guard(self, stage: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``stage``; keep the first fatal error and cancel every stage (see the module
        docstring). The coroutine is made here, so a stage cancelled before it started leaves no
        coroutine never awaited."""
        try:
            await stage()
        except Exception as error:
            if self._error is None:
                self._error = error
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def _watch(self, stop: asyncio.Event, intake: asyncio.Task[None]) -> None:
        """On ``stop``: read no more input and start no more requests. Requests in flight are
        answered and their rows handed over; the stream then ends after the last contiguous row."""
        await stop.wait()
        intake.cancel()
        self.dispatch.stop()


class _Closable(Protocol):
    def close(self) -> None: ...


def _close(end: _Closable, task: asyncio.Task[None]) -> None:
    end.close()


def _requests_stream(
    capacity: int,
) -> tuple[SendStream[list[Chunk]], ReceiveStream[list[Chunk]]]:
    return open_stream(capacity)


def _batches_stream() -> tuple[SendStream[EmbeddedBatch], ReceiveStream[EmbeddedBatch]]:
    return open_stream(_BATCHES_BUFFERED)
