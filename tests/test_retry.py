"""Retries: only retryable errors, bounded attempts, full jitter, Retry-After honoured."""

from __future__ import annotations

import pytest

from sfembed._config import RetryPolicy
from sfembed._exceptions import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    OverloadedError,
    RateLimitError,
    ServerError,
)
from sfembed._retry import FailureStreak, call_with_retries, honoured_wait_s


class _Script:
    """Raises the given errors in turn, then returns "ok"; records the waits asked for."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.waits: list[float] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


POLICY = RetryPolicy(max_attempts=4, initial_backoff_s=1.0, max_backoff_s=8.0)


async def test_retryable_errors_are_retried_until_success() -> None:
    script = _Script(RateLimitError("x", status=429), OverloadedError("y", status=503))
    seen: list[int] = []
    result = await call_with_retries(
        script, POLICY, sleep=script.sleep, on_retry=lambda e, n, w: seen.append(n)
    )
    assert result == "ok"
    assert script.calls == 3
    assert seen == [1, 2]
    assert all(0 <= w <= 8.0 for w in script.waits)


@pytest.mark.parametrize("error", [BadRequestError("bad", status=400), AuthenticationError("k")])
async def test_final_errors_are_not_retried(error: Exception) -> None:
    script = _Script(error)
    with pytest.raises(type(error)):
        await call_with_retries(script, POLICY, sleep=script.sleep)
    assert script.calls == 1


async def test_attempts_are_bounded_and_the_last_error_raised() -> None:
    script = _Script(*[APIConnectionError(f"reset {i}") for i in range(10)])
    with pytest.raises(APIConnectionError, match="reset 3"):
        await call_with_retries(script, POLICY, sleep=script.sleep)
    assert script.calls == 4


async def test_retry_after_wins_over_backoff() -> None:
    script = _Script(RateLimitError("x", status=429, retry_after_s=2.5))
    await call_with_retries(script, POLICY, sleep=script.sleep)
    assert script.waits == [2.5]


async def test_backoff_is_full_jitter_and_grows() -> None:
    policy = RetryPolicy(max_attempts=40, initial_backoff_s=1.0, max_backoff_s=1000.0)
    script = _Script(*[APIConnectionError("r") for _ in range(30)])
    await call_with_retries(script, policy, sleep=script.sleep)
    early, late = script.waits[:3], script.waits[-10:]
    assert max(early) <= 8.0  # attempt n waits at most initial * 2**n
    assert max(late) > 8.0
    assert min(script.waits) >= 0


async def test_a_plain_callable_returning_an_awaitable_is_awaited() -> None:
    script = _Script(OverloadedError("y", status=503))
    assert await call_with_retries(lambda: script(), POLICY, sleep=script.sleep) == "ok"
    assert script.calls == 2


async def test_the_first_attempts_time_counts_towards_the_total() -> None:
    import asyncio

    policy = RetryPolicy(max_attempts=4, max_total_s=0.05)
    calls = 0

    async def slow_then_reset() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.06)  # longer than the whole budget: no retry may follow
        raise APIConnectionError("reset")

    script = _Script()
    with pytest.raises(APIConnectionError):
        await call_with_retries(slow_then_reset, policy, sleep=script.sleep)
    assert calls == 1
    assert script.waits == []


async def test_the_first_error_is_raised_as_it_was_when_no_retry_is_left() -> None:
    first = APIConnectionError("reset")
    script = _Script(first)
    policy = RetryPolicy(max_attempts=1)
    with pytest.raises(APIConnectionError) as info:
        await call_with_retries(script, policy, sleep=script.sleep)
    assert info.value is first
    assert info.value.__context__ is None
    assert info.value.__cause__ is None
    assert script.calls == 1


async def test_a_success_after_a_retry_hands_back_the_second_attempts_result() -> None:
    results = iter(["second"])
    errors = [OverloadedError("y", status=503)]
    seen: list[tuple[int, float]] = []

    async def attempt() -> str:
        if errors:
            raise errors.pop()
        return next(results)

    script = _Script()
    result = await call_with_retries(
        attempt, POLICY, sleep=script.sleep, on_retry=lambda e, n, w: seen.append((n, w))
    )
    assert result == "second"
    assert [n for n, _ in seen] == [1]
    assert script.waits == [w for _, w in seen]


async def test_cancelling_during_a_backoff_stops_the_retries() -> None:
    import asyncio

    script = _Script(*[APIConnectionError("r") for _ in range(10)])
    waiting = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waiting.set()
        await asyncio.Event().wait()  # a backoff that only cancellation ends

    task = asyncio.create_task(call_with_retries(script, POLICY, sleep=sleep))
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert script.calls == 1


def test_a_failure_streak_stops_only_the_same_error_in_a_row() -> None:
    from sfembed._exceptions import BadRequestError, ServerError
    from sfembed._retry import FailureStreak

    refused = BadRequestError("invalid", status=400, code=20015)
    other = BadRequestError("other", status=400, code=20015)
    streak = FailureStreak(refused_limit=3, gave_up_limit=2)
    streak.refused(refused)
    streak.refused(refused)
    streak.success()  # a success between: the count starts again
    streak.refused(refused)
    streak.refused(other)  # another error: so does it
    streak.refused(refused)
    streak.refused(refused)
    with pytest.raises(BadRequestError, match="3 inputs sent alone were refused") as info:
        streak.refused(refused)
    assert not info.value.retryable
    assert info.value.code == 20015
    down = ServerError("overloaded", status=503)
    streak.gave_up(down)
    with pytest.raises(ServerError, match="2 requests failed in a row"):
        streak.gave_up(down)


def test_a_job_too_small_for_a_streak_stops_when_none_of_its_requests_was_answered() -> None:
    down = ServerError("overloaded", status=503)
    quiet = FailureStreak(gave_up_limit=4)
    quiet.ended()  # nothing sent, nothing failed
    quiet.gave_up(down)
    quiet.success()
    quiet.gave_up(down)
    quiet.ended()  # one request answered: the failures are its records', not the job's
    refused = FailureStreak(gave_up_limit=4)
    refused.gave_up(down)
    refused.refused(BadRequestError("invalid", status=400, code=20015))
    refused.ended()  # the last failure was an input's own
    small = FailureStreak(gave_up_limit=4)
    small.gave_up(ServerError("timeout", status=504))
    small.gave_up(down)
    with pytest.raises(ServerError, match="2 requests ran out of retries and none") as info:
        small.ended()
    assert not info.value.retryable
    assert info.value.status == 503


def test_a_capped_retry_after_is_logged_with_both_waits_as_they_are(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Waits under a second were printed rounded to "0 s": neither the wait asked nor the one
    # kept could be read from the warning.
    error = RateLimitError("TPM limit reached", status=429, retry_after_s=0.25)
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.1)
    with caplog.at_level("WARNING", logger="sfembed"):
        assert honoured_wait_s(error, policy) == 0.1
    assert "asked to wait 0.25 s" in caplog.text
    assert "waiting 0.1 s" in caplog.text
