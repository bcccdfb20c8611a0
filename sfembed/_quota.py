"""SharedLimiter: one account's quota for a model, shared through Redis by many processes and hosts.

The rules are the local limiter's (a sliding log of admissions that holds the account's own
limits, an even pace per resource at the limits less the headroom, RPM and TPM together, pace
left unspent kept up to half a window, a 429 cutting the pace unless it came alone), held in Redis
and decided by one Lua script per call (``_quota_script.lua``) on the server's own clock
(``TIME``), so that hosts' clocks are never compared. Every ticket has an id chosen here, so that
a retried or repeated settle or refund never counts twice.

The script may book a request a little ahead (``lead_s``) and says how long to wait; a refused
request is told when to ask again. Each wait is one timer, never a polling loop. Within a process
callers ask in arrival order, one at a time.

Keys live under ``sfembed:{account}:{model}`` (the braces make them one Redis Cluster slot) and
expire a window after the last call, so a killed worker leaks nothing: its admissions leave the log
as they leave the server's window.

A Redis that has never answered is not an outage but a quota URL that cannot work (a wrong host or
port, a Redis down at the start): opening the limiter (``async with``), or else its first call,
raises ConfigError, before anything is sent. Pacing alone then would run every worker started with
the same URL at the whole limits. The first contact waits as any call does: a refused connection
fails at once, a host that does not answer after twice ``timeout_s`` (one quick retry). A Redis
that answers but refuses the call (a wrong password, a database it lacks, a server that is not
Redis) raises ConfigError whenever it happens: waiting would not mend it.

Once Redis has answered, when it cannot be reached, the limiter paces locally at the
limits divided by the live workers it last saw, says so once on the log, and goes back to Redis as
soon as it answers again (it asks again at most every ``min(1 s, window / 20)``, by a probe of its
own that no caller waits for: a Redis that does not answer costs up to twice the timeout). Each
worker remembers its own admissions of the last window: the local stand-in starts from them (the
server's window still counts them), and they are carried into the shared log when Redis answers
again, so that a Redis that restarted empty does not admit a window the server holds full. After
such a restart every worker paces on locally for a window, booking in the shared log too, until
all have carried theirs.

A request is charged in the shared log at its tokens times the largest server count over charge
of the last answers of any worker, until its own answer settles it: one worker's short charges
teach every worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import itertools
import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ._config import RateLimits
from ._exceptions import ConfigError, InputError
from ._limiter import Clock, LoopClock, RateLimiter, effective_requests, effective_tokens
from ._types import Ticket

__all__ = ["SharedLimiter", "SharedTicket"]

log = logging.getLogger("sfembed")

_US = 1_000_000
_T = TypeVar("_T")


def _import_redis() -> Any:
    """redis.asyncio, or a ConfigError naming the extra to install."""
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError as error:
        raise ConfigError("a shared quota needs redis-py: pip install 'sfembed[redis]'") from error


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without a password, for log lines and errors."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or '/0'}"


class SharedTicket(Ticket):
    """A ticket of :class:`SharedLimiter`: ``id`` names it in Redis. One issued while Redis was
    unreachable holds the local stand-in's ticket (``local``) and its issuer."""

    __slots__ = ("_asked", "_fallback", "_raw", "local")

    def __init__(self, id: str, tokens: int) -> None:
        super().__init__(id, tokens)
        self.local: Ticket | None = None
        self._fallback: RateLimiter | None = None
        self._asked = False  # the script may have booked it
        self._raw = tokens  # as asked (the charge may be more): names its place in the line


class _Recent:
    """This worker's own admissions still in a window, as the shared log holds them: ticket id ->
    [when it leaves (this clock's seconds), tokens charged]. What the local stand-in starts from,
    and what is carried into the shared log when Redis answers again."""

    def __init__(self, clock: Clock, limits: RateLimits) -> None:
        self._clock = clock
        self._window_s = limits.window_s
        # As in the shared log: a window after the answer, or this long after the admission.
        self.unanswered_s = limits.window_s * (1.0 + limits.headroom / 2)
        self._entries: dict[str, list[float]] = {}  # in admission order

    def admitted(self, id: str, tokens: int, at: float) -> None:
        entries = self._entries
        now = self._clock.now()
        # Oldest first, as they leave the window (within a latency): this keeps about a window.
        while entries:
            oldest = next(iter(entries))
            if entries[oldest][0] > now:
                break
            del entries[oldest]
        entries[id] = [at + self.unanswered_s, float(tokens)]

    def answered(self, id: str, tokens: int) -> None:
        if (entry := self._entries.get(id)) is not None:
            entry[:] = [self._clock.now() + self._window_s, float(tokens)]

    def refunded(self, id: str) -> None:
        self._entries.pop(id, None)

    def live(self) -> list[tuple[str, int, float]]:
        """(id, tokens, seconds left) of each admission still in the window."""
        now = self._clock.now()
        return [(id, int(t), at - now) for id, (at, t) in self._entries.items() if at > now]

    def carried(self) -> list[str]:
        """The live admissions as the script's ``carry`` takes them: id, tokens, microseconds."""
        return [str(x) for id, t, left_s in self.live() for x in (id, t, int(left_s * _US))]


class _StandIn:
    """The local limiter that paces while Redis is unreachable, at the limits divided by the
    workers last seen; and when to try Redis again (at most every ``probe_s`` seconds)."""

    def __init__(self, limits: RateLimits, clock: Clock, where: str) -> None:
        self._limits = limits
        self._clock = clock
        self._where = where
        self._probe_s = min(1.0, limits.window_s / 20)
        self._retry_at = -math.inf
        self._kept_until = -math.inf  # paces on after Redis answers, until then
        self.limiter: RateLimiter | None = None
        self.times = 0  # outages met

    @property
    def pacing(self) -> bool:
        """True while the stand-in paces and it is not yet time to try Redis again."""
        return self.limiter is not None and self._clock.now() < self._retry_at

    @property
    def restoring(self) -> bool:
        """True while the stand-in paces on, Redis answering, as the shared state is restored."""
        return self.limiter is not None and self._clock.now() < self._kept_until

    @property
    def answering(self) -> bool:
        """Redis answers (pacing shared, or restoring the shared state)."""
        return self.limiter is None or self.restoring

    def take_over(self, error: BaseException, workers: int, recent: _Recent) -> None:
        """Redis did not answer: pace locally (saying so once per outage) and wait a while. The
        stand-in starts from this worker's admissions of the last window: the server's window
        still holds them."""
        self._retry_at = self._clock.now() + self._probe_s
        if self.limiter is not None:
            return
        self._kept_until = -math.inf
        # Its log holds a share of the limits less the headroom: each worker knows only its own
        # window, and the workers above their share at the outage do not make room for those
        # below it, whose stand-ins would fill the server's window past the limit by the difference.
        nominal = self._limits
        tpm = effective_tokens(nominal.tpm, nominal.headroom)
        rpm = effective_requests(nominal.rpm, nominal.headroom)
        limits = dataclasses.replace(
            nominal, tpm=max(1, tpm // workers), rpm=max(1, rpm // workers)
        )
        self.limiter = RateLimiter(limits, clock=self._clock)
        now = self._clock.now()
        self.limiter.hold([(tokens, now + left_s) for _, tokens, left_s in recent.live()])
        self.times += 1
        log.warning(
            "shared quota: Redis at %s unreachable (%s); pacing locally at 1/%d of the limits "
            "until it answers",
            self._where,
            type(error).__name__,
            workers,
        )

    def hand_back(self, restoring_s: float = 0.0) -> None:
        """Redis answered again. If it lost the shared state (a restart), it is restoring it for
        ``restoring_s`` more seconds: the stand-in paces on until then (asking again as before)
        while every worker carries its window back. Until all have, the shared log holds only
        part of what the server's window counts, and each worker's stand-in, at its share of the
        limits, is the safe judge."""
        now = self._clock.now()
        if self.limiter is not None and restoring_s > 0:
            self._kept_until = now + restoring_s
        if now < self._kept_until:
            self._retry_at = now + self._probe_s
        elif self.limiter is not None:
            log.warning("shared quota: Redis at %s answers again; pacing shared", self._where)
            self.limiter = None


class SharedLimiter:
    """Admits requests of one model under the account's RPM and TPM, shared by every process that
    uses the same Redis, ``account`` and ``model`` (see the module docstring).

    ``limits`` are the account's nominal limits per ``window_s``, which the shared log holds; the
    pace runs at the effective ones, nominal * (1 - headroom), as for the local limiter.
    ``lead_s`` is how far ahead the script may book a request (default window / 20);
    ``timeout_s`` bounds each Redis call before the local stand-in takes over. Raises ConfigError
    without redis-py. Opening it (``async with``) is the first contact with Redis, else its first
    call is: ConfigError, nothing admitted, when Redis does not answer (a refused connection at
    once, a silent host within twice ``timeout_s``) or refuses the call (a wrong password, a
    database it lacks). Close with :meth:`aclose` (or ``async with``).
    """

    def __init__(
        self,
        url: str,
        limits: RateLimits,
        *,
        model: str,
        account: str = "default",
        clock: Clock | None = None,
        lead_s: float | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        if not account or any(c in account for c in "{}"):
            raise ConfigError(f"quota account label {account!r}: must be non-empty, without braces")
        self.where = _where(url)  # host:port/db, without a password
        self._url = url
        self._answered = False  # Redis has answered once: an error after it is an outage
        self._limits = limits
        self._clock: Clock = clock if clock is not None else LoopClock()
        self.max_tokens = effective_tokens(limits.tpm, limits.headroom)
        self.max_requests = effective_requests(limits.rpm, limits.headroom)
        self._recent = _Recent(self._clock, limits)
        lead = lead_s if lead_s is not None else limits.window_s / 20
        head = [int(limits.window_s * _US), limits.tpm, limits.rpm]
        head += [self.max_tokens, self.max_requests, int(limits.burst_allowance_s * _US)]
        head += [int(lead * _US), int(self._recent.unanswered_s * _US)]
        self._script = _Script(url, timeout_s, f"sfembed:{{{account}}}:{model}", head)
        self._worker = uuid.uuid4().hex
        self._ids = itertools.count()
        self._turn = asyncio.Lock()  # callers of this process ask Redis in arrival order
        self._probe: asyncio.Task[bool] | None = None  # asks Redis again, outside the turn
        self._factors = (1.0, 1.0)
        self._stand_in = _StandIn(limits, self._clock, self.where)
        # A waiter late by more than this loses its place in the line (its process died); the
        # absolute part covers an event loop that fires its timers late.
        self._grace_us = int((lead + 0.1) * _US)
        self.workers = 1  # live workers (processes) the script saw at the last admission
        self.max_workers = 1  # the most seen at once

    async def __aenter__(self) -> SharedLimiter:
        """The first contact with Redis (it loads the quota's script). Raises ConfigError when
        Redis does not answer or refuses the call, the limiter closed."""
        try:
            await self._contact(self._script.load)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop a probe of Redis still under way and close the connections to Redis."""
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.wait([probe])
            if not probe.cancelled():
                probe.exception()  # taken: what a probe met no longer matters once closed
        await self._script.redis.aclose()

    @property
    def round_trips(self) -> int:
        """Calls to Redis so far, answered or not."""
        return self._script.calls

    # -- what progress bars and ETAs read ----------------------------------------------------

    @property
    def shared(self) -> bool:
        """False while the local stand-in paces (Redis unreachable)."""
        return self._stand_in.limiter is None

    @property
    def fallbacks(self) -> int:
        """How many times Redis was found unreachable and the local stand-in took over."""
        return self._stand_in.times

    @property
    def tokens_per_s(self) -> float:
        """This worker's share of the token pace, in tokens per second."""
        if self._stand_in.limiter is not None:
            return self._stand_in.limiter.tokens_per_s
        return self.max_tokens * self._factors[0] / self._limits.window_s / self.workers

    @property
    def requests_per_s(self) -> float:
        """This worker's share of the request pace, in requests per second."""
        if self._stand_in.limiter is not None:
            return self._stand_in.limiter.requests_per_s
        return self.max_requests * self._factors[1] / self._limits.window_s / self.workers

    # -- admission -------------------------------------------------------------------------

    async def acquire(self, tokens: int) -> SharedTicket:
        """Wait, behind this process's earlier callers, until one request of ``tokens`` tokens may
        be sent under the shared limits. Raises ConfigError if ``tokens`` exceeds the TPM of a
        whole window and InputError if negative. If cancelled, whatever was booked for the call
        is given back."""
        _check(tokens, self._limits.tpm, self._limits.window_s)
        ticket = SharedTicket(id=f"{self._worker}:{next(self._ids)}", tokens=tokens)
        admitted = False
        try:
            async with self._turn:
                wait_s, charged = await self._book(ticket)
                self._recent.admitted(ticket.id, charged, self._clock.now() + wait_s)
            await _sleep(self._clock, wait_s)
            admitted = True
            return ticket
        finally:
            # A Redis that never answered holds nothing to give back (and would raise again).
            booked = (ticket._asked and self._answered) or ticket.local is not None
            if not admitted and booked:
                await self.refund(ticket)

    async def _book(self, ticket: SharedTicket) -> tuple[float, int]:
        """Book ``ticket``; returns the seconds to wait before sending it and the tokens charged
        (the shared log charges what the last answers say the server will count)."""
        while True:
            stand_in = self._stand_in.limiter
            if (
                stand_in is not None
                and ticket.local is None
                and (self._stand_in.pacing or not await self._answers_again())
            ):
                ticket.local = await stand_in.acquire(min(ticket.tokens, stand_in.max_tokens))
                ticket._fallback = stand_in
                # While the shared state is restored, the shared log must allow it too: a worker
                # that paces shared again meets workers still pacing locally there.
                if not self._stand_in.restoring:
                    return 0.0, ticket.tokens
            ticket._asked = True
            reply = await self._call(
                "acquire", ticket.id, ticket._raw, self._worker, self._grace_us
            )
            if reply is None:
                if ticket.local is not None:
                    return 0.0, ticket.tokens  # the stand-in booked it already
                continue  # unreachable: the stand-in books it
            admitted, wait_us, workers, tpm_factor, rpm_factor, charged = (int(x) for x in reply)
            self.workers = max(1, workers)
            self.max_workers = max(self.max_workers, self.workers)
            self._factors = (tpm_factor / _US, rpm_factor / _US)
            if admitted:
                return wait_us / _US, charged
            await _sleep(self._clock, wait_us / _US)

    async def _answers_again(self) -> bool:
        """True if pacing is shared again. Redis is asked by a probe of its own, one at a time,
        that no caller waits for: one that does not answer takes up to twice ``timeout_s``, and
        every caller of this process waits for the one in the turn. Once the probe is answered,
        the carry runs in the turn, so that every admission of the stand-in is in it."""
        probe = self._probe
        if probe is not None and probe.done():
            self._probe = None
            if probe.result():  # raises what it met (ConfigError: Redis refused it)
                return await self._carry()
        if self._probe is None:
            carried = self._recent.carried()  # an early carry: the one in the turn completes it
            self._probe = asyncio.create_task(self._asked_again(carried))
        return False

    async def _asked_again(self, carried: list[str]) -> bool:
        return await self._call("carry", self._worker, *carried) is not None

    async def _carry(self) -> bool:
        """Ask Redis again after an outage, carrying this worker's admissions of the window into
        the shared log (those it lacks; a count settled meanwhile corrects the one it holds).
        True if pacing is shared again."""
        reply = await self._call("carry", self._worker, *self._recent.carried())
        if reply is not None:
            self._stand_in.hand_back(restoring_s=int(reply[1]) / _US)
        return self._stand_in.limiter is None

    # -- after the response ------------------------------------------------------------------

    async def settle(self, ticket: Ticket, used_tokens: int) -> None:
        """Correct ``ticket``'s charge to ``used_tokens``, the server's count. Idempotent; does
        nothing for a refunded ticket or one older than the window. Raises InputError for a
        negative count."""
        if used_tokens < 0:
            raise InputError(f"a response cannot have a negative token count ({used_tokens})")
        ticket = self._own(ticket)
        if ticket.refunded:
            return
        self._recent.answered(ticket.id, used_tokens)
        if ticket.local is not None and ticket._fallback is not None:
            await ticket._fallback.settle(ticket.local, used_tokens)
        if self._stand_in.answering:  # the shared log may hold it (a carried one too)
            await self._call("settle", ticket.id, used_tokens, ticket._raw)
        ticket.tokens = used_tokens

    async def refund(self, ticket: Ticket) -> None:
        """Remove ``ticket``'s whole charge: its request never reached the model. Idempotent."""
        ticket = self._own(ticket)
        if ticket.refunded:
            return
        self._recent.refunded(ticket.id)
        if ticket.local is not None and ticket._fallback is not None:
            await ticket._fallback.refund(ticket.local)
        if self._stand_in.answering:
            await self._call("refund", ticket.id, ticket._raw)
        ticket.tokens = ticket.requests = 0

    async def unanswered(self, ticket: Ticket) -> None:
        """``ticket``'s request was sent and its answer lost: the shared charge stands whole (the
        server may have counted it); one booked by the local stand-in is the stand-in's to
        handle. Idempotent."""
        ticket = self._own(ticket)
        if ticket.local is not None and ticket._fallback is not None:
            await ticket._fallback.unanswered(ticket.local)

    def _own(self, ticket: Ticket) -> SharedTicket:
        if not isinstance(ticket, SharedTicket) or not ticket.id.startswith(self._worker):
            raise ValueError("this ticket was issued by another limiter")
        return ticket

    async def on_rate_limited(
        self, limit: str | None = None, retry_after_s: float | None = None
    ) -> None:
        """A 429 came anyway: cut the shared pace named by ``limit`` (None: both), at most once
        per tenth of a window for all workers together and not for a 429 alone (none within a
        window before it, from any worker); with ``retry_after_s`` hold every admission that
        long."""
        if self._stand_in.limiter is not None:
            await self._stand_in.limiter.on_rate_limited(limit, retry_after_s)
            return
        kind = limit if limit in ("tpm", "rpm") else ""
        await self._call("cut", kind, int((retry_after_s or 0) * _US))

    # -- Redis, and the stand-in when it is gone --------------------------------------------

    async def _call(self, *args: object) -> list[Any] | None:
        """One run of the script; None (and the local stand-in) when Redis is unreachable."""
        reply = await self._contact(lambda: self._script(*args))
        if reply is not None and args[0] != "carry":  # which says whether it is restoring
            self._stand_in.hand_back()
        return reply

    async def _contact(self, call: Callable[[], Awaitable[_T]]) -> _T | None:
        """What ``call`` returns; None (and the local stand-in) when Redis, which answered
        before, is unreachable. Raises ConfigError when Redis refuses the call or has never
        answered: then no worker knows how many others share the quota."""
        try:
            reply = await call()
        except _unreachable() as error:
            if _denied(error) or not self._answered:
                raise self._error(error) from None
            self._stand_in.take_over(error, self.workers, self._recent)
            return None
        except _redis_error() as error:  # it answered, but not as the quota's Redis can
            # (a database index out of range, a server that is not Redis): waiting will not
            # mend it, and redis-py's own error would not name the setting.
            raise self._error(error) from None
        self._answered = True
        return reply

    def _error(self, error: BaseException) -> ConfigError:
        """The ConfigError for what Redis did, naming the URL without its password."""
        if _denied(error) or not isinstance(error, _unreachable()):
            said = f"Redis refused the call: {error}"
        else:
            said = (
                f"Redis did not answer ({type(error).__name__}: {error}); nothing was sent: "
                "check the URL and that Redis runs"
            )
        return ConfigError(_without_password(f"quota URL {self.where!r}: {said}", self._url))


class _Script:
    """The quota's script on one Redis, for the keys under ``prefix``: ``head`` are the limits
    every call passes (see the script's header)."""

    _NAMES = ("state", "log", "charges", "workers", "line", "due", "counts")

    def __init__(self, url: str, timeout_s: float, prefix: str, head: list[int]) -> None:
        self.redis = _connect(url, timeout_s)
        source = resources.files(__package__).joinpath("_quota_script.lua").read_text("utf-8")
        self._run = self.redis.register_script(source)
        self._source = source
        self._keys = [f"{prefix}:{name}" for name in self._NAMES]
        self._head = head
        self.calls = 0

    async def load(self) -> None:
        """Load the script into Redis (what its first run would do); raises redis-py's errors."""
        self.calls += 1
        await self.redis.script_load(self._source)

    async def __call__(self, op: object, *args: object) -> list[Any]:
        """One run of operation ``op``; raises redis-py's errors."""
        self.calls += 1
        reply: list[Any] = await self._run(keys=self._keys, args=[op, *self._head, *args])
        return reply


def _connect(url: str, timeout_s: float) -> Any:
    """An asyncio Redis client for ``url``; ConfigError for a bad URL or without redis-py."""
    parts = urlsplit(url)
    # redis-py reads a path that is not one number as database 0 ('/O' for '/0') or joins its
    # digits ('/1/2' is database 12): a typo would share a quota no other worker is on.
    if parts.scheme in ("redis", "rediss") and not re.fullmatch(r"/?|/\d+", parts.path):
        raise ConfigError(
            f"quota URL {_where(url)!r}: the path must be a database number, as in "
            "redis://host:6379/0"
        )
    redis = _import_redis()
    backoff = importlib.import_module("redis.backoff")
    retry = importlib.import_module("redis.asyncio.retry")
    try:
        # One quick retry (a pooled connection the server dropped), then the stand-in.
        return redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry.Retry(backoff.NoBackoff(), 1),
        )
    except ValueError as error:
        raise ConfigError(f"quota URL {_where(url)!r}: {error}") from None


def _check(tokens: int, tpm: int, window_s: float) -> None:
    if tokens < 0:
        raise InputError(f"a request cannot have a negative token count ({tokens})")
    if tokens > tpm:
        raise ConfigError(
            f"a request of {tokens} tokens exceeds the TPM of {tpm} "
            f"per {window_s:g} s window: it could never be admitted"
        )


async def _sleep(clock: Clock, delay_s: float) -> None:
    """One timer on the clock, ``delay_s`` seconds from now."""
    if delay_s <= 0:
        return
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    handle = clock.call_at(clock.now() + delay_s, wake)
    try:
        await done
    finally:
        handle.cancel()


def _redis_error() -> type[BaseException]:
    return importlib.import_module("redis.exceptions").RedisError  # type: ignore[no-any-return]


def _denied(error: BaseException) -> bool:
    """A wrong password or a user without the right: redis-py calls it a connection error, but
    Redis answered, and waiting will not mend it."""
    exceptions = importlib.import_module("redis.exceptions")
    return isinstance(error, exceptions.AuthenticationError | exceptions.AuthorizationError)


def _without_password(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (if any) masked, wherever a message echoed it."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def _unreachable() -> tuple[type[BaseException], ...]:
    exceptions = importlib.import_module("redis.exceptions")
    return (exceptions.ConnectionError, exceptions.TimeoutError, OSError)
