"""The limiter: what the engine waits on before each request, and its local implementation.

:class:`Limiter` is the interface the engine sees: acquire a ticket for a request's tokens and one
request, settle it to the server's count, refund it when the model never ran, and slow down after
a 429. Its methods are coroutines so that an implementation may keep its state elsewhere (the
shared limiter keeps it in Redis, for many processes on one quota).

:class:`RateLimiter` is the local implementation: it holds one model's RPM and TPM at once,
FIFO-fair, driven by timers on a clock. Two rules must both allow a request before it is admitted:

* a sliding log of admissions (time, tokens) never holds more than the account's limit within any
  ``window_s`` seconds: this is the hard guarantee, whatever the pace does. The server counts a
  request from its arrival, which lies between our admission and its answer, by a latency that
  varies (a busy event loop sends late). So an answered request stays in the log until a window
  after its answer, and one not yet answered until a window and half the headroom's share of a
  window after its admission: a request admitted as an old one leaves our window finds it gone
  from the server's too. Until its answer says how the server counted it, a request is held at
  its charge and 15% more: the charge is an estimate, and the log is often full to the last
  percent;
* a pace (GCRA, virtual scheduling) per resource spreads a window's quota evenly over the window
  and may run at most ``burst_s`` seconds ahead of it, so a job never spends a whole window's
  quota in its first second (a sliding-window server would then reject the rest of the minute).
  Pace left unspent (a job reading, counting or loading a tokenizer, or held by the log rather
  than the pace) is kept, up to half a window, and spent as far as the log has room in the
  current window: a short job that idles in its first seconds would otherwise lose that share of
  its quota for good.

Tokens are charged before sending, from the caller's count, then corrected to the server's count
by :meth:`RateLimiter.settle` (or removed by :meth:`RateLimiter.refund`). A request whose answer
was lost (:meth:`RateLimiter.unanswered`) stays in the log until a window after the loss, as the
server may have counted it (on arrival, however late the request was sent), and its pace is given
back, so that sending it again does not cost the quota twice.

Waiters are served in arrival order, but for one exception: when the head cannot pass yet, a
smaller request behind it may go first if it puts the head off by nothing (it fits now, and the
head still fits when its time comes). A long request waiting for room in the window would
otherwise leave the room it will not need unused: requests admitted together leave the window
together, so room comes in lumps. Exactly one timer is set, for the moment the head or one
behind it can pass. There is no polling loop and no background task, and the clock is
injectable so that tests move time by hand (:class:`ManualClock`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from ._config import RateLimits
from ._exceptions import ConfigError, InputError
from ._types import Ticket

__all__ = [
    "Clock",
    "Limiter",
    "LocalTicket",
    "LoopClock",
    "ManualClock",
    "RateLimiter",
    "Ticket",
    "TimerHandle",
    "effective_requests",
    "effective_tokens",
]

#: A 429 multiplies the named pace by this factor ...
_CUT = 0.8
#: ... but never below this fraction of the effective limit, so a job always makes progress.
_FLOOR = 0.25
#: At most one cut per this fraction of a window: a burst of 429s answers one overshoot, and
#: cutting once per response would collapse the pace to the floor at once.
_CUT_SPACING = 0.1
#: A fresh process may spend the time it took to start, up to this fraction of a window, out of
#: the first window's quota (see ``RateLimiter``).
_STARTUP_SHARE = 0.1
#: How many waiters behind a head that must wait are looked at for one that may go first.
_BACKFILL_DEPTH = 16
#: Pace left unspent is kept up to this fraction of a window (and spent only as the log has
#: room): the server's count may exceed the charge, which a burst of a whole window would learn
#: only from its 429s.
_IDLE_SHARE = 0.5
#: Until its answer gives the server's count, a request is held in the log at its charge and
#: this fraction more: the charge is an estimate scaled by what the server counted before, and a
#: request unlike those (another mix of scripts) may be counted more. Measured: 13.5% over the
#: charge in a Qwen3 job's first window, 2.9% (at most 9%) for bge-m3, each a 429 as the log was
#: 99.7-99.95% full. A quarter more cost the bge-m3 job 2-3% of its windows (the log binds, the
#: pace having banked time); this much, under 1%.
_UNANSWERED_MARGIN = 0.15


class Limiter(Protocol):
    """Admits requests under a quota of tokens and requests per window (TPM and RPM together).

    The engine calls :meth:`acquire` before each send and, for every ticket it got, at most one
    of :meth:`settle` (the server answered and counted), :meth:`refund` (the request was refused
    before the model ran, or never sent) or :meth:`unanswered` (sent, answer lost); calling one
    again changes nothing.
    """

    @property
    def tokens_per_s(self) -> float:
        """The current token pace in tokens per second, for an ETA."""
        ...

    @property
    def requests_per_s(self) -> float:
        """The current request pace in requests per second, for an ETA."""
        ...

    async def acquire(self, tokens: int) -> Ticket:
        """Wait until one request of ``tokens`` tokens may be sent, and charge it. Raises
        ConfigError when such a request could never pass, InputError for a negative count. A
        caller cancelled while waiting is charged nothing."""
        ...

    async def settle(self, ticket: Ticket, used_tokens: int) -> None:
        """Correct ``ticket``'s charge to ``used_tokens``, the server's count. Idempotent, and
        nothing for a refunded ticket. Raises InputError for a negative count."""
        ...

    async def refund(self, ticket: Ticket) -> None:
        """Remove ``ticket``'s whole charge: the request was refused before the model ran, or
        never sent. Idempotent."""
        ...

    async def unanswered(self, ticket: Ticket) -> None:
        """The request was sent but its answer never came whole (a connection reset, a 504, an
        answer given up on), so the server may or may not have counted it. An implementation
        may keep the charge whole, or keep it where it bounds the server's window and give the
        rest back, so that the request sent again does not pay twice. Idempotent; the ticket is
        then neither settled nor refunded."""
        ...

    async def on_rate_limited(self, limit: str | None, retry_after_s: float | None) -> None:
        """A 429 came anyway: slow the pace named by ``limit`` (``"tpm"`` or ``"rpm"``; None,
        or anything else, both); with ``retry_after_s`` (seconds), admit nothing for that long."""
        ...


class TimerHandle(Protocol):
    """A scheduled callback that can be called off."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time in seconds (any origin, never going back) and callbacks at a given time."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopClock:
    """The running asyncio loop's monotonic clock; raises RuntimeError outside a running loop."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told to, for tests: time starts at ``start`` seconds.

    Callbacks run synchronously inside :meth:`advance` / :meth:`advance_to`, in time order (ties in
    the order they were scheduled), with :meth:`now` equal to their due time.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, _ManualTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        timer = _ManualTimer(when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    @property
    def next_at(self) -> float | None:
        """Due time (seconds) of the earliest callback still pending, or None."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running the callbacks that fall due; raises ValueError
        if ``seconds`` is negative."""
        if seconds < 0:
            raise ValueError("ManualClock cannot go back in time")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        """Move time to ``when`` seconds (not back), running the callbacks that fall due."""
        while (due := self.next_at) is not None and due <= when:
            _, _, timer = heapq.heappop(self._heap)
            self._now = max(self._now, due)
            timer.callback()
        self._now = max(self._now, when)


class LocalTicket(Ticket):
    """A ticket of :class:`RateLimiter`; ``admitted_at`` is the limiter's clock time in seconds."""

    __slots__ = ("_expires_at", "_limiter", "_live", "_paced", "_pending", "admitted_at")

    def __init__(
        self, limiter: RateLimiter, id: str, tokens: int, admitted_at: float, expires_at: float
    ) -> None:
        super().__init__(id, tokens)
        self._limiter = limiter
        self._live = True  # still inside the sliding log
        self._paced = True  # its charge is still in the pace (given back when unanswered)
        self._pending = True  # no count from the server yet: the log holds it with a margin
        self._expires_at = expires_at  # when it leaves the log
        self.admitted_at = admitted_at

    def __repr__(self) -> str:
        return f"LocalTicket(tokens={self.tokens}, requests={self.requests}, at={self.admitted_at})"


class _Pace:
    """GCRA for one resource: ``tat`` is the time (s) the pace has charged up to.

    A request of cost c (requests or tokens) takes c / rate seconds of pace; it passes once the pace
    is at most ``burst_s`` ahead of now (virtual scheduling with tolerance ``burst_s``). The
    rate is limit / window times a factor that a 429 cuts and that climbs back linearly to 1
    over one window.
    """

    __slots__ = ("banked", "burst_s", "cut_at", "cut_factor", "limit", "tat", "window_s")

    def __init__(self, limit: int, window_s: float, burst_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.burst_s = max(0.0, burst_s)
        self.tat = -math.inf
        self.banked = False  # tat lags the clock by a start-up credit not yet spent
        self.cut_factor = 1.0
        self.cut_at = -math.inf

    def factor(self, now: float) -> float:
        """The fraction of the effective rate allowed at ``now``; never decreasing in ``now``."""
        if self.cut_factor >= 1.0:
            return 1.0
        climbed = (1.0 - self.cut_factor) * ((now - self.cut_at) / self.window_s)
        return min(1.0, self.cut_factor + climbed)

    def rate(self, now: float) -> float:
        """The pace at ``now`` in units (requests or tokens) per second."""
        if self.cut_factor >= 1.0:  # no 429 to climb back from: the whole rate (most requests)
            return self.limit / self.window_s
        return self.limit * self.factor(now) / self.window_s

    def ready_at(self) -> float:
        """When (s) the next request may pass, whatever its size: see below."""
        # The pace may run ``burst_s`` ahead whatever the request's size. That tolerance is also
        # what absorbs the event loop's lateness in firing timers: without it, every late timer
        # (a few ms under load) would be pace lost for good, some percent of the quota.
        return self.tat - self.burst_s

    def after(self, cost: int, now: float, idle_s: float = 0.0) -> float:
        """Where ``tat`` would be after charging ``cost`` units at ``now``: pace left unspent is
        kept up to ``idle_s`` seconds of it (the rest is lost), and the start-up credit whole."""
        kept = self.tat if self.banked else max(self.tat, now - max(0.0, idle_s))
        return kept + cost / self.rate(now)

    def charge(self, cost: int, now: float, idle_s: float = 0.0) -> None:
        """Charge ``cost`` units at ``now`` (see :meth:`after`)."""
        self.tat = self.after(cost, now, idle_s)
        self.banked = self.banked and self.tat < now

    def adjust(self, delta: int, now: float) -> None:
        """Correct an earlier charge by ``delta`` units (negative gives pace back)."""
        self.tat += delta / self.rate(now)

    def start(self, now: float, credit_s: float) -> None:
        """Let the first admissions run up to ``credit_s`` seconds of pace ahead of ``now``."""
        if self.tat == -math.inf:
            self.tat = now - credit_s
            self.banked = credit_s > 0

    def cut(self, now: float) -> None:
        if now - self.cut_at < _CUT_SPACING * self.window_s:
            return
        self.cut_factor = max(_FLOOR, self.factor(now) * _CUT)
        self.cut_at = now
        # Credit banked while idle would let a burst through right after the server said no.
        self.tat = max(self.tat, now)
        self.banked = False


class _Log:
    """The admissions of the last window, oldest first, with running sums of their charges (and
    of the charges of those the server has not counted for us yet, ``pending``)."""

    __slots__ = ("entries", "pending", "requests", "tokens")

    def __init__(self) -> None:
        self.entries: deque[LocalTicket] = deque()
        self.tokens = 0
        self.requests = 0
        self.pending = 0

    def add(self, ticket: LocalTicket) -> None:
        self.entries.append(ticket)
        self.tokens += ticket.tokens
        self.requests += ticket.requests
        self.pending += ticket.tokens if ticket._pending else 0

    def counted(self, ticket: LocalTicket) -> None:
        """``ticket``'s count is known now (settled or refunded): no margin on it any more."""
        if ticket._live and ticket._pending:
            self.pending -= ticket.tokens
        ticket._pending = False

    def prune(self, now: float) -> None:
        # ``_expires_at`` is the very value ``ready_at`` returns, so an entry is always gone when
        # the timer set for its expiry fires (no float mismatch). Entries answered out of order
        # leave with the oldest before them: a little late, never early.
        entries = self.entries
        while entries and entries[0]._expires_at <= now:
            ticket = entries.popleft()
            ticket._live = False
            self.tokens -= ticket.tokens
            self.requests -= ticket.requests
            self.pending -= ticket.tokens if ticket._pending else 0

    def ready_at(self, tokens: float, requests: int, tpm: int, rpm: int, now: float) -> float:
        """When (s) enough old entries will have left the window for ``requests`` more that
        need ``tokens`` (see :func:`_unanswered`) to fit under ``tpm`` tokens and ``rpm``
        requests; an entry the server has not counted for us yet is held with its margin."""
        extra_tokens = self.tokens + self.pending * _UNANSWERED_MARGIN + tokens - tpm
        extra_requests = self.requests + requests - rpm
        if extra_tokens <= 0 and extra_requests <= 0:
            return now
        freed_tokens = 0.0
        freed_requests = 0
        when = now
        for entry in self.entries:
            freed_tokens += entry.tokens * (1.0 + _UNANSWERED_MARGIN * entry._pending)
            freed_requests += entry.requests
            when = max(when, entry._expires_at)
            if freed_tokens >= extra_tokens and freed_requests >= extra_requests:
                return when
        return math.inf  # unreachable: acquire refuses requests larger than the window


class _Timer:
    """At most one pending call of ``callback(late_s)`` on ``clock``, ``late_s`` being how many
    seconds after its due time it ran."""

    __slots__ = ("_callback", "_clock", "_handle", "_when")

    def __init__(self, clock: Clock, callback: Callable[[float], None]) -> None:
        self._clock = clock
        self._callback = callback
        self._handle: TimerHandle | None = None
        self._when = math.nan

    def arm(self, when: float) -> None:
        """Call back at ``when`` (s) instead of any time set before."""
        if self._handle is not None and self._when == when:
            return
        self.disarm()
        self._when = when
        self._handle = self._clock.call_at(when, self._fire)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._callback(max(0.0, self._clock.now() - self._when))


class _Waiter:
    __slots__ = ("future", "queued", "tokens")

    def __init__(self, tokens: int, future: asyncio.Future[LocalTicket]) -> None:
        self.tokens = tokens
        self.future = future
        self.queued = True


def _unanswered(tokens: int, tpm: int | None = None) -> float:
    """What the log holds for a request of ``tokens`` not yet answered: the charge and its
    margin, but never more than ``tpm`` (the log's limit), so that one alone always fits."""
    held = tokens * (1.0 + _UNANSWERED_MARGIN)
    return held if tpm is None else min(held, tpm)


def effective_tokens(nominal: int, headroom: float) -> int:
    # Whole units keep the sliding-log arithmetic exact; the epsilon stops 0.98 * 500_000 from
    # flooring to 489_999. Never below one, or a nominal limit of 1 could admit nothing.
    return max(1, math.floor(nominal * (1.0 - headroom) + 1e-9))


def effective_requests(nominal: int, headroom: float) -> int:
    # Requests are counted alike by both sides, so headroom guards only against timing, which
    # the log's edge margin covers; rounding it up to a whole request would cost 10% of an
    # RPM of 10 (9 per window, not 10).
    return nominal - math.floor(nominal * headroom + 1e-9)


def process_age_s() -> float:
    """Seconds since this process started (Linux; 0.0 where it cannot be read)."""
    try:
        with open("/proc/self/stat", "rb") as stat, open("/proc/uptime", "rb") as uptime:
            fields = stat.read().rsplit(b")", 1)[1].split()
            since_boot = float(uptime.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in ticks
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, since_boot - started)


class _Allowance:
    """What one model's limits allow, and when: the sliding log, a pace per resource, a hold the
    server asked for, and the memory of the last 429. It decides and charges; it never waits
    (the line of waiters and the timer are :class:`RateLimiter`'s).

    ``limits`` gives the nominal limits per window, which the log holds; the paces run at the
    effective ones, nominal * (1 - headroom), tokens rounded down and requests up.

    ``startup_s`` is how long the process took to start. A sliding-window server allows a whole
    window's quota at once, so the pace may run that far ahead at first (at most a tenth of a
    window, and only when the process is younger than a window): the first window's quota pays
    for the start-up.
    """

    def __init__(self, limits: RateLimits, startup_s: float) -> None:
        self.window_s = limits.window_s
        # The log holds the account's own limits: an entry leaves it a window after the server
        # can have counted it at the latest, so no window of the server's can hold more. The
        # headroom is the pace's: a log held to it too would bind the pace, as entries stay a
        # latency longer than a window, and cost that latency's share of every window.
        self.log_tokens, self.log_requests = limits.tpm, limits.rpm
        self.max_tokens = effective_tokens(limits.tpm, limits.headroom)
        self.max_requests = effective_requests(limits.rpm, limits.headroom)
        self.tpm = _Pace(self.max_tokens, limits.window_s, limits.burst_allowance_s)
        self.rpm = _Pace(self.max_requests, limits.window_s, limits.burst_allowance_s)
        self.log = _Log()
        self.unanswered_s = limits.window_s * (1.0 + limits.headroom / 2)
        fresh = 0.0 <= startup_s < limits.window_s
        self.startup_s = min(startup_s, _STARTUP_SHARE * limits.window_s) if fresh else 0.0
        self.last_429_at = -math.inf
        self.hold_until = -math.inf

    def start(self, now: float) -> None:
        """Called before each admission: starts the paces once, and prunes the log."""
        self.tpm.start(now, self.startup_s)
        self.rpm.start(now, self.startup_s)
        self.log.prune(now)

    def hold(self, admitted_elsewhere: list[LocalTicket], now: float) -> None:
        """Count in the log ``admitted_elsewhere``, in the order they leave it; the paces start
        at ``now`` with nothing banked."""
        self.tpm.start(now, 0.0)
        self.rpm.start(now, 0.0)
        for ticket in admitted_elsewhere:
            ticket._pending = False  # held as the other limiter counted it
            self.log.add(ticket)

    def ready_at(self, tokens: int, now: float) -> float:
        """The earliest time (s) a request of ``tokens`` may pass, given the state at ``now``."""
        return max(
            self.hold_until,
            self.rpm.ready_at(),
            self.tpm.ready_at(),
            self.log.ready_at(
                _unanswered(tokens, self.log_tokens), 1, self.log_tokens, self.log_requests, now
            ),
        )

    def admit(self, ticket: LocalTicket, now: float, late_s: float) -> None:
        """Charge ``ticket`` at ``now``, let in by a timer that fired ``late_s`` seconds late."""
        idle_s = self._unspent_s(now)
        self.log.add(ticket)
        # The pace goes on from when the timer was due: a busy event loop's lateness is then not
        # quota lost for good (the log still holds every window to the limit).
        self.rpm.charge(ticket.requests, now - late_s, idle_s)
        self.tpm.charge(ticket.tokens, now - late_s, idle_s)

    def spares(self, head: int, head_at: float, tokens: int, at: float) -> bool:
        """True if a request of ``tokens`` admitted at ``at`` leaves a request of ``head``
        tokens, due at ``head_at``, due no later: neither pace would then pass it later, nor
        would the log (the newcomer is still in it at ``head_at`` unless gone by then)."""
        idle_s = self._unspent_s(at)
        if self.tpm.after(tokens, at, idle_s) - self.tpm.burst_s > head_at:
            return False
        if self.rpm.after(1, at, idle_s) - self.rpm.burst_s > head_at:
            return False
        if at + self.unanswered_s <= head_at:
            return True
        # The newcomer is held in full, as an entry (it may not be answered by then).
        both = _unanswered(head, self.log_tokens) + _unanswered(tokens)
        return self.log.ready_at(both, 2, self.log_tokens, self.log_requests, at) <= head_at

    def _unspent_s(self, now: float) -> float:
        """How many seconds of pace left unspent are kept: half a window, and none within a
        window of a 429 (the server said no). The log, the hard guarantee, still admits only
        what fits the current window: this only lets the pace catch up where it fell behind."""
        if now - self.last_429_at < self.window_s:
            return 0.0
        return _IDLE_SHARE * self.window_s

    def recharge(self, ticket: LocalTicket, tokens: int, requests: int, now: float) -> None:
        """Correct ``ticket``'s charge to ``tokens`` and ``requests``, the server's count (or
        nothing, refunded), in the log and the pace."""
        self.log.counted(ticket)
        # Only a ticket still in the log matters: an older one has left both the window and,
        # since its pace was spent long ago, any debt worth correcting.
        if ticket._live:
            self.log.tokens += tokens - ticket.tokens
            self.log.requests += requests - ticket.requests
            if ticket._paced:
                self.tpm.adjust(tokens - ticket.tokens, now)
                self.rpm.adjust(requests - ticket.requests, now)
        ticket.tokens = tokens
        ticket.requests = requests

    def unpace(self, ticket: LocalTicket, now: float) -> None:
        """Give ``ticket``'s charge back to the paces; the log keeps it (with its margin, as
        its count is unknown) until a window after ``now``: the server, if it counted the
        request, did so on its arrival, at the latest now, however late the event loop sent it
        after its admission."""
        if ticket._live and ticket._paced:
            self.tpm.adjust(-ticket.tokens, now)
            self.rpm.adjust(-ticket.requests, now)
        ticket._paced = False
        ticket._expires_at = max(ticket._expires_at, now + self.window_s)

    def rate_limited(self, limit: str | None, retry_after_s: float | None, now: float) -> None:
        """A 429 at ``now``; see :meth:`RateLimiter.on_rate_limited`.

        A 429 alone (none in the window before it) costs no cut: a job that keeps to its own log
        meets the server's limit only at a window's edge, by a difference of latency or a count
        that differs a little, and the refused request's charge, kept, already slows the pace by
        its size. A second within a window means someone else spends the quota too: then the
        cut, and every further one within a window of the last cuts again."""
        alone = now - self.last_429_at >= self.window_s
        self.last_429_at = now
        if not alone:
            if limit != "rpm":
                self.tpm.cut(now)
            if limit != "tpm":
                self.rpm.cut(now)
        if retry_after_s is not None and retry_after_s > 0:
            self.hold_until = max(self.hold_until, now + retry_after_s)


class RateLimiter:
    """The local :class:`Limiter`: admits requests of one model under its RPM and TPM, within
    one process (see the module docstring).

    ``limits`` gives the nominal limits per ``window_s`` seconds; ``clock`` defaults to the
    running loop's clock; ``startup_s`` is how long the process took to start before this
    limiter was made (pass :func:`process_age_s` for a job that starts the process): see
    :class:`_Allowance`, which decides what the limits allow. This class keeps the line of
    waiters and the one timer that wakes it.
    """

    def __init__(
        self, limits: RateLimits, clock: Clock | None = None, *, startup_s: float = 0.0
    ) -> None:
        self._clock: Clock = clock if clock is not None else LoopClock()
        self._window_s = limits.window_s
        self._nominal_tokens = limits.tpm
        self._allowance = _Allowance(limits, startup_s)
        self.max_tokens = self._allowance.max_tokens
        self.max_requests = self._allowance.max_requests
        self._queue: deque[_Waiter] = deque()
        self._timer = _Timer(self._clock, self._pump)
        self._ids = itertools.count()

    # -- what progress bars and ETAs read ----------------------------------------------------

    @property
    def tokens_per_s(self) -> float:
        """The current token pace in tokens per second (lowered for a while after a TPM 429)."""
        return self._allowance.tpm.rate(self._clock.now())

    @property
    def requests_per_s(self) -> float:
        """The current request pace in requests per second (lowered for a while after a 429)."""
        return self._allowance.rpm.rate(self._clock.now())

    @property
    def queued(self) -> int:
        """How many callers are waiting in :meth:`acquire`."""
        return len(self._queue)

    # -- admission -------------------------------------------------------------------------

    async def acquire(self, tokens: int) -> LocalTicket:
        """Wait, in arrival order (see the module docstring), until one request of ``tokens``
        tokens may be sent; the ticket is charged from then on. A request over the effective TPM
        of a window but within the nominal one waits for an empty window and is charged the whole
        effective window. Raises ConfigError if ``tokens`` exceeds the nominal TPM (it could never
        pass) and InputError if it is negative. If cancelled, the caller leaves the line (or, if
        just admitted, its charge is refunded)."""
        tokens = self._check(tokens)
        now = self._clock.now()
        self._allowance.start(now)
        if not self._queue and self._allowance.ready_at(tokens, now) <= now:
            return self._admit(tokens, now)
        waiter = _Waiter(tokens, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        if len(self._queue) <= _BACKFILL_DEPTH + 1:  # the head, or one that may go before it
            self._pump()
        admitted = False
        try:
            ticket = await waiter.future
            admitted = True
            return ticket
        finally:
            if not admitted:
                self._abandon(waiter)

    def hold(self, admissions: Iterable[tuple[int, float]]) -> None:
        """Count in the log requests admitted elsewhere: (tokens, when each leaves it, on this
        limiter's clock), as when this limiter takes over from another whose requests a server's
        window still holds; the pace starts now, with nothing banked."""
        now = self._clock.now()
        held = [
            LocalTicket(self, str(next(self._ids)), tokens, now, leaves_at)
            for tokens, leaves_at in sorted(admissions, key=lambda admission: admission[1])
            if leaves_at > now
        ]
        self._allowance.hold(held, now)

    def _check(self, tokens: int) -> int:
        """``tokens`` as charged; raises for a request that could never pass."""
        if tokens < 0:
            raise InputError(f"a request cannot have a negative token count ({tokens})")
        if tokens > self._nominal_tokens:
            raise ConfigError(
                f"a request of {tokens} tokens exceeds the TPM of {self._nominal_tokens} "
                f"per {self._window_s:g} s window: it could never be admitted"
            )
        return min(tokens, self.max_tokens)

    def _admit(self, tokens: int, now: float, late_s: float = 0.0) -> LocalTicket:
        """Admit a request at ``now``, by a timer that fired ``late_s`` seconds late."""
        expires_at = now + self._allowance.unanswered_s
        ticket = LocalTicket(self, str(next(self._ids)), tokens, now, expires_at)
        self._allowance.admit(ticket, now, late_s)
        return ticket

    def _abandon(self, waiter: _Waiter) -> None:
        """Undo a waiter whose caller was cancelled (or failed) around the await."""
        if waiter.queued:
            self._queue.remove(waiter)
            waiter.queued = False
        elif waiter.future.done() and not waiter.future.cancelled():
            self._refund(waiter.future.result())  # admitted, but the request will not be sent
            return
        self._pump()

    # -- the one timer -----------------------------------------------------------------------

    def _pump(self, late_s: float = 0.0) -> None:
        """Admit waiters from the head while they fit, then those behind it that put it off by
        nothing, and arm one timer for the next one; ``late_s``: how late the timer that calls
        it fired."""
        now = self._clock.now()
        self._allowance.log.prune(now)
        while self._queue:
            head = self._queue[0]
            when = now if head.future.done() else self._allowance.ready_at(head.tokens, now)
            if when > now:
                self._timer.arm(self._backfill(head, when, now))
                return
            self._queue.popleft()
            head.queued = False
            if not head.future.done():  # done: cancelled, its task has not cleaned up yet
                head.future.set_result(self._admit(head.tokens, now, late_s))
        self._timer.disarm()

    def _backfill(self, head: _Waiter, head_at: float, now: float) -> float:
        """Admit the waiters behind ``head`` (due at ``head_at``) that can pass now without
        putting it off; returns when one more of them, or the head, can pass (s).

        A long request waits for room in the window; the room it will not need (a larger share
        than it needs often leaves at once, as requests admitted together leave together) would
        otherwise stay unused until it passes: a tenth of a Qwen3 job on a 60,000-token window."""
        wake = head_at
        for waiter in list(itertools.islice(self._queue, 1, _BACKFILL_DEPTH + 1)):
            if waiter.future.done():
                continue  # cancelled: its task has not cleaned up yet
            at = max(now, self._allowance.ready_at(waiter.tokens, now))
            if at >= wake or not self._allowance.spares(head.tokens, head_at, waiter.tokens, at):
                continue
            if at > now:
                wake = at
                continue
            self._queue.remove(waiter)
            waiter.queued = False
            waiter.future.set_result(self._admit(waiter.tokens, now))
        return wake

    # -- after the response ------------------------------------------------------------------

    async def settle(self, ticket: Ticket, used_tokens: int) -> None:
        """Correct ``ticket``'s charge to ``used_tokens``, the server's count, in both the window
        and the pace; may admit waiters if the charge fell. Does nothing for a refunded ticket.
        Raises InputError for a negative count and ValueError for another limiter's ticket."""
        own = self._own(ticket)
        if used_tokens < 0:
            raise InputError(f"a response cannot have a negative token count ({used_tokens})")
        if not own.refunded:
            now = self._clock.now()
            self._allowance.log.prune(now)  # one that has left the window stays out
            self._allowance.recharge(own, used_tokens, own.requests, now)
            # The server counted it from its arrival, at the latest now.
            own._expires_at = now + self._window_s
            if self._queue:  # else no one waits, and no timer is set (``_pump`` disarmed it)
                self._pump()

    async def refund(self, ticket: Ticket) -> None:
        """Remove ``ticket``'s whole charge: its request never reached the server (connection
        refused, cancelled before sending). Idempotent; raises ValueError for another limiter's
        ticket."""
        self._refund(self._own(ticket))

    def _refund(self, ticket: LocalTicket) -> None:
        if not ticket.refunded:
            self._allowance.recharge(ticket, 0, 0, self._clock.now())
            self._pump()

    async def unanswered(self, ticket: Ticket) -> None:
        """``ticket``'s request was sent and its answer lost (a reset, a 504, a stall given up
        on): the server may have counted it. The log keeps its charge until it leaves the window
        (so no 429 can follow if the server did count it), and the pace gets it back (so the
        request sent again does not cost the quota twice if it did not; the pace spends it only
        as far as the log has room). Idempotent; raises ValueError for another limiter's
        ticket."""
        own = self._own(ticket)
        if own._paced and not own.refunded:
            self._allowance.unpace(own, self._clock.now())
            self._pump()

    def _own(self, ticket: Ticket) -> LocalTicket:
        if not isinstance(ticket, LocalTicket) or ticket._limiter is not self:
            raise ValueError("this ticket was issued by another RateLimiter")
        return ticket

    async def on_rate_limited(
        self, limit: str | None = None, retry_after_s: float | None = None
    ) -> None:
        """React to a 429 that came anyway: slow the named pace (``"tpm"`` or ``"rpm"``; None or
        anything else: both) to 0.8 of its current rate (at least 0.25 of the effective limit, at
        most one cut per tenth of a window), which then climbs back linearly to full over one
        window. With ``retry_after_s`` (seconds), hold every admission until that long from now.
        A 429 alone (none in the window before it) costs no cut."""
        self._allowance.rate_limited(limit, retry_after_s, self._clock.now())
        self._pump()
