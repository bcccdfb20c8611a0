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
fails at once, a host that does not answer after ``timeout_s`` (a call that timed out is never
tried again). A Redis that answers but refuses the call (a wrong password, a database it lacks, a
server that is not Redis) raises ConfigError whenever it happens: waiting would not mend it.

Once Redis has answered, when it cannot be reached, the limiter paces locally at the
limits divided by the live workers it last saw, says so once on the log, and goes back to Redis as
soon as it answers again (it asks again at most every ``min(1 s, window / 20)``, by a probe of its
own that no caller waits for: a Redis that does not answer costs up to the timeout). Each
worker remembers its own admissions of the last window: the local stand-in starts from them (the
server's window still counts them), and they are carried into the shared log when Redis answers
again, so that a Redis that restarted empty does not admit a window the server holds full. After
such a restart every worker paces on locally for a window, booking in the shared log too, until
all have carried theirs.

A request is charged in the shared log at its tokens times the largest server count over charge
of the last answers of any worker, until its own answer settles it: one worker's short charges
teach every worker.

Here: the limiter's contract and its tickets, and the booking through the script; the local
stand-in and the switch between it and Redis in ``_quota_outage``; the Redis client, the script on
it and what its errors mean in ``_quota_redis``.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

from ._config import RateLimits
from ._exceptions import ConfigError, InputError
from ._limiter import Clock, LoopClock, RateLimiter, effective_requests, effective_tokens
from ._quota_outage import Link, Recent, StandIn
from ._quota_redis import US, Script, where
from ._types import Ticket

__all__ = ["SharedLimiter", "SharedTicket"]


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


class SharedLimiter:
    """Admits requests of one model under the account's RPM and TPM, shared by every process that
    uses the same Redis, ``account`` and ``model`` (see the module docstring).

    ``limits`` are the account's nominal limits per ``window_s``, which the shared log holds; the
    pace runs at the effective ones, nominal * (1 - headroom), as for the local limiter.
    ``lead_s`` is how far ahead the script may book a request (default window / 20);
    ``timeout_s`` bounds each Redis call before the local stand-in takes over. Raises ConfigError
    without redis-py. Opening it (``async with``) is the first contact with Redis, else its first
    call is: ConfigError, nothing admitted, when Redis does not answer (a refused connection at
    once, a silent host within ``timeout_s``) or refuses the call (a wrong password, a
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
        self.where = where(url)  # host:port/db, without a password
        self._limits = limits
        self._clock: Clock = clock if clock is not None else LoopClock()
        self.max_tokens = effective_tokens(limits.tpm, limits.headroom)
        self.max_requests = effective_requests(limits.rpm, limits.headroom)
        recent = Recent(self._clock, limits)
        lead = lead_s if lead_s is not None else limits.window_s / 20
        head = [int(limits.window_s * US), limits.tpm, limits.rpm]
        head += [self.max_tokens, self.max_requests, int(limits.burst_allowance_s * US)]
        head += [int(lead * US), int(recent.unanswered_s * US)]
        script = Script(url, timeout_s, f"sfembed:{{{account}}}:{model}", head)
        self._worker = uuid.uuid4().hex
        stand_in = StandIn(limits, self._clock, self.where)
        self._link = Link(
            url, script, stand_in, recent, worker=self._worker, workers=lambda: self.workers
        )
        self._booking = _Booking(self._link, self._clock, worker=self._worker, lead_s=lead)

    async def __aenter__(self) -> SharedLimiter:
        """The first contact with Redis (it loads the quota's script). Raises ConfigError when
        Redis does not answer or refuses the call, the limiter closed."""
        try:
            await self._link.open()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop a probe of Redis still under way and close the connections to Redis."""
        await self._link.aclose()

    @property
    def round_trips(self) -> int:
        """Calls to Redis so far, answered or not."""
        return self._link.script.calls

    # -- what progress bars and ETAs read ----------------------------------------------------

    @property
    def workers(self) -> int:
        """Live workers (processes) the script saw at the last admission."""
        return self._booking.workers

    @property
    def max_workers(self) -> int:
        """The most live workers seen at once."""
        return self._booking.max_workers

    @property
    def shared(self) -> bool:
        """False while the local stand-in paces (Redis unreachable)."""
        return self._link.stand_in.limiter is None

    @property
    def fallbacks(self) -> int:
        """How many times Redis was found unreachable and the local stand-in took over."""
        return self._link.stand_in.times

    @property
    def tokens_per_s(self) -> float:
        """This worker's share of the token pace, in tokens per second."""
        if (stand_in := self._link.stand_in.limiter) is not None:
            return stand_in.tokens_per_s
        factor = self._booking.factors[0]
        return self.max_tokens * factor / self._limits.window_s / self.workers

    @property
    def requests_per_s(self) -> float:
        """This worker's share of the request pace, in requests per second."""
        if (stand_in := self._link.stand_in.limiter) is not None:
            return stand_in.requests_per_s
        factor = self._booking.factors[1]
        return self.max_requests * factor / self._limits.window_s / self.workers

    # -- admission and after the response ----------------------------------------------------

    async def acquire(self, tokens: int) -> SharedTicket:
        """Wait, behind this process's earlier callers, until one request of ``tokens`` tokens may
        be sent under the shared limits. Raises ConfigError if ``tokens`` exceeds the TPM of a
        whole window and InputError if negative. If cancelled, whatever was booked for the call
        is given back."""
        _check(tokens, self._limits.tpm, self._limits.window_s)
        ticket = self._booking.ticket(tokens)
        admitted = False
        try:
            await _sleep(self._clock, await self._booking.book(ticket))
            admitted = True
            return ticket
        finally:
            # A Redis that never answered holds nothing to give back (and would raise again).
            booked = (ticket._asked and self._link.answered) or ticket.local is not None
            if not admitted and booked:
                await self.refund(ticket)

    async def settle(self, ticket: Ticket, used_tokens: int) -> None:
        """Correct ``ticket``'s charge to ``used_tokens``, the server's count. Idempotent; does
        nothing for a refunded ticket or one older than the window. Raises InputError for a
        negative count."""
        if used_tokens < 0:
            raise InputError(f"a response cannot have a negative token count ({used_tokens})")
        ticket = self._own(ticket)
        if ticket.refunded:
            return
        self._link.recent.answered(ticket.id, used_tokens)
        if ticket.local is not None and ticket._fallback is not None:
            await ticket._fallback.settle(ticket.local, used_tokens)
        if self._link.stand_in.answering:  # the shared log may hold it (a carried one too)
            await self._link.call("settle", ticket.id, used_tokens, ticket._raw)
        ticket.tokens = used_tokens

    async def refund(self, ticket: Ticket) -> None:
        """Remove ``ticket``'s whole charge: its request never reached the model. Idempotent."""
        ticket = self._own(ticket)
        if ticket.refunded:
            return
        self._link.recent.refunded(ticket.id)
        if ticket.local is not None and ticket._fallback is not None:
            await ticket._fallback.refund(ticket.local)
        if self._link.stand_in.answering:
            await self._link.call("refund", ticket.id, ticket._raw)
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
        if (stand_in := self._link.stand_in.limiter) is not None:
            await stand_in.on_rate_limited(limit, retry_after_s)
            return
        kind = limit if limit in ("tpm", "rpm") else ""
        await self._link.call("cut", kind, int((retry_after_s or 0) * US))


class _Booking:
    """Books tickets through the script, one caller of this process at a time in arrival order,
    or through the local stand-in while Redis is unreachable; keeps what the script said at the
    last admission (the live workers, the most seen at once, the pace factors)."""

    def __init__(self, link: Link, clock: Clock, *, worker: str, lead_s: float) -> None:
        self._link = link
        self._clock = clock
        self._worker = worker
        self._ids = itertools.count()
        self._turn = asyncio.Lock()  # callers of this process ask Redis in arrival order
        # A waiter late by more than this loses its place in the line (its process died); the
        # absolute part covers an event loop that fires its timers late.
        self._grace_us = int((lead_s + 0.1) * US)
        self.workers = 1
        self.max_workers = 1
        self.factors = (1.0, 1.0)  # of the shared pace (tokens, requests), cut by 429s

    def ticket(self, tokens: int) -> SharedTicket:
        """A new ticket of ``tokens``, with an id no other ticket of any worker has."""
        return SharedTicket(id=f"{self._worker}:{next(self._ids)}", tokens=tokens)

    async def book(self, ticket: SharedTicket) -> float:
        """Book ``ticket`` in its turn; returns the seconds to wait before sending it."""
        async with self._turn:
            wait_s, charged = await self._book(ticket)
            self._link.recent.admitted(ticket.id, charged, self._clock.now() + wait_s)
        return wait_s

    async def _book(self, ticket: SharedTicket) -> tuple[float, int]:
        """The seconds to wait before sending ``ticket`` and the tokens charged (the shared log
        charges what the last answers say the server will count)."""
        link, stand_in = self._link, self._link.stand_in
        while True:
            local = stand_in.limiter
            if (
                local is not None
                and ticket.local is None
                and (stand_in.pacing or not await link.answers_again())
            ):
                ticket.local = await local.acquire(min(ticket.tokens, local.max_tokens))
                ticket._fallback = local
                # While the shared state is restored, the shared log must allow it too: a worker
                # that paces shared again meets workers still pacing locally there.
                if not stand_in.restoring:
                    return 0.0, ticket.tokens
            ticket._asked = True
            reply = await link.call("acquire", ticket.id, ticket._raw, self._worker, self._grace_us)
            if reply is None:
                if ticket.local is not None:
                    return 0.0, ticket.tokens  # the stand-in booked it already
                continue  # unreachable: the stand-in books it
            admitted, wait_us, charged = self._seen(reply)
            if admitted:
                return wait_us / US, charged
            await _sleep(self._clock, wait_us / US)

    def _seen(self, reply: list[Any]) -> tuple[int, int, int]:
        """Keep what an ``acquire`` reply says; returns admitted (0/1), the wait (us), the
        tokens charged."""
        admitted, wait_us, workers, tpm_factor, rpm_factor, charged = (int(x) for x in reply)
        self.workers = max(1, workers)
        self.max_workers = max(self.max_workers, self.workers)
        self.factors = (tpm_factor / US, rpm_factor / US)
        return admitted, wait_us, charged


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
