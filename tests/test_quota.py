"""SharedLimiter against a real Redis-compatible server (a private one per test, no persistence).

Redis decides on its own clock (TIME), which cannot be moved by hand: the windows here are short
(a second or less) so that waits stay short, and nothing asserts how long anything took. What is
checked is the shared state in Redis itself: the running sums, the log, the keys' expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio as redis
from hostile import (
    assert_clean,
    docs,
    embed_args,
    nothing_listening,
    sfembed,
    snapshot,
    write_lines,
)

from sfembed._config import RateLimits
from sfembed._exceptions import ConfigError, InputError
from sfembed._limiter import ManualClock
from sfembed._quota import SharedLimiter
from sfembed.testing import LocalServer, RedisServer
from sfembed.testing import expected_embedding as expected

MODEL = "BAAI/bge-m3"
PREFIX = f"sfembed:{{default}}:{MODEL}"
#: A sorted set read with its scores. redis-py types each reply for every client setting at once
#: (bytes or str, with scores or not, RESP2 or RESP3): the clients here decode their replies
#: (``decode_responses=True``) and speak RESP2, so members are str and a scored read is pairs.
Scored = list[tuple[str, float]]


def limits(**overrides: Any) -> RateLimits:
    return RateLimits(
        **{"rpm": 1000, "tpm": 100_000, "window_s": 1.0, "headroom": 0.0, **overrides}
    )


@pytest.fixture
async def inspect(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    """A plain client to read the shared state with."""
    client = redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def make_limiter(redis_server: RedisServer) -> AsyncIterator[Callable[..., SharedLimiter]]:
    made: list[SharedLimiter] = []

    def make(rate: RateLimits | None = None, **options: Any) -> SharedLimiter:
        limiter = SharedLimiter(redis_server.url, rate or limits(), model=MODEL, **options)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def opened(limiter: SharedLimiter) -> SharedLimiter:
    """``limiter`` after its first contact with Redis, as ``async with`` opens it."""
    return await limiter.__aenter__()


async def sums(client: redis.Redis) -> tuple[int, int, int]:
    """(tokens, requests) in the shared window, and the entries in its log."""
    tokens, requests = await client.hmget(f"{PREFIX}:state", ["tokens", "requests"])
    return int(tokens or 0), int(requests or 0), await client.zcard(f"{PREFIX}:log")


async def until_gone(client: redis.Redis, seconds: float) -> list[str]:
    """The quota's keys still there after waiting (at most ``seconds``) for them to expire."""
    keys: list[str] = []
    for _ in range(int(seconds / 0.05)):
        keys = cast(list[str], await client.keys("sfembed:*"))
        if not keys:
            break
        await asyncio.sleep(0.05)
    return keys


# -- charging, settling, refunding -------------------------------------------------------------


async def test_a_ticket_is_charged_then_settled_to_the_servers_count(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    limiter = make_limiter()
    ticket = await limiter.acquire(400)
    assert await sums(inspect) == (400, 1, 1)
    await limiter.settle(ticket, 650)
    assert await sums(inspect) == (650, 1, 1)
    await limiter.settle(ticket, 650)  # a repeated settle changes nothing
    assert await sums(inspect) == (650, 1, 1)
    await limiter.settle(ticket, 300)  # a correction is to the count, never added to it
    assert await sums(inspect) == (300, 1, 1)
    assert ticket.tokens == 300


async def test_a_request_not_yet_answered_is_held_with_a_margin(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    """Until its answer, the log holds a request at its charge and 15% more: the charge is an
    estimate, and a request unlike the last ones may be counted more."""
    limiter = make_limiter(limits(tpm=1000, window_s=10.0, burst_s=10.0))
    first = await limiter.acquire(640)  # held at 736
    await limiter.acquire(150)  # 736 + 172.5 fit
    assert await inspect.hget(f"{PREFIX}:state", "pending") == "790"
    third = asyncio.create_task(limiter.acquire(100))  # 1,023.5 do not, though 890 tokens would
    for _ in range(200):  # until its refusal has put it in the line
        if await inspect.zcard(f"{PREFIX}:line"):
            break
        await asyncio.sleep(0.01)
    assert await inspect.zcard(f"{PREFIX}:line") == 1
    assert not third.done()
    third.cancel()  # it would ask again when the first leaves the log, 10 s on
    with contextlib.suppress(asyncio.CancelledError):
        await third
    await limiter.settle(first, 640)  # counted: 640 + 172.5 + 115 fit
    assert await inspect.hget(f"{PREFIX}:state", "pending") == "150"
    await limiter.acquire(100)
    assert await sums(inspect) == (890, 3, 3)
    assert await inspect.hget(f"{PREFIX}:state", "pending") == "250"


async def test_a_count_above_the_charge_is_learnt_by_every_worker(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    """One worker's answers say the server counts 10% more than charged: every worker's next
    charge holds that much until its own answer settles it."""
    first, second = make_limiter(), make_limiter()
    small = await first.acquire(100)
    await first.settle(small, 200)  # too short to say anything: not learnt
    ticket = await first.acquire(1000)
    assert await sums(inspect) == (200 + 1000, 2, 2)
    await first.settle(ticket, 1100)
    other = await second.acquire(1000)
    assert await sums(inspect) == (200 + 1100 + 1100, 3, 3)
    assert other.tokens == 1000  # the ticket keeps what was asked: a settle without usage
    await second.settle(other, 950)  # the server's count replaces the charge
    assert await sums(inspect) == (200 + 1100 + 950, 3, 3)
    again = await first.acquire(1000)  # the largest of the last counts still rules
    assert await sums(inspect) == (200 + 1100 + 950 + 1100, 4, 4)
    await first.refund(again)
    assert await sums(inspect) == (200 + 1100 + 950, 3, 3)


async def test_a_refund_removes_the_charge_once_and_settles_after_it_do_nothing(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    limiter = make_limiter()
    kept = await limiter.acquire(100)
    refunded = await limiter.acquire(200)
    assert await sums(inspect) == (300, 2, 2)
    await limiter.refund(refunded)
    await limiter.refund(refunded)
    await limiter.settle(refunded, 999)
    assert await sums(inspect) == (100, 1, 1)
    await limiter.settle(kept, 120)
    assert await sums(inspect) == (120, 1, 1)


async def test_an_unanswered_request_keeps_its_shared_charge(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    limiter = make_limiter()
    lost = await limiter.acquire(300)
    await limiter.unanswered(lost)
    await limiter.unanswered(lost)
    assert await sums(inspect) == (300, 1, 1)
    assert (lost.tokens, lost.refunded) == (300, False)


async def test_a_repeated_booking_by_ticket_id_is_charged_once(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    """An answer lost on the way back makes the client ask again with the same ticket id."""
    limiter = make_limiter()
    first = await limiter._link.call("acquire", "lost-answer", 500, "worker-a")
    again = await limiter._link.call("acquire", "lost-answer", 500, "worker-a")
    assert first is not None
    assert again is not None
    assert first[0] == again[0] == 1
    assert await sums(inspect) == (500, 1, 1)


async def test_requests_beyond_the_window_wait_and_no_window_holds_more(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    rate = limits(rpm=4, tpm=100_000, window_s=0.5)
    first, second = make_limiter(rate), make_limiter(rate)
    seen: dict[str, float] = {}  # every admission: ticket id -> its time on the server's clock

    async def take(limiter: SharedLimiter) -> None:
        for _ in range(5):
            await limiter.acquire(10)
            seen.update(cast(Scored, await inspect.zrange(f"{PREFIX}:log", 0, -1, withscores=True)))

    await asyncio.gather(take(first), take(second))
    times = sorted(seen.values())
    assert len(times) == 10
    window_us = 0.5 * 1_000_000
    assert max(sum(1 for t in times if start <= t < start + window_us) for start in times) <= 4
    assert {first.workers, second.workers} == {2}


async def test_oversized_and_negative_requests_are_refused(
    make_limiter: Callable[..., SharedLimiter],
) -> None:
    limiter = make_limiter(limits(tpm=1000))
    with pytest.raises(ConfigError, match="1001 tokens exceeds the TPM of 1000"):
        await limiter.acquire(1001)
    with pytest.raises(InputError, match="negative"):
        await limiter.acquire(-1)
    ticket = await limiter.acquire(10)
    with pytest.raises(InputError, match="negative"):
        await limiter.settle(ticket, -5)


async def test_a_ticket_of_another_limiter_is_refused(
    make_limiter: Callable[..., SharedLimiter],
) -> None:
    first, second = make_limiter(), make_limiter()
    ticket = await first.acquire(10)
    with pytest.raises(ValueError, match="another limiter"):
        await second.settle(ticket, 10)
    with pytest.raises(ValueError, match="another limiter"):
        await second.refund(ticket)


def test_an_account_label_with_braces_is_refused(redis_server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="account label"):
        SharedLimiter(redis_server.url, limits(), model=MODEL, account="a}b")


def test_without_redis_py_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigError, match=r"pip install 'sfembed\[redis\]'"):
        SharedLimiter(redis_server.url, limits(), model=MODEL)


# -- 429s --------------------------------------------------------------------------------------


async def test_a_429_alone_costs_no_cut_and_a_second_within_the_window_cuts(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    first, second = make_limiter(limits(window_s=30.0)), make_limiter(limits(window_s=30.0))
    await first.acquire(10)
    await first.on_rate_limited("tpm", None)
    assert await inspect.hget(f"{PREFIX}:state", "t_cut") == "1"
    await second.on_rate_limited("tpm", None)  # another worker, within the window
    assert float(await inspect.hget(f"{PREFIX}:state", "t_cut") or 0) == pytest.approx(0.8)


async def test_a_429_seen_by_every_worker_cuts_the_shared_pace_once(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    workers = [make_limiter(limits(window_s=30.0)) for _ in range(3)]
    for limiter in workers:
        await limiter.acquire(10)
    await asyncio.gather(*(limiter.on_rate_limited("tpm", None) for limiter in workers))
    t_cut, r_cut = await inspect.hmget(f"{PREFIX}:state", ["t_cut", "r_cut"])
    assert t_cut is not None
    assert r_cut is not None
    assert float(t_cut) == pytest.approx(0.8)
    assert float(r_cut) == 1.0
    await workers[0].acquire(10)  # the next admission reports the cut pace
    assert workers[0].tokens_per_s < 100_000 / 30.0 / 3


async def test_a_retry_after_holds_every_worker(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    first, second = make_limiter(), make_limiter()
    await first.acquire(10)
    await first.on_rate_limited(None, 0.3)
    hold = int(await inspect.hget(f"{PREFIX}:state", "hold") or 0)
    await second.acquire(10)
    (_, booked), *_ = cast(Scored, await inspect.zrange(f"{PREFIX}:log", -1, -1, withscores=True))
    assert booked >= hold


# -- cancellation ------------------------------------------------------------------------------


async def test_a_caller_cancelled_while_waiting_leaves_no_charge(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    limiter = make_limiter(limits(rpm=2, window_s=5.0))
    await limiter.acquire(10)
    await limiter.acquire(10)
    waiting = asyncio.create_task(limiter.acquire(10))
    queued = asyncio.create_task(limiter.acquire(10))  # behind it, in this process's line
    await asyncio.sleep(0.1)
    assert not waiting.done()
    waiting.cancel()
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    assert await sums(inspect) == (20, 2, 2)


async def test_a_caller_cancelled_after_its_booking_gives_it_back(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    # A lead of a whole window lets the script book the third request well ahead of its time.
    limiter = make_limiter(limits(rpm=2, window_s=1.0), lead_s=1.0)
    await limiter.acquire(10)
    await limiter.acquire(10)
    booked = asyncio.create_task(limiter.acquire(10))
    for _ in range(500):
        if (await sums(inspect))[2] == 3:
            break
        await asyncio.sleep(0.01)
    booked.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await booked
    assert await sums(inspect) == (20, 2, 2)


# -- workers that die, a server that goes away, a flushed server -------------------------------

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from sfembed import RateLimits
    from sfembed._quota import SharedLimiter

    async def main():
        rate = RateLimits(rpm=6, tpm=100_000, window_s=1.0, headroom=0.0)
        limiter = SharedLimiter(sys.argv[1], rate, model="BAAI/bge-m3")
        for _ in range(6):
            await limiter.acquire(100)
        print("charged", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_a_killed_worker_leaks_nothing_and_its_share_returns_within_a_window(
    redis_server: RedisServer, make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, redis_server.url, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    assert await process.stdout.readline() == b"charged\n"
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert await sums(inspect) == (600, 6, 6)  # the whole window is the dead worker's

    survivor = make_limiter(limits(rpm=6, window_s=1.0))
    for _ in range(6):  # the dead worker's charges leave with the window: a full window's worth
        await survivor.acquire(100)
    ours = [
        i
        for i in cast(list[str], await inspect.zrange(f"{PREFIX}:log", 0, -1))
        if i.startswith(survivor._worker)
    ]
    assert len(ours) == 6
    assert await until_gone(inspect, 10.0) == []  # and the state expires a window after the run


async def test_redis_going_away_falls_back_locally_once_and_returns(
    redis_server: RedisServer,
    make_limiter: Callable[..., SharedLimiter],
    inspect: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sfembed")
    limiter = make_limiter(limits(window_s=1.0))
    other = make_limiter(limits(window_s=1.0))
    await other.acquire(10)
    ticket = await limiter.acquire(10)
    assert limiter.shared
    assert limiter.workers == 2
    redis_server.stop()

    local = [await limiter.acquire(10) for _ in range(3)]
    await limiter.settle(ticket, 12)  # a ticket of the shared limiter, settled while it is gone
    assert not limiter.shared
    assert limiter.tokens_per_s == pytest.approx(100_000 / 2)  # half: it last saw two workers
    gone = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(gone) == 1
    assert "1/2 of the limits" in gone[0]
    assert "127.0.0.1" in gone[0]
    for local_ticket in local:
        await limiter.settle(local_ticket, 9)

    redis_server.start()  # same port, empty: as a restart without persistence
    for _ in range(200):
        await limiter.acquire(10)
        if limiter.shared:
            break
        await asyncio.sleep(0.01)
    assert limiter.shared
    assert [r for r in caplog.records if "answers again" in r.getMessage()]
    assert (await sums(inspect))[1] >= 1


async def test_after_an_outage_a_worker_carries_its_window_into_the_shared_log_once(
    redis_server: RedisServer, make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    """Redis restarts empty while the server's window still counts what was sent: each worker
    brings back its own admissions of the window, those before the outage and those made alone."""
    limiter = make_limiter(limits(window_s=30.0))
    before = [await limiter.acquire(100) for _ in range(2)]
    await limiter.settle(before[0], 120)
    redis_server.stop()
    alone = [await limiter.acquire(50) for _ in range(2)]
    assert not limiter.shared
    await limiter.settle(alone[0], 40)
    await limiter.refund(alone[1])  # never reached the model: not carried
    redis_server.start()  # empty, on the same port

    # Redis lost the window: the stand-in paces on for one while every worker carries its own.
    assert not await limiter._link.carry()
    assert not limiter.shared
    assert await sums(inspect) == (120 + 100 + 40, 3, 3)
    carried = set(await inspect.zrange(f"{PREFIX}:log", 0, -1))
    assert carried == {before[0].id, before[1].id, alone[0].id}
    assert not await limiter._link.carry()  # again: nothing is added twice
    assert await sums(inspect) == (260, 3, 3)
    await limiter.settle(alone[0], 45)  # settled meanwhile: the next carry brings the count
    await limiter.settle(before[1], 90)
    await limiter._link.carry()
    assert await sums(inspect) == (120 + 90 + 45, 3, 3)
    assert await inspect.zcard(f"{PREFIX}:workers") == 1
    # Restoring, a request is booked by the stand-in and in the shared log both.
    restoring = await limiter.acquire(30)
    assert not limiter.shared
    assert restoring.local is not None
    assert await inspect.zscore(f"{PREFIX}:log", restoring.id) is not None
    assert await sums(inspect) == (120 + 90 + 45 + 30, 4, 4)


async def test_the_local_stand_in_starts_from_the_workers_own_window(
    redis_server: RedisServer, make_limiter: Callable[..., SharedLimiter]
) -> None:
    """The server's window still holds what this worker sent before Redis went away."""
    limiter = make_limiter(limits(rpm=4, window_s=30.0, burst_s=30.0))  # the log binds
    for _ in range(4):
        await limiter.acquire(10)
    redis_server.stop()
    waiting = asyncio.create_task(limiter.acquire(10))
    for _ in range(100):
        if limiter._link.stand_in.limiter is not None and limiter._link.stand_in.limiter.queued:
            break
        await asyncio.sleep(0.01)
    assert limiter._link.stand_in.limiter is not None
    assert limiter._link.stand_in.limiter.queued == 1  # the window is full: it waits
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def test_a_caller_cancelled_while_the_stand_in_paces_is_not_carried_back(
    redis_server: RedisServer, make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    limiter = await opened(make_limiter(limits(rpm=2, window_s=30.0, burst_s=30.0)))
    redis_server.stop()
    kept = [await limiter.acquire(10) for _ in range(2)]
    assert not limiter.shared
    waiting = asyncio.create_task(limiter.acquire(10))
    for _ in range(100):
        if limiter._link.stand_in.limiter is not None and limiter._link.stand_in.limiter.queued:
            break
        await asyncio.sleep(0.01)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    redis_server.start()
    await limiter._link.carry()
    assert set(await inspect.zrange(f"{PREFIX}:log", 0, -1)) == {t.id for t in kept}
    assert await sums(inspect) == (20, 2, 2)


async def _booked(limiter: SharedLimiter, clock: ManualClock) -> Any:
    """One acquire of 10 tokens, the limiter's clock moved on while it waits."""
    booking = asyncio.create_task(limiter.acquire(10))
    while not booking.done():
        clock.advance(0.01)
        await asyncio.sleep(0.001)
    return booking.result()


@contextlib.contextmanager
def paused(redis_server: RedisServer) -> Iterator[None]:
    """The server stops answering (SIGSTOP) without refusing connections, then goes on."""
    assert redis_server._process is not None
    pid = redis_server._process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_redis_that_stops_answering_holds_up_no_booking_of_the_stand_in(
    redis_server: RedisServer, make_limiter: Callable[..., SharedLimiter]
) -> None:
    """Each probe of a silent Redis takes up to the timeout: bookings do not wait for it."""
    clock = ManualClock()
    limiter = make_limiter(limits(window_s=1.0), clock=clock, timeout_s=0.5)
    probe_s = 0.05  # window / 20
    await _booked(limiter, clock)
    assert limiter.shared
    with paused(redis_server):
        await _booked(limiter, clock)  # the call that finds it silent
        assert not limiter.shared
        calls = limiter.round_trips
        booked = []
        for _ in range(5):
            clock.advance(probe_s)  # each booking comes when Redis is due to be asked again
            booked.append(await limiter.acquire(10))
            await asyncio.sleep(0.01)  # the other tasks run meanwhile (a probe among them)
        assert all(ticket.local is not None for ticket in booked)
        assert limiter.round_trips - calls == 1  # one probe, still under way
        assert not limiter.shared
    # It answers again: the probe under way says so, and the next booking is shared.
    for _ in range(500):
        await _booked(limiter, clock)
        if limiter.shared:
            break
        await asyncio.sleep(0.01)
    assert limiter.shared


async def _connections(redis_server: RedisServer) -> int:
    """The connections the server has accepted, this one's own included. A new connection is
    accepted after every one waiting before it (a stopped server's queue), so they count too."""
    client = redis.from_url(redis_server.url)
    try:
        return int((await client.info("stats"))["total_connections_received"])
    finally:
        await client.aclose()


async def test_a_silent_redis_is_asked_once_before_the_stand_in_takes_over(
    redis_server: RedisServer, make_limiter: Callable[..., SharedLimiter]
) -> None:
    """Asked again on a new connection, a Redis that did not answer in time would hold every
    caller's turn for a second timeout, and answer no sooner."""
    clock = ManualClock()
    limiter = make_limiter(limits(window_s=1.0), clock=clock, timeout_s=0.5)
    await _booked(limiter, clock)
    before = await _connections(redis_server)
    with paused(redis_server):
        await _booked(limiter, clock)  # the call that finds it silent
        assert not limiter.shared
    assert await _connections(redis_server) == before + 1  # only the counting one's own


async def test_closing_stops_a_probe_under_way(
    redis_server: RedisServer, make_limiter: Callable[..., SharedLimiter]
) -> None:
    clock = ManualClock()
    limiter = await opened(make_limiter(limits(window_s=1.0), clock=clock, timeout_s=0.5))
    with paused(redis_server):
        await _booked(limiter, clock)
        assert not limiter.shared
        clock.advance(0.05)
        await limiter.acquire(10)  # asks Redis again, in a probe of its own
        probe = limiter._link.probe
        assert probe is not None
        assert not probe.done()
        await limiter.aclose()
        assert probe.cancelled()
        assert limiter._link.probe is None


async def test_an_answered_admission_leaves_the_log_a_window_after_its_answer(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    limiter = make_limiter(limits(window_s=30.0))
    ticket = await limiter.acquire(100)
    before = await inspect.time()
    await limiter.settle(ticket, 90)
    after = await inspect.time()
    leaves = await inspect.zscore(f"{PREFIX}:log", ticket.id)
    assert leaves is not None
    window_us = 30 * 1_000_000
    assert before[0] * 1_000_000 + before[1] + window_us <= leaves
    assert leaves <= after[0] * 1_000_000 + after[1] + window_us


async def test_a_flushall_in_the_middle_loses_only_the_window(
    make_limiter: Callable[..., SharedLimiter], inspect: redis.Redis
) -> None:
    limiter = make_limiter()
    before = [await limiter.acquire(100) for _ in range(3)]
    await inspect.flushall()
    for ticket in before[:2]:
        await limiter.settle(ticket, 150)  # unknown now: nothing to correct, no error
    await limiter.refund(before[2])
    assert await sums(inspect) == (0, 0, 0)
    after = await limiter.acquire(100)
    await limiter.settle(after, 80)
    assert await sums(inspect) == (80, 1, 1)
    assert limiter.shared


async def test_callers_of_two_processes_with_equal_demand_get_equal_shares(
    make_limiter: Callable[..., SharedLimiter],
) -> None:
    rate = limits(rpm=60, tpm=100_000, window_s=0.5)
    first, second = make_limiter(rate), make_limiter(rate)
    counts = {first: 0, second: 0}
    done = asyncio.Event()

    async def caller(limiter: SharedLimiter) -> None:
        while not done.is_set():
            await limiter.acquire(10)
            counts[limiter] += 1
            if sum(counts.values()) >= 90:
                done.set()

    callers = [asyncio.create_task(caller(lim)) for lim in (first, second) for _ in range(4)]
    await done.wait()
    for task in callers:
        task.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    a, b = counts.values()
    jain = (a + b) ** 2 / (2 * (a * a + b * b))
    assert jain >= 0.9, counts


# -- several real processes on one quota -------------------------------------------------------

SHARD_JOB = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np
    from sfembed import BatchLimits, JobStats, RateLimits, SharedLimiter, embed, load_settings
    from sfembed import testing

    async def main(url, quota, shard, out):
        texts = list(testing.synthetic_corpus(240, seed=7, long_every=0))[shard::3]
        rate = RateLimits(rpm=30, tpm=6_000, window_s=1.0)
        settings = load_settings(base_url=url, rate=rate, batch=BatchLimits(max_items=8))
        stats = JobStats()
        print("ready", flush=True)
        sys.stdin.readline()  # start together: the quota is only shared while the jobs overlap
        async with SharedLimiter(quota, rate, model="BAAI/bge-m3") as limiter:
            rows = await embed(texts, model="BAAI/bge-m3", settings=settings, stats=stats,
                               limiter=limiter, api_key_env="SFEMBED_TEST_KEY")
        np.save(out, rows)
        print(json.dumps({"rate_limited": stats.rate_limited, "workers": limiter.max_workers}))

    asyncio.run(main(*sys.argv[1:3], int(sys.argv[3]), sys.argv[4]))
    """
)


@pytest.mark.timeout(120)
async def test_three_processes_on_one_quota_stay_under_it_with_every_row_right(
    make_server: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    from sfembed.testing import ModelLimits, expected_embedding, synthetic_corpus

    server = await make_server(
        window_s=1.0, limits={MODEL: ModelLimits(rpm=30, tpm=6_000)}, max_batch_items=8
    )
    env = {**os.environ, "SFEMBED_TEST_KEY": "sk-local-test"}
    jobs = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-W", "error", "-c", SHARD_JOB, server.url, redis_server.url),
            *(str(shard), str(tmp_path / f"{shard}.npy")),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for shard in range(3)
    ]
    for job in jobs:  # each has imported everything and waits: a slow start cannot skew them
        assert job.stdout is not None
        assert await job.stdout.readline() == b"ready\n"
    for job in jobs:
        assert job.stdin is not None
        job.stdin.write(b"go\n")
    outputs = [await job.communicate() for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0]
    reports = [json.loads(out) for out, _ in outputs]
    assert all(report["workers"] >= 2 for report in reports)
    texts = list(synthetic_corpus(240, seed=7, long_every=0))
    for shard in range(3):
        rows = np.load(tmp_path / f"{shard}.npy")
        expected = np.stack([expected_embedding(MODEL, text) for text in texts[shard::3]])
        np.testing.assert_array_equal(rows, expected)
    refused = server.stats.rate_limited_tpm + server.stats.rate_limited_rpm
    # Paced alone, the three refuse about 30 requests here; shared, a few at most, from the
    # event loop's lateness at a 1 s window's edge on a busy machine.
    assert refused <= 3, server.stats.by_status
    assert sum(report["rate_limited"] for report in reports) == refused


# -- the command line and the settings --------------------------------------------------------


def _corpus(path: Path, count: int) -> Path:
    lines = [json.dumps({"id": f"d{i}", "text": f"document number {i}"}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _log_keys(url: str) -> list[str]:
    client = redis.from_url(url, decode_responses=True)
    try:
        return sorted(cast(list[str], await client.keys("sfembed:*:log")))
    finally:
        await client.aclose()


def test_the_cli_shares_the_quota_and_says_so(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sfembed._cli import main

    source = _corpus(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.npy"
    args = ["embed", str(source), "--out", str(out), "--local", "--no-progress"]
    args += ["--quota", redis_server.url, "--window-s", "2", "--batch-size", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    quota = next(line for line in printed.splitlines() if line.strip().startswith("quota"))
    assert f"shared through 127.0.0.1:{redis_server.port}/0" in quota
    assert "1 worker(s) seen" in quota
    assert asyncio.run(_log_keys(redis_server.url)) == [f"{PREFIX}:log"]
    rows = np.load(out)
    np.testing.assert_array_equal(rows[3], expected(MODEL, "document number 3"))


def test_the_config_key_names_the_quota_and_its_account(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    from sfembed._cli import main

    config = tmp_path / "job.toml"
    config.write_text(f'quota = "{redis_server.url}"\nquota_account = "nightly"\n')
    source = _corpus(tmp_path / "in.jsonl", 10)
    args = ["embed", str(source), "--out", str(tmp_path / "o.npy"), "--local", "--no-progress"]
    assert main([*args, "--config", str(config), "--window-s", "2"]) == 0
    assert asyncio.run(_log_keys(redis_server.url)) == [f"sfembed:{{nightly}}:{MODEL}:log"]


def test_a_quota_url_that_is_not_redis_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sfembed._cli import main

    source = _corpus(tmp_path / "in.jsonl", 3)
    args = ["embed", str(source), "--out", str(tmp_path / "o.npy"), "--local", "--no-progress"]
    assert main([*args, "--quota", "http://user:secret@quota.example:80/0"]) != 0
    error = capsys.readouterr().err
    assert "quota URL 'quota.example:80/0'" in error
    assert "secret" not in error


async def test_embed_with_settings_quota_paces_through_redis(
    server: Any, redis_server: RedisServer, inspect: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sfembed import embed, load_settings

    monkeypatch.setenv("SFEMBED_TEST_KEY", "sk-local-test")
    settings = load_settings(base_url=server.url, quota=redis_server.url)
    texts = [f"text {i}" for i in range(20)]
    rows = await embed(texts, model=MODEL, settings=settings, api_key_env="SFEMBED_TEST_KEY")
    np.testing.assert_array_equal(rows[5], expected(MODEL, "text 5"))
    tokens, requests, entries = await sums(inspect)
    assert requests == entries >= 1
    assert tokens > 0


async def test_a_job_whose_redis_stops_midway_finishes_on_the_local_stand_in(
    server: LocalServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis answered at the start: losing it later is an outage, not a setting that cannot work.
    The requests are paced over some half a second: most are admitted after Redis stopped."""
    from sfembed import embed_stream, load_settings
    from sfembed._config import BatchLimits

    monkeypatch.setenv("SFEMBED_TEST_KEY", "sk-local-test")
    settings = load_settings(base_url=server.url, batch=BatchLimits(max_items=4))
    texts = [f"text {i}" for i in range(40)]
    positions: list[int] = []
    async with SharedLimiter(redis_server.url, limits(rpm=20), model=MODEL) as limiter:
        stream = embed_stream(
            texts, model=MODEL, settings=settings, limiter=limiter, api_key_env="SFEMBED_TEST_KEY"
        )
        async with contextlib.aclosing(stream):
            async for batch in stream:
                if not positions:
                    redis_server.stop()
                positions += batch.positions.tolist()
                for at, row in zip(batch.positions, batch.embeddings, strict=True):
                    np.testing.assert_array_equal(row, expected(MODEL, texts[at]))
        assert limiter.fallbacks == 1
        assert not limiter.shared  # and paces on alone
    assert positions == list(range(40))


@pytest.mark.parametrize("where", ["database", "not redis"])
async def test_a_quota_url_redis_refuses_stops_the_job_naming_the_setting(
    server: Any, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from sfembed import embed, load_settings

    monkeypatch.setenv("SFEMBED_TEST_KEY", "sk-local-test")
    # A database the server does not have, or the embeddings server's port: both answer, so no
    # local stand-in can help, and redis-py's own error would not say which setting is wrong.
    url = redis_server.url.rsplit("/", 1)[0] + "/99"
    if where == "not redis":
        url = "redis://" + server.url.split("//", 1)[1].split("/", 1)[0] + "/0"
    settings = load_settings(base_url=server.url, quota=url)
    with pytest.raises(ConfigError, match=r"^quota URL '127\.0\.0\.1:\d+/(99|0)': Redis refused"):
        await embed(["a", "b"], model=MODEL, settings=settings, api_key_env="SFEMBED_TEST_KEY")


@pytest.mark.parametrize("path", ["/O", "/1/2", "/db0"])
def test_a_quota_url_whose_path_is_not_a_database_number_is_refused(path: str) -> None:
    url = "redis://127.0.0.1:6379" + path  # refused before any connection
    with pytest.raises(ConfigError, match=r"^quota URL 127\.0\.0\.1:6379: the path must be"):
        SharedLimiter(url, limits(), model=MODEL)


# A password with a character that ends its part of a URL, not percent-encoded: the rest of the
# URL is read as the port (which cannot be a number) or as the path.
MISREAD_SECRETS = ["s3cr/etXY99", "s3cr#etXY99", "s3cr?etXY99", "7777/etXY99", "7777?etXY99"]


@pytest.mark.parametrize("password", MISREAD_SECRETS)
def test_a_quota_url_whose_password_is_misread_is_refused_without_echoing_it(
    password: str,
) -> None:
    with pytest.raises(ConfigError, match="percent-encoded") as raised:
        SharedLimiter(f"redis://:{password}@127.0.0.1:6379/0", limits(), model=MODEL)
    for part in (password[:4], password[5:]):
        assert part not in str(raised.value), part


async def test_the_cli_refuses_a_misread_quota_password_with_one_line(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", docs(3))
    before = snapshot(tmp_path)
    url = "redis://:s3cr/etXY#99@127.0.0.1:6379/0"
    done = await sfembed(*embed_args(server.url, source, tmp_path / "out.npy", "--quota", url))
    assert done.code == 2, done.err
    assert len(done.err.splitlines()) == 1, done.err
    for part in ("s3cr", "etXY", "99@"):
        assert part not in done.err, done.err
    assert snapshot(tmp_path) == before
    assert server.stats.requests == 0


# -- a Redis that never answered ----------------------------------------------------------------

SECRET = "hunter2-quota-secret"


def silent_url(password: str = SECRET) -> tuple[str, str]:
    """A quota URL with a password on a local port nothing listens on, and its host:port/db."""
    where = nothing_listening().split("//", 1)[1].split("/", 1)[0] + "/0"
    return f"redis://:{password}@{where}", where


async def test_a_quota_redis_that_never_answered_stops_the_cli_before_any_file_or_request(
    server: LocalServer, tmp_path: Path
) -> None:
    """Alone, each worker started with the same mistyped URL would pace at the whole limits."""
    source = write_lines(tmp_path / "in.jsonl", docs(20))
    before = snapshot(tmp_path)
    url, where = silent_url()
    done = await sfembed(*embed_args(server.url, source, tmp_path / "out.npy", "--quota", url))
    assert done.code == 2, done.err  # as any setting that cannot work
    assert_clean(done, SECRET)
    lines = done.err.splitlines()
    assert len(lines) == 1, done.err
    assert lines[0].startswith(f"sfembed: error: quota URL '{where}': Redis did not answer (")
    assert "Connect call failed" in lines[0]  # the cause, as redis-py gives it
    assert snapshot(tmp_path) == before  # no output, no manifest, no lock file
    assert server.stats.requests == 0


async def test_a_quota_redis_that_never_answered_stops_embed_before_any_request(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sfembed import embed, load_settings

    monkeypatch.setenv("SFEMBED_TEST_KEY", "sk-local-test")
    url, where = silent_url()
    settings = load_settings(base_url=server.url, quota=url)
    with pytest.raises(ConfigError) as raised:
        await embed(["a", "b"], model=MODEL, settings=settings, api_key_env="SFEMBED_TEST_KEY")
    assert str(raised.value).startswith(f"quota URL '{where}': Redis did not answer (")
    assert SECRET not in str(raised.value) + repr(raised.value)
    assert server.stats.requests == 0


async def _first_contact(limiter: SharedLimiter, how: str) -> None:
    if how == "opened":
        async with limiter:
            pytest.fail("opened without Redis")
    try:
        await limiter.acquire(10)
    finally:
        await limiter.aclose()


@pytest.mark.parametrize("how", ["opened", "first call"])
async def test_a_shared_limiter_whose_redis_never_answered_admits_nothing(how: str) -> None:
    url, where = silent_url()
    limiter = SharedLimiter(url, limits(), model=MODEL)
    said = f"^quota URL {re.escape(repr(where))}: Redis did not answer"
    with pytest.raises(ConfigError, match=said) as raised:
        await _first_contact(limiter, how)
    assert SECRET not in str(raised.value)
    assert limiter.fallbacks == 0  # no local stand-in took over


async def test_a_quota_redis_that_never_answered_stops_the_ray_stage_at_its_start(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sfembed.ray import Embedder

    monkeypatch.setenv("SFEMBED_TEST_KEY", "sk-local-test")
    url, where = silent_url()
    said = f"^quota URL {re.escape(repr(where))}: Redis did not answer"
    with pytest.raises(ConfigError, match=said):
        await asyncio.to_thread(  # the embedder blocks its caller
            Embedder, model=MODEL, quota=url, base_url=server.url, api_key_env="SFEMBED_TEST_KEY"
        )
    assert server.stats.requests == 0


async def test_a_wrong_quota_password_is_refused_not_paced_alone(
    redis_server: RedisServer, inspect: redis.Redis
) -> None:
    """redis-py calls it a connection error, but Redis answered: no stand-in can mend it."""
    await inspect.config_set("requirepass", "the-right-one")
    url = redis_server.url.replace("redis://", f"redis://:{SECRET}@")
    limiter = SharedLimiter(url, limits(), model=MODEL)
    with pytest.raises(
        ConfigError, match=r"^quota URL '127\.0\.0\.1:\d+/0': Redis refused"
    ) as raised:
        async with limiter:
            await limiter.acquire(10)
    assert SECRET not in str(raised.value)
    assert limiter.fallbacks == 0
