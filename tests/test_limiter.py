"""RateLimiter: hard window guarantee, pacing, FIFO, settle/refund, 429 handling, cancellation.

Time only moves when a test moves a ManualClock; ``spin`` lets the woken tasks run. Nothing here
sleeps in real time except the one LoopClock smoke test, which asserts no durations.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pytest

from sfembed._config import RateLimits
from sfembed._exceptions import ConfigError, InputError
from sfembed._limiter import Limiter, LocalTicket, ManualClock, RateLimiter, TimerHandle
from sfembed._types import Ticket

# -- helpers ---------------------------------------------------------------------------------


async def spin(rounds: int = 5) -> None:
    """Let every task that was woken run up to its next real suspension."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def run_until(clock: ManualClock, until: float) -> None:
    """Jump from one due timer to the next (running the woken tasks in between) up to ``until``."""
    while True:
        await spin()
        due = clock.next_at
        if due is None or due > until:
            break
        clock.advance_to(due)
    clock.advance_to(until)
    await spin()


async def clock_sleep(clock: ManualClock, seconds: float) -> None:
    """Sleep ``seconds`` of ManualClock time."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    handle = clock.call_at(clock.now() + seconds, wake)
    try:
        await done
    finally:
        handle.cancel()


def make(clock: ManualClock, **limits: Any) -> RateLimiter:
    return RateLimiter(RateLimits(**{"headroom": 0.0, **limits}), clock)


T = TypeVar("T")


def start(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    return asyncio.create_task(coro)


def window_sums(tickets: list[LocalTicket], window_s: float) -> tuple[int, int]:
    """The largest (tokens, requests) charged within any window_s seconds ending at an
    admission; same expiry rule as the limiter (``at + window_s > t`` is still inside)."""
    times = sorted({t.admitted_at for t in tickets})
    inside = [[u for u in tickets if u.admitted_at <= t < u.admitted_at + window_s] for t in times]
    tokens = max((sum(u.tokens for u in group) for group in inside), default=0)
    requests = max((sum(u.requests for u in group) for group in inside), default=0)
    return tokens, requests


async def saturate(
    limiter: RateLimiter, clock: ManualClock, size: Callable[[], int], workers: int, until: float
) -> list[LocalTicket]:
    """``workers`` callers that ask again as soon as they are admitted, until ``until`` s; each
    request is answered at once, counted as charged."""
    admitted: list[LocalTicket] = []

    async def worker() -> None:
        while True:
            ticket = await limiter.acquire(size())
            await limiter.settle(ticket, ticket.tokens)
            admitted.append(ticket)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await run_until(clock, until)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return admitted


def per_window(tickets: list[LocalTicket], window_s: float, count: int, tokens: bool) -> list[int]:
    sums = [0] * count
    for ticket in tickets:
        k = int(ticket.admitted_at // window_s)
        if k < count:
            sums[k] += ticket.tokens if tokens else ticket.requests
    return sums


# -- ManualClock -----------------------------------------------------------------------------


def test_manual_clock_runs_due_callbacks_in_order_and_skips_cancelled() -> None:
    clock = ManualClock(start=10.0)
    fired: list[tuple[str, float]] = []
    clock.call_at(12.0, lambda: fired.append(("b", clock.now())))
    clock.call_at(11.0, lambda: fired.append(("a", clock.now())))
    clock.call_at(11.5, lambda: fired.append(("x", clock.now()))).cancel()
    clock.call_at(30.0, lambda: fired.append(("late", clock.now())))
    clock.advance(5.0)
    assert fired == [("a", 11.0), ("b", 12.0)]
    assert clock.now() == 15.0
    assert clock.next_at == 30.0
    with pytest.raises(ValueError, match="back in time"):
        clock.advance(-1.0)


# -- input checks ----------------------------------------------------------------------------


async def test_request_larger_than_a_window_raises_config_error() -> None:
    limiter = make(ManualClock(), tpm=1000, rpm=10)
    with pytest.raises(ConfigError, match="could never be admitted"):
        await limiter.acquire(1001)
    with pytest.raises(InputError):
        await limiter.acquire(-1)
    assert (await limiter.acquire(1000)).tokens == 1000


async def test_headroom_lowers_effective_limits() -> None:
    limiter = RateLimiter(RateLimits(rpm=2000, tpm=500_000, headroom=0.02), ManualClock())
    assert (limiter.max_requests, limiter.max_tokens) == (1960, 490_000)
    assert limiter.tokens_per_s == pytest.approx(490_000 / 60)
    assert limiter.requests_per_s == pytest.approx(1960 / 60)
    with pytest.raises(ConfigError):
        await limiter.acquire(500_001)
    # Requests are counted alike on both sides: headroom never rounds away a whole one.
    small = RateLimiter(RateLimits(rpm=10, tpm=1000, headroom=0.02), ManualClock())
    assert small.max_requests == 10


async def test_request_within_the_nominal_window_waits_for_an_empty_one() -> None:
    # An item that fits the account's TPM but not the headroom-lowered one still goes, alone.
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(rpm=100, tpm=1000, window_s=10.0, headroom=0.1), clock)
    first = await limiter.acquire(300)
    big = start(limiter.acquire(1000))
    await run_until(clock, 5.0)
    assert not big.done()
    await run_until(clock, 20.0)
    assert big.result().tokens == limiter.max_tokens == 900
    assert big.result().admitted_at >= first.admitted_at + 10.0


async def test_zero_token_request_still_counts_as_a_request() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=2, tpm=100, window_s=10.0, burst_s=10.0)
    await limiter.acquire(0)
    await limiter.acquire(0)
    third = start(limiter.acquire(0))
    await run_until(clock, 9.999)
    assert not third.done()
    await run_until(clock, 10.0)
    assert third.result().admitted_at == 10.0


async def test_foreign_ticket_is_refused() -> None:
    clock = ManualClock()
    mine, other = make(clock), make(clock)
    ticket = await other.acquire(5)
    with pytest.raises(ValueError, match="another RateLimiter"):
        await mine.settle(ticket, 3)
    with pytest.raises(ValueError, match="another RateLimiter"):
        await mine.refund(ticket)


async def test_local_limiter_is_a_limiter_with_unique_ticket_ids() -> None:
    clock = ManualClock()
    limiter: Limiter = make(clock)  # the interface the engine is written against
    waiting = [start(limiter.acquire(10)) for _ in range(5)]
    await run_until(clock, 60.0)
    tickets = [task.result() for task in waiting]
    assert len({ticket.id for ticket in tickets}) == 5
    assert all(isinstance(ticket, Ticket) and ticket.tokens == 10 for ticket in tickets)
    await limiter.settle(tickets[0], 7)
    await limiter.settle(tickets[0], 7)  # settling twice to the same count changes nothing
    assert (tickets[0].tokens, tickets[0].requests) == (7, 1)
    with pytest.raises(ValueError, match="another RateLimiter"):
        await limiter.refund(Ticket("made-up", 10))  # not one it issued


# -- pacing and utilisation ------------------------------------------------------------------


async def test_no_burst_of_a_whole_window_at_start() -> None:
    clock = ManualClock()
    burst_s = 1.0
    limits = RateLimits(rpm=2000, tpm=500_000, headroom=0.02, burst_s=burst_s)
    limiter = RateLimiter(limits, clock)
    admitted = await saturate(limiter, clock, lambda: 1000, workers=200, until=1.0)
    pace_t, pace_r = limiter.tokens_per_s, limiter.requests_per_s
    at_once = [t for t in admitted if t.admitted_at == 0.0]
    assert sum(t.tokens for t in at_once) <= pace_t * burst_s + 1000
    assert len(at_once) <= pace_r * burst_s + 1
    first_second = [t for t in admitted if t.admitted_at < 1.0]
    assert sum(t.tokens for t in first_second) <= pace_t * (1 + burst_s) + 1000
    assert len(first_second) <= pace_r * (1 + burst_s) + 1


@pytest.mark.parametrize(
    ("name", "limits", "low", "high", "tokens_bound"),
    [
        ("tpm-bound", RateLimits(rpm=2000, tpm=100_000), 200, 800, True),
        ("rpm-bound", RateLimits(rpm=300, tpm=1_000_000), 100, 500, False),
    ],
)
async def test_steady_state_uses_the_whole_effective_limit(
    name: str, limits: RateLimits, low: int, high: int, tokens_bound: bool
) -> None:
    clock, rng = ManualClock(), random.Random(name)
    limiter = RateLimiter(limits, clock)
    size = lambda: rng.randint(low, high)  # noqa: E731
    admitted = await saturate(limiter, clock, size, workers=32, until=10 * limits.window_s)
    limit = limiter.max_tokens if tokens_bound else limiter.max_requests
    sums = per_window(admitted, limits.window_s, 10, tokens_bound)
    # The pace holds the effective limit; the log, the hard guarantee, the account's own.
    assert max(sums) <= (limits.tpm if tokens_bound else limits.rpm)
    assert min(sums) >= 0.97 * limit, [s / limit for s in sums]
    tokens, requests = window_sums(admitted, limits.window_s)
    assert tokens <= limits.tpm
    assert requests <= limits.rpm


async def test_start_up_is_paid_from_the_first_window_within_a_tenth_of_it() -> None:
    limits = RateLimits(rpm=1000, tpm=1000, window_s=10.0, headroom=0.0, burst_s=0.0)
    at_once = []
    for startup_s in (0.0, 0.5, 5.0, 10.0):
        clock = ManualClock(100.0)
        limiter = RateLimiter(limits, clock, startup_s=startup_s)
        tasks = [start(limiter.acquire(10)) for _ in range(50)]
        await run_until(clock, 100.0)
        at_once.append(sum(task.done() for task in tasks))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # 100 tokens/s: 0.5 s of start-up is 50 tokens ahead; at most a tenth of the window (1 s);
    # none for a process older than a window (a library user's long-lived one).
    assert at_once == [1, 6, 11, 1]


async def test_pace_unspent_while_nobody_waited_is_kept_up_to_half_a_window() -> None:
    limits = RateLimits(rpm=1000, tpm=1000, window_s=10.0, headroom=0.0, burst_s=0.0)
    at_once = []
    for idle_s in (0.0, 3.0, 100.0):
        clock = ManualClock()
        limiter = RateLimiter(limits, clock)
        await limiter.acquire(10)  # 100 tokens/s: the pace is 0.1 s ahead
        await run_until(clock, 0.1 + idle_s)
        tasks = [start(limiter.acquire(10)) for _ in range(80)]
        await spin()
        at_once.append(sum(task.done() for task in tasks))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # None idle: one at a time. Idle 3 s: those 3 s of pace (300 tokens) at once, and the one
    # due now. Idle far longer: half a window of pace (500 tokens), not the whole log's room.
    assert at_once[0] == 1
    assert 30 <= at_once[1] <= 31
    assert 50 <= at_once[2] <= 51


async def test_log_keeps_an_entry_a_margin_past_the_window() -> None:
    # The server's arrival times lag our admissions by a latency that varies: an entry stays
    # half the headroom's share of a window longer than the window.
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(rpm=1, tpm=1000, window_s=10.0, headroom=0.1), clock)
    await limiter.acquire(1)
    second = start(limiter.acquire(1))
    await run_until(clock, 10.4)
    assert not second.done()
    await run_until(clock, 10.5)
    assert second.result().admitted_at == 10.5


async def test_an_answered_request_stays_a_window_after_its_answer() -> None:
    # The server counted it at some moment before its answer: a window from the answer is safe
    # however late the request was really sent.
    clock = ManualClock()
    limiter = make(clock, rpm=1, tpm=1000, window_s=10.0)
    ticket = await limiter.acquire(1)
    second = start(limiter.acquire(1))
    await run_until(clock, 0.3)
    await limiter.settle(ticket, 1)
    await run_until(clock, 10.2)
    assert not second.done()
    await run_until(clock, 10.3)
    assert second.result().admitted_at == pytest.approx(10.3)


class LateClock(ManualClock):
    """A ManualClock whose timers fire ``lag_s`` late, as a busy event loop's do."""

    def __init__(self, lag_s: float) -> None:
        super().__init__()
        self.lag_s = lag_s

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        return super().call_at(when + self.lag_s, callback)


async def test_late_timers_cost_no_quota() -> None:
    # Timers 0.2 s late with no burst allowance: the pace goes on from where each waiter was
    # due, so a saturated job still gets the whole rate, and never more than a window allows.
    # (The log holds the account's limit, 2% over the pace: the pace is what is tested.)
    clock = LateClock(0.2)
    limits = RateLimits(rpm=10_000, tpm=6000, window_s=6.0, headroom=0.02, burst_s=0.0)
    limiter = RateLimiter(limits, clock)
    admitted = await saturate(limiter, clock, lambda: 100, workers=8, until=60.0)
    sums = per_window(admitted, limits.window_s, 10, tokens=True)
    assert min(sums[1:]) >= 0.95 * 6000, sums
    assert window_sums(admitted, limits.window_s)[0] <= 6000


class CountingClock(ManualClock):
    """A ManualClock that counts the callbacks scheduled and neither fired nor cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[tuple[TimerHandle, list[bool]]] = []

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        fired = [False]

        def fire() -> None:
            fired[0] = True
            callback()

        handle = super().call_at(when, fire)
        self.handles.append((handle, fired))
        return handle

    @property
    def live(self) -> int:
        return sum(not fired[0] and not getattr(h, "cancelled", False) for h, fired in self.handles)


async def test_one_timer_at_a_time_and_log_holds_one_window() -> None:
    clock = CountingClock()
    limiter = make(clock, rpm=100, tpm=10_000, window_s=10.0)
    tasks = [start(limiter.acquire(300)) for _ in range(200)]
    for _ in range(50):
        await run_until(clock, clock.now() + 0.5)
        assert clock.live <= 1
        assert len(limiter._allowance.log.entries) <= limiter.max_requests
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert limiter.queued == 0
    assert clock.live == 0


# -- FIFO ------------------------------------------------------------------------------------


async def test_fifo_large_request_is_not_put_off_by_small_ones_behind_it() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=1000, tpm=1000, window_s=10.0, burst_s=10.0)
    order: list[str] = []

    async def ask(name: str, tokens: int) -> LocalTicket:
        ticket = await limiter.acquire(tokens)
        await limiter.settle(ticket, tokens)  # answered at once, counted as charged
        order.append(name)
        return ticket

    small = [start(ask(f"s{i}", 100)) for i in range(5)]
    await spin()
    clock.advance(1.0)
    # Held at 805 until answered (15% more), it waits for the first five to leave at 10 s.
    large = start(ask("L", 700))
    later = [start(ask(f"t{i}", 100)) for i in range(5)]
    await spin()
    # t0 takes room the large one will not need (at 10 s: t0's 100 + 805 fit); t1 would put
    # it off, so it and those after it wait behind it although they would fit now.
    assert order == [*(f"s{i}" for i in range(5)), "t0"]
    assert limiter.queued == 5
    await run_until(clock, 30.0)
    assert order == [*(f"s{i}" for i in range(5)), "t0", "L", *(f"t{i}" for i in range(1, 5))]
    assert large.result().admitted_at == 10.0
    assert all(t.done() for t in small + later)


async def test_a_request_behind_one_that_waits_goes_first_only_if_it_leaves_in_time() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=1000, tpm=1000, window_s=10.0)  # no burst: 100 tokens a second

    async def answered(tokens: int) -> LocalTicket:
        ticket = await limiter.acquire(tokens)
        await limiter.settle(ticket, tokens)
        return ticket

    await answered(500)
    # Until answered, a request is held in the log at 15% more: the head at 805.
    head = start(answered(700))  # the pace would let it pass at 5 s, the log at 10 s
    wider = start(answered(200))  # at 10 s, 230 + 805 would not fit: it waits
    narrow = start(answered(100))  # at 10 s, 115 + 805 fit: it goes when the pace lets it
    await run_until(clock, 30.0)
    assert narrow.result().admitted_at == 5.0
    assert head.result().admitted_at == 10.0
    assert wider.result().admitted_at == 15.0  # 700 + 230 fit once the narrow one has left


# -- settle and refund -----------------------------------------------------------------------


async def test_settle_down_admits_a_waiter_at_once() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=100, tpm=1000, window_s=10.0, burst_s=10.0)
    first = await limiter.acquire(800)
    waiter = start(limiter.acquire(400))
    await spin()
    assert not waiter.done()
    await limiter.settle(first, 500)
    await spin()
    assert waiter.result().admitted_at == 0.0
    assert first.tokens == 500


async def test_settle_up_delays_the_next_request() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=100, tpm=1000, window_s=10.0, burst_s=10.0)
    first = await limiter.acquire(500)
    await limiter.settle(first, 900)
    waiter = start(limiter.acquire(200))
    await run_until(clock, 9.99)
    assert not waiter.done()
    await run_until(clock, 20.0)
    assert waiter.result().admitted_at == 10.0


async def test_refund_removes_tokens_and_the_request() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=1, tpm=1000, window_s=10.0, burst_s=10.0)
    first = await limiter.acquire(1000)
    waiter = start(limiter.acquire(1000))
    await spin()
    assert not waiter.done()
    await limiter.refund(first)
    await spin()
    assert waiter.result().admitted_at == 0.0
    assert (first.tokens, first.requests, first.refunded) == (0, 0, True)
    await limiter.refund(first)  # idempotent
    await limiter.settle(first, 700)  # a refunded request never reached the server
    assert first.tokens == 0


async def test_a_request_not_yet_answered_is_held_with_a_margin_until_its_count_comes() -> None:
    # The server's count of a request is known only from its answer, and may exceed the charge.
    clock = ManualClock()
    limiter = make(clock, rpm=100, tpm=1000, window_s=10.0, burst_s=10.0)  # the log binds
    first = await limiter.acquire(640)  # held at 736 (15% more) until answered
    second = await limiter.acquire(150)  # 736 + 172.5 fit
    third = start(limiter.acquire(100))  # 736 + 172.5 + 115 do not, though 890 tokens would
    await spin()
    assert not third.done()
    await limiter.settle(first, 640)  # counted: 640 + 172.5 + 115 fit
    await spin()
    assert third.result().admitted_at == 0.0
    assert second.tokens == 150


async def test_a_request_alone_fits_whatever_its_margin() -> None:
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(rpm=100, tpm=1000, window_s=10.0, burst_s=10.0), clock)
    ticket = await limiter.acquire(limiter.max_tokens)  # 980 * 1.15 > 1,000, alone in the window
    assert ticket.admitted_at == 0.0


async def test_a_lost_answer_stays_in_the_log_a_window_after_it_was_lost() -> None:
    # The server counts a request on arrival, which a busy event loop may delay after the
    # admission: if it counted it, it did so before the answer was lost.
    clock = ManualClock()
    limiter = make(clock, rpm=100, tpm=1000, window_s=10.0, burst_s=10.0)
    lost = await limiter.acquire(600)
    await run_until(clock, 3.0)
    await limiter.unanswered(lost)
    waiter = start(limiter.acquire(400))  # 690 + 460 > 1,000 while the lost one is in the log
    await run_until(clock, 30.0)
    assert waiter.result().admitted_at == 13.0


async def test_an_unanswered_request_keeps_its_window_and_gives_its_pace_back() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=100, tpm=1000, window_s=10.0)  # no burst: 100 tokens a second
    lost = await limiter.acquire(400)
    paced = start(limiter.acquire(400))
    await spin()
    assert not paced.done()  # the pace holds it until 4 s
    await limiter.unanswered(lost)
    await limiter.unanswered(lost)  # idempotent: the pace is given back once
    await spin()
    assert paced.result().admitted_at == 0.0
    await limiter.settle(paced.result(), 400)
    small = start(limiter.acquire(50))  # the pace again: 4 s of it were spent at 0
    # The log holds the lost one at 460 (its count unknown) and the answered one at 400.
    third = start(limiter.acquire(400))  # 460 + 400 + 50 + 460 > 1,000 while the lost one is in
    await run_until(clock, 30.0)
    assert small.result().admitted_at == 4.0
    assert third.result().admitted_at == 10.0  # when the lost one leaves the window
    assert (lost.tokens, lost.requests, lost.refunded) == (400, 1, False)


async def test_settle_after_the_window_changes_nothing_live() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=100, tpm=1000, window_s=10.0, burst_s=10.0)
    old = await limiter.acquire(1000)
    clock.advance(10.0)
    await limiter.settle(
        old, 400
    )  # left the window already: must not give back room it never holds
    assert old.tokens == 400
    await limiter.acquire(1000)
    waiter = start(limiter.acquire(1))
    await spin()
    assert not waiter.done()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


# -- 429 -------------------------------------------------------------------------------------


async def test_rate_limited_cuts_only_the_named_limit_then_recovers() -> None:
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(), clock)
    tokens, requests = limiter.tokens_per_s, limiter.requests_per_s
    await limiter.on_rate_limited("tpm")  # the window's first: an edge, no cut
    assert (limiter.tokens_per_s, limiter.requests_per_s) == (tokens, requests)
    await limiter.on_rate_limited("tpm")
    assert limiter.tokens_per_s == pytest.approx(0.8 * tokens)
    assert limiter.requests_per_s == requests
    await limiter.on_rate_limited("tpm")  # same moment: one overshoot, one cut
    assert limiter.tokens_per_s == pytest.approx(0.8 * tokens)
    clock.advance(30.0)
    assert limiter.tokens_per_s == pytest.approx(0.9 * tokens)
    clock.advance(30.0)
    assert limiter.tokens_per_s == tokens
    await limiter.on_rate_limited("rpm")  # a window after the last 429: alone again
    assert limiter.requests_per_s == requests
    await limiter.on_rate_limited("rpm")
    assert limiter.tokens_per_s == tokens
    assert limiter.requests_per_s == pytest.approx(0.8 * requests)


async def test_repeated_429s_cut_step_by_step_down_to_a_floor() -> None:
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(window_s=60.0), clock)
    nominal = limiter.tokens_per_s
    await limiter.on_rate_limited(None)  # free
    await limiter.on_rate_limited(None)
    clock.advance(6.0)  # one tenth of a window later: climbed to 0.82, cut to 0.656
    await limiter.on_rate_limited(None)
    assert limiter.tokens_per_s == pytest.approx(0.656 * nominal)
    for _ in range(100):
        clock.advance(6.0)
        await limiter.on_rate_limited("tpm")
    assert limiter.tokens_per_s >= 0.25 * nominal - 1e-9
    assert limiter.tokens_per_s < 0.3 * nominal


async def test_tpm_cut_does_not_slow_an_rpm_bound_job_but_rpm_cut_does() -> None:
    counts = []
    kinds: tuple[Literal["tpm", "rpm"] | None, ...] = (None, "tpm", "rpm")
    for kind in kinds:
        clock, rng = ManualClock(), random.Random(7)
        limiter = RateLimiter(RateLimits(rpm=300, tpm=1_000_000, burst_s=0.0), clock)
        if kind is not None:
            await limiter.on_rate_limited(kind)  # free
            await limiter.on_rate_limited(kind)
        size = functools.partial(rng.randint, 100, 500)
        admitted = await saturate(limiter, clock, size, 8, 30.0)
        counts.append(len(admitted))
    plain, tpm_cut, rpm_cut = counts
    assert tpm_cut == plain
    assert rpm_cut < 0.95 * plain


async def test_retry_after_holds_every_admission() -> None:
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(), clock)
    await limiter.on_rate_limited(None, retry_after_s=5.0)
    waiter = start(limiter.acquire(10))
    await run_until(clock, 4.999)
    assert not waiter.done()
    await run_until(clock, 5.0)
    assert waiter.result().admitted_at == 5.0


# -- cancellation ----------------------------------------------------------------------------


async def test_cancelled_head_waiter_lets_the_next_one_in() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=100, tpm=1000, window_s=10.0, burst_s=10.0)
    await limiter.acquire(500)
    clock.advance(1.0)
    head = start(limiter.acquire(900))
    nxt = start(limiter.acquire(300))  # still in the window at 10 s: it would put the head off
    await spin()
    assert limiter.queued == 2
    head.cancel()
    await spin()
    assert head.cancelled()
    assert nxt.result().admitted_at == 1.0
    assert limiter.queued == 0


async def test_cancel_right_after_admission_refunds_the_charge() -> None:
    clock = ManualClock()
    limiter = make(clock, rpm=100, tpm=1000, window_s=10.0, burst_s=10.0)
    await limiter.acquire(1000)
    waiter = start(limiter.acquire(600))
    await spin()
    clock.advance_to(10.0)  # admitted inside the timer; its task has not run yet
    waiter.cancel()
    await spin()
    assert waiter.cancelled()
    full = start(limiter.acquire(1000))  # fits only if the cancelled 600 were given back
    await spin()
    assert full.done()
    assert full.result().admitted_at == 10.0


# -- randomized workloads --------------------------------------------------------------------


@dataclass
class Journal:
    """What the simulated callers saw: per ticket, its first charge and its one later change."""

    asked: itertools.count[int] = field(default_factory=itertools.count)
    calls: list[tuple[int, LocalTicket]] = field(default_factory=list)
    first: dict[int, tuple[int, int]] = field(default_factory=dict)
    change: dict[int, tuple[float, int, int]] = field(default_factory=dict)

    def seen(self, ticket: LocalTicket, at: float) -> tuple[int, int]:
        """The charge the limiter held for ``ticket`` at time ``at`` (the smaller one if it
        changed at that very instant, as the order within an instant is not recorded)."""
        before = self.first[id(ticket)]
        if id(ticket) not in self.change:
            return before
        when, *after = self.change[id(ticket)]
        if at == when:
            return min(before, (after[0], after[1]))
        return before if at < when else (after[0], after[1])


async def caller(
    limiter: RateLimiter, clock: ManualClock, rng: random.Random, journal: Journal
) -> None:
    await clock_sleep(clock, rng.uniform(0.0, 100.0))
    # Mostly small requests (RPM binds), some large ones (TPM binds), some empty.
    tokens = rng.choices([0, rng.randint(1, 100), rng.randint(300, 3000)], [2, 6, 2])[0]
    asked = next(journal.asked)  # acquire queues the caller before its first await
    ticket = await limiter.acquire(tokens)
    journal.calls.append((asked, ticket))
    journal.first[id(ticket)] = (ticket.tokens, ticket.requests)
    await clock_sleep(clock, rng.uniform(0.0, 4.0))
    action = rng.random()
    if action < 0.6:
        await limiter.settle(ticket, int(tokens * rng.uniform(0.5, 1.4)))
    elif action < 0.75:
        await limiter.refund(ticket)
    else:
        return  # the server's count matched the estimate
    journal.change[id(ticket)] = (clock.now(), ticket.tokens, ticket.requests)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_random_workload_never_exceeds_any_window(seed: int) -> None:
    rng, clock, journal = random.Random(seed), ManualClock(), Journal()
    limits = RateLimits(rpm=20, tpm=5000, window_s=10.0, headroom=0.02, burst_s=1.0)
    limiter = RateLimiter(limits, clock)
    tasks = [asyncio.create_task(caller(limiter, clock, rng, journal)) for _ in range(300)]
    for task in rng.sample(tasks, 30):
        clock.call_at(rng.uniform(0.0, 100.0), task.cancel)
    await run_until(clock, 2000.0)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert all(t.done() for t in tasks)
    assert limiter.queued == 0
    assert len(journal.calls) >= 200
    tickets = [ticket for _, ticket in journal.calls]
    for ticket in tickets:
        inside = [u for u in tickets if u.admitted_at <= ticket.admitted_at < u.admitted_at + 10.0]
        charged = [journal.seen(u, ticket.admitted_at) for u in inside]
        assert sum(c[0] for c in charged) <= limits.tpm
        assert sum(c[1] for c in charged) <= limits.rpm
    # Nobody is admitted before someone who asked earlier for as many tokens or more: only a
    # smaller request may go first, into room the one before it will not need.
    for asked, ticket in journal.calls:
        for other_asked, other in journal.calls:
            if other_asked > asked and other.admitted_at < ticket.admitted_at:
                assert journal.first[id(other)][0] < journal.first[id(ticket)][0]


# -- the real loop ---------------------------------------------------------------------------


async def test_loop_clock_smoke() -> None:
    limits = RateLimits(rpm=5, tpm=1000, window_s=0.05, headroom=0.0, burst_s=0.01)
    limiter = RateLimiter(limits)
    tickets = await asyncio.gather(*(limiter.acquire(50) for _ in range(12)))
    assert [t.admitted_at for t in tickets] == sorted(t.admitted_at for t in tickets)
    assert window_sums(list(tickets), limits.window_s)[1] <= 5
    await limiter.settle(tickets[-1], 10)
    await limiter.on_rate_limited("rpm")  # free
    await limiter.on_rate_limited("rpm")
    assert limiter.requests_per_s < 5 / 0.05
    assert limiter.queued == 0
