"""The sending stage: a request -> limiter -> client -> retries -> rows or failures.

``concurrency`` workers take packed requests from intake's stream. :class:`PacedSender` makes one
attempt: it waits on the limiter, sends through the client, and settles the ticket to the
server's count (or refunds it when the model never ran). :class:`Dispatch` retries transient
errors, and narrows a refused request down so that only the items at fault fail: a 413 halves the
packer's item cap and bisects, a 400 sends near-limit texts alone (halved if refused alone) and
bisects the rest, an item the client refuses fails alone. Rows and failures are settled in the
delivery stage's ring through each worker's :class:`RowWriter`.

An answer far slower than the usual ones (a stalled request) is given up on early and sent again,
paced like any retry: rows leave in order, so one stalled answer holds up every row after it until
the read timeout (30 s by default) would end it. A lost answer (a stall given up on, a reset, a
504) keeps its place in the limiter's window, as the server may have counted it, but not its pace.

A stop starts nothing new: workers waiting for work, the limiter or a backoff are cancelled,
and a worker with a request out finishes it (a retry or a split after the stop is not sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

from . import _exceptions as exc
from ._bounds import upper_bound
from ._calibration import Calibration
from ._config import Settings
from ._dedup import Dedup
from ._delivery import RowWriter
from ._limiter import Limiter
from ._models import ModelSpec
from ._packer import Packer, bisect
from ._retry import (
    FailureStreak,
    call_with_retries,
    honoured_wait_s,
    request_wide,
    stopping_error,
)
from ._streams import EndOfStream, ReceiveStream
from ._types import Chunk, EmbeddingResult, InputItem, JobStats, Ticket, Truncate

if TYPE_CHECKING:  # aiohttp loads with the client, apart from this stage (see _commands)
    from ._client import EmbeddingClient

__all__ = ["Dispatch", "PacedSender"]

log = logging.getLogger("sfembed")

_FATAL = (
    exc.AuthenticationError,
    exc.PermissionDeniedError,
    exc.NotFoundError,
    exc.ModelNotFoundError,
)


#: A server count under 1/8 of the local estimate is not a count: the estimator is never that far
#: over (an image, charged 1,024 before the server counts it, is the furthest case).
_TRUSTED_UNDERCOUNT = 8
#: A request not answered within this many times the median of recent answers' times ...
_STALL_FACTOR = 10.0
#: ... and at least this long (s), once this many answers are known, is sent again.
_STALL_MIN_S = 1.0
_STALL_SAMPLES = 8
#: The median is worked out again after this many answers, not at every request: over the last
#: 64 it moves little from one answer to the next, and sorting them costs each request.
_STALL_EVERY = 8
_TOKENS = attrgetter("tokens")
_ITEM = attrgetter("item")


class _Stopped(Exception):
    """A request not started because the job was told to stop."""


class _StallClock:
    """How long answers take (the last 64), and how long is too long to wait for one."""

    def __init__(self, read_s: float) -> None:
        self.read_s = read_s
        self.times_s: deque[float] = deque(maxlen=64)
        self._deadline_s: float | None = None
        self._since = 0  # answers added since the deadline was worked out

    def add(self, answer_s: float) -> None:
        """One more answer, that took ``answer_s`` seconds."""
        self.times_s.append(answer_s)
        self._since += 1

    def deadline_s(self) -> float | None:
        """Seconds after which an attempt counts as stalled, or None (not enough answers yet,
        or no shorter than the client's own read timeout). Worked out again once
        ``_STALL_EVERY`` answers have come since the last time, and once there are
        ``_STALL_SAMPLES`` of them."""
        if self._since >= _STALL_EVERY or (self._since and len(self.times_s) == _STALL_SAMPLES):
            self._since = 0
            self._deadline_s = self._worked_out()
        return self._deadline_s

    def _worked_out(self) -> float | None:
        times = sorted(self.times_s)
        if len(times) < _STALL_SAMPLES:
            return None
        half = len(times) // 2
        median = times[half] if len(times) % 2 else (times[half - 1] + times[half]) / 2
        limit = max(_STALL_MIN_S, _STALL_FACTOR * median)
        return limit if limit < self.read_s else None


class PacedSender:
    """One attempt at one request, paced by the limiter and accounted to the server's count."""

    def __init__(
        self,
        settings: Settings,
        spec: ModelSpec,
        client: EmbeddingClient,
        limiter: Limiter,
        stats: JobStats,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.client = client
        self.limiter = limiter
        self.stats = stats
        # Charges are always priced by the estimator, so one calibration against the server's
        # usage holds for every request; exact counts decide only where texts are cut.
        self.calibration = Calibration(exact=False)
        self.stopping = False
        self.in_flight: set[asyncio.Task[Any] | None] = set()  # tasks with a request out
        self._calibrated = asyncio.Event()
        self._probing = False
        self._usage_missing = False  # warned once that answers lack a usable usage
        self._stalls = _StallClock(settings.timeouts.read_s)

    def send(self, request: list[Chunk]) -> Coroutine[Any, Any, EmbeddingResult]:
        """One paced send (a coroutine). The job's first request goes alone: until the server's
        ``usage`` has said how it counts, every charge is a guess, and a window filled on a guess
        can overshoot the server's limit (a burst of 429s at the first window's edge)."""
        if self._calibrated.is_set():
            return self._paced(request)  # no frame of its own between the worker and the send
        return self._first(request)

    async def _first(self, request: list[Chunk]) -> EmbeddingResult:
        if self._probing:
            await self._calibrated.wait()
            return await self._paced(request)
        self._probing = True
        try:
            return await self._paced(request)
        finally:
            self._calibrated.set()

    async def _paced(self, request: list[Chunk]) -> EmbeddingResult:
        if self.stopping:
            raise _Stopped  # a retry or a split after the stop: not in flight, not sent
        local = sum(map(_TOKENS, request))
        ticket = await self.limiter.acquire(self.calibration.charge(local))
        if self.stopping:
            await self.limiter.refund(ticket)
            raise _Stopped
        self.in_flight.add(asyncio.current_task())  # a stop lets this request finish
        self.stats.sending()
        deadline_s = self._stalls.deadline_s()
        started = time.monotonic()
        try:
            result = await self.client.embed_within(
                deadline_s,
                cast(list[InputItem], list(map(_ITEM, request))),
                model=self.spec.name,
                encoding_format=self.settings.encoding_format,
                dimensions=self.settings.dimensions,
                truncate=self._truncate(),
            )
        except TimeoutError:  # the stall's deadline (the client's own are APITimeoutError)
            await self.limiter.unanswered(ticket)
            raise exc.APITimeoutError(
                f"no answer within {deadline_s:g} s, {_STALL_FACTOR:g} times the usual: sent again"
            ) from None
        except exc.RateLimitError as error:
            self.stats.limited(error.limit)
            wait_s = honoured_wait_s(error, self.settings.retry, quiet=True)
            if wait_s:  # every request waits for it, not only this one: say so
                log.info(
                    "the server asked for a pause (Retry-After): no request starts for %.1f s",
                    wait_s,
                )
            await self.limiter.on_rate_limited(error.limit, wait_s)
            raise
        except (exc.GatewayTimeoutError, exc.APIConnectionError):
            # Sent, and the answer lost: the server may have counted it (the limiter keeps it
            # where it bounds the window), and the request sent again must not pay twice.
            await self.limiter.unanswered(ticket)
            raise
        except (exc.ServerError, exc.BadRequestError, exc.BatchTooLargeError, exc.InputError):
            await self.limiter.refund(ticket)  # refused or failed before the model ran
            raise
        finally:
            self.stats.in_flight -= 1
        self._stalls.add(time.monotonic() - started)
        await self._account(ticket, local, result)
        return result

    async def _account(self, ticket: Ticket, local: int, result: EmbeddingResult) -> None:
        usage = result.usage
        if usage is None or usage["total_tokens"] * _TRUSTED_UNDERCOUNT < local:
            # No count to trust (a gateway's one token per item, say): the charge stands, and
            # calibration learns nothing, so it can never fall towards 0 and switch pacing off.
            used = ticket.tokens
            self._warn_no_usage()
        else:
            used = usage["total_tokens"]
            self.calibration.observe(local, used)
        await self.limiter.settle(ticket, used)
        self.stats.settled(used)
        self.stats.pace_tokens_per_s = self.limiter.tokens_per_s
        self.stats.pace_requests_per_s = self.limiter.requests_per_s

    def _warn_no_usage(self) -> None:
        if not self._usage_missing:
            self._usage_missing = True
            log.warning(
                "an answer carried no usable 'usage' (missing, negative, or impossibly large or "
                "small): "
                "such requests are paced by local token estimates"
            )

    def _truncate(self) -> Truncate | None:
        return self.settings.truncate_side if self.settings.long_mode == "truncate" else None


class Dispatch:
    """Retries and refusal narrowing around :class:`PacedSender`, for ``concurrency`` workers.

    ``halve`` cuts a near-limit text in two by exact tokens (None if it cannot be cut). The
    ``packer`` is intake's: a 413 halves its item cap, and the pieces of a halved text are sent
    within that cap. The same error failing every request stops the job (``FailureStreak``)."""

    def __init__(
        self,
        settings: Settings,
        sender: PacedSender,
        dedup: Dedup,
        *,
        halve: Callable[[Chunk], Awaitable[list[Chunk] | None]],
        packer: Packer,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.sender = sender
        self.dedup = dedup
        self.limit = sender.spec.max_input_tokens
        self._halve = halve
        self._packer = packer
        self._streak = FailureStreak()
        self._stop = stop
        self._workers: set[asyncio.Task[Any]] = set()

    async def worker(self, requests: ReceiveStream[list[Chunk]], rows: RowWriter) -> None:
        """Send requests until the stream ends or the job stops; both ends are closed however
        this ends."""
        me = asyncio.current_task()
        if me is not None:
            self._workers.add(me)
        with requests, rows:
            while not self.sender.stopping:
                try:
                    request = await requests.receive()
                except EndOfStream:
                    return
                try:
                    await self._send(request, rows)
                finally:
                    self.sender.in_flight.discard(me)  # from its first admission to here

    def ended(self) -> None:
        """Every request was sent and answered or given up on. Raises the stopping error of a
        job whose requests all ran out of retries, none answered (see ``FailureStreak.ended``)."""
        self._streak.ended()

    def stop(self) -> None:
        """Start no more requests: cancel every worker that has none out."""
        self.sender.stopping = True
        for worker in self._workers:
            if worker not in self.sender.in_flight:  # waiting for work, the limiter or a backoff
                worker.cancel()

    async def _send(self, request: list[Chunk], rows: RowWriter) -> None:
        try:
            # The first attempt is made by call_with_retries itself; tenacity only after a
            # retryable failure.
            result = await call_with_retries(
                lambda: self.sender.send(request),
                self.settings.retry,
                on_retry=self._on_retry,
                sleep=self._backoff,
            )
        except _Stopped:
            return  # left unanswered: the stream ends before these rows
        except _FATAL:
            raise
        except exc.BatchTooLargeError as error:
            self._packer.halve()
            await self._bisect(request, rows, "the server refused the batch as too large", error)
        except exc.BadRequestError as error:
            await self._narrow(request, rows, error.message or "refused by the server", error)
        except exc.InputError as error:
            if error.item is None:
                raise  # an option, not an input: no request of this job can be sent
            await self._drop(request, rows, error.item, error)
        except exc.APIError as error:
            if request_wide(error):  # no request can get past it: one error, not one per record
                raise stopping_error(error) from None
            self._streak.gave_up(error)
            for chunk in request:
                self._fail(chunk, rows, f"gave up after retries: {error}", error)
        else:
            self._streak.success()
            # Requests packed from now on are the window's share in the server's tokens.
            self._packer.calibrate(self.sender.calibration.ratio)
            rows.put(request, result.embeddings)
            await self.dedup.answered(request, result.embeddings, rows)

    async def _narrow(
        self, request: list[Chunk], rows: RowWriter, reason: str, error: exc.APIError
    ) -> None:
        """A 400. Most often the server counted a text near the limit as over it. Each such text
        is sent alone, and the rest together: a lone near-limit text refused is halved, anything
        else refused is isolated by bisection.

        Whether a text is halved thus depends on that text alone, never on which others shared
        its request, so a text's vector is the same in every run (a resumed job's output is
        byte-identical to an uninterrupted one's)."""
        near = [chunk for chunk in request if self._near_limit(chunk)]
        if not near:
            await self._bisect(request, rows, reason, error)
        elif len(request) == 1:
            # Repeats of the text waited for one vector; each is halved alike instead.
            for chunk in (request[0], *self.dedup.repeats_of(request[0])):
                await self._send_halves(chunk, rows)
        else:
            rest = [chunk for chunk in request if not self._near_limit(chunk)]
            for part in ([rest] if rest else []) + [[chunk] for chunk in near]:
                await self._send(part, rows)

    async def _send_halves(self, chunk: Chunk, rows: RowWriter) -> None:
        """Send a refused near-limit text as two halves (alone again if it cannot be cut: then
        it is refused again, isolated, and fails)."""
        halves = await self._halve(chunk)
        if halves is None:
            halves = [chunk]
        else:
            rows.expect_parts(chunk.unit, len(halves) - 1)
        halves = await self.dedup.admit(halves, rows)
        # Within the item cap: with a cap of one, each half goes alone.
        cap = self._packer.max_items
        for start in range(0, len(halves), cap):
            await self._send(halves[start : start + cap], rows)

    async def _drop(
        self, request: list[Chunk], rows: RowWriter, index: int, error: exc.InputError
    ) -> None:
        """The client refused item ``index`` before sending (a content object to a text-only
        model, say): fail it with ``error`` and send the others."""
        self._fail(request[index], rows, error.reason, error)
        rest = request[:index] + request[index + 1 :]
        if rest:
            await self._send(rest, rows)

    async def _bisect(
        self, request: list[Chunk], rows: RowWriter, reason: str, error: exc.APIError
    ) -> None:
        """Send each half of a request refused with ``error``; a lone refused item fails with
        ``reason`` and ``error``."""
        if len(request) > 1:
            left, right = bisect(request)
            await self._send(left, rows)
            await self._send(right, rows)
        else:
            if isinstance(error, exc.BadRequestError):  # a 413 alone fails, as it always did
                self._streak.refused(error)  # raises when every request is refused alike
            self._fail(request[0], rows, reason, error)

    def _near_limit(self, chunk: Chunk) -> bool:
        """True for a text over half the per-item limit, which halving can bring under it, and
        for one intake sent whole by its estimate alone, which its strict bound does not prove
        short (see ``Splitter``): both depend on the text alone."""
        if not isinstance(chunk.item, str):
            return False
        known = chunk.weight or chunk.tokens  # the exact count when we have one
        return known * 2 > self.limit or (
            not chunk.weight and upper_bound(chunk.item, self.sender.spec) > self.limit
        )

    def _fail(self, chunk: Chunk, rows: RowWriter, reason: str, error: exc.SFEmbedError) -> None:
        """Fail ``chunk``'s row, and those of the repeats waiting for it, with ``error``."""
        rows.fail(chunk, reason, error)
        for repeat in self.dedup.repeats_of(chunk):
            rows.fail(repeat, reason, error)

    async def _backoff(self, wait_s: float) -> None:
        """Sleep before a retry, cut short by a stop (the retry then finds the job stopping)."""
        if self._stop is None:
            await asyncio.sleep(wait_s)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), wait_s)

    def _on_retry(self, error: BaseException, attempt: int, wait_s: float) -> None:
        self.sender.stats.retries += 1
        log.info(
            "retrying after %s (attempt %d, wait %.2f s)", type(error).__name__, attempt, wait_s
        )
