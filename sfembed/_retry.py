"""Bounded retries of retryable errors only. The one module that imports tenacity.

Only errors whose ``retryable`` is true are retried (429, 5xx, timeouts, resets, malformed 200s);
a 4xx is final. Waits are exponential with full jitter, or the server's ``Retry-After`` when it
sent one, never longer than the policy's longest backoff (a proxy's ``Retry-After: 3600``
must not freeze a job), and the whole is bounded by attempts and by total time. The caller's
attempt function goes back through the limiter each time, so a retry is paced like any request
and there is one retry layer only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from ._config import RetryPolicy
from ._exceptions import APIError, APIStatusError, SFEmbedError

if TYPE_CHECKING:
    import tenacity

__all__ = [
    "FailureStreak",
    "RetryHook",
    "call_with_retries",
    "honoured_wait_s",
    "is_retryable",
    "request_wide",
    "stopping_error",
]

log = logging.getLogger("sfembed")
T = TypeVar("T")

#: Called before each wait with the error, the failed attempt (1-based) and the wait in seconds.
RetryHook = Callable[[BaseException, int, float], None]


def honoured_wait_s(
    error: BaseException, policy: RetryPolicy, *, quiet: bool = False
) -> float | None:
    """The wait the server asked for (``retry_after_s``), capped at ``policy.max_backoff_s``;
    ``None`` when it asked for none. A longer request is logged (unless ``quiet``) with the wait
    kept."""
    asked = getattr(error, "retry_after_s", None)
    if not isinstance(asked, int | float):
        return None
    if asked > policy.max_backoff_s:
        if quiet:
            return policy.max_backoff_s
        log.warning(
            "the server asked to wait %g s before retrying (Retry-After); waiting %g s, "
            "the retry policy's longest backoff (retry.max_backoff_s)",
            asked,
            policy.max_backoff_s,
        )
        return policy.max_backoff_s
    return float(asked)


def is_retryable(error: BaseException) -> bool:
    """True for an sfembed error that a later attempt may get past."""
    return isinstance(error, SFEmbedError) and error.retryable


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_retry: RetryHook | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await ``attempt()`` until it succeeds, fails with a final error, or the policy runs out.

    Raises the last error unchanged (never tenacity's RetryError).
    """
    # Nearly every request succeeds at once: the first attempt is made here, and tenacity, whose
    # set-up costs more than the rest of a request's bookkeeping, takes over only after a
    # retryable failure, with that failure as its first attempt and the time it took counted.
    started = time.monotonic()
    try:
        return await attempt()
    except SFEmbedError as error:
        if not is_retryable(error):
            raise
        first = error
    return await _retrying(
        attempt, first, time.monotonic() - started, policy, on_retry=on_retry, sleep=sleep
    )


async def _retrying(
    attempt: Callable[[], Awaitable[T]],
    first: BaseException,
    spent_s: float,
    policy: RetryPolicy,
    *,
    on_retry: RetryHook | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """The retries after a first attempt, made by the caller, that failed with the retryable
    ``first`` after ``spent_s`` seconds: as :func:`call_with_retries` from there on.

    Raised here, outside any handler, ``first`` keeps the ``__context__`` it had."""
    # Loaded at a job's first retry, not before its first request: some 20 ms of a start-up.
    import tenacity

    jitter = tenacity.wait_random_exponential(
        multiplier=policy.initial_backoff_s, max=policy.max_backoff_s
    )
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(is_retryable),
        stop=tenacity.stop_after_attempt(policy.max_attempts)
        | tenacity.stop_after_delay(policy.max_total_s - spent_s),
        wait=_Wait(policy, jitter),
        sleep=sleep,
        before_sleep=_before_sleep(on_retry),
        reraise=True,
    )
    failed = [first]

    async def once() -> T:
        # tenacity awaits only what it sees is a coroutine function; a lambda is not one.
        if failed:
            raise failed.pop()  # the first attempt, made by the caller, replayed as attempt 1
        return await attempt()

    return await retrying(once)


class _Wait:
    """The server's Retry-After when given, else ``jitter`` (full-jitter exponential backoff)."""

    def __init__(
        self, policy: RetryPolicy, jitter: Callable[[tenacity.RetryCallState], float]
    ) -> None:
        self._jitter = jitter
        self._policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        after = honoured_wait_s(error, self._policy) if error is not None else None
        if after is not None:
            return after
        return float(self._jitter(retry_state))


def _before_sleep(hook: RetryHook | None) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        if error is None:
            return
        wait_s = state.upcoming_sleep
        log.debug("attempt %d failed (%s); retrying in %.2f s", state.attempt_number, error, wait_s)
        if hook is not None:
            hook(error, state.attempt_number, wait_s)

    return before_sleep


def request_wide(error: BaseException) -> bool:
    """True for an answer about the request itself, never about its inputs: a status that no
    class of its own covers and no retry gets past (a redirect, 405, 406, ...). Every other
    request would get it too."""
    return type(error) is APIStatusError and not error.retryable


class FailureStreak:
    """Stops a job that fails every request the same way.

    A settings or endpoint problem (a gateway that refuses every body, an outage outlasting the
    retries) fails request after request with one error. Failing each record for it would write
    an error line per record of the corpus, and narrowing each refused request down to single
    items would send two requests per record. So the same error (class, status, code, message)
    ending ``refused_limit`` items refused alone, or ``gave_up_limit`` requests out of retries,
    in a row, with no success between, stops the job with one error that says so.
    """

    def __init__(self, *, refused_limit: int = 16, gave_up_limit: int = 4) -> None:
        self._limits = {"refused": refused_limit, "gave up": gave_up_limit}
        self._key: tuple[object, ...] | None = None
        self._count = 0
        self._last: APIError | None = None
        self._answered = False
        self._gave_up = 0  # requests out of retries, in all

    def success(self) -> None:
        """A request was answered: whatever failed before was not about every request."""
        self._key = None
        self._count = 0
        self._answered = True

    def ended(self) -> None:
        """The job sent its last request. A job too small to complete a streak (fewer requests
        than ``gave_up_limit``, against a server that is down) whose requests all ran out of
        retries, none answered, stops as a longer one would: with one error (the last), and its
        earlier output left in place rather than replaced by rows of failures."""
        last = self._last
        if self._answered or last is None or self._key != self._key_of("gave up", last):
            return
        why = f"{self._gave_up} requests ran out of retries and none succeeded: "
        raise stopping_error(last, why)

    def refused(self, error: APIError) -> None:
        """An item sent alone was refused with ``error``. Raises when the streak is complete."""
        self._add("refused", error)

    def gave_up(self, error: APIError) -> None:
        """A request ran out of retries on ``error``. Raises when the streak is complete."""
        self._gave_up += 1
        self._add("gave up", error)

    @staticmethod
    def _key_of(kind: str, error: APIError) -> tuple[object, ...]:
        return (kind, type(error), error.status, error.code, error.message)

    def _add(self, kind: str, error: APIError) -> None:
        key = self._key_of(kind, error)
        self._count = self._count + 1 if key == self._key else 1
        self._key = key
        self._last = error
        if self._count >= self._limits[kind]:
            what = "inputs sent alone were refused" if kind == "refused" else "requests failed"
            why = f"{self._count} {what} in a row with the same error, and none succeeded: "
            raise stopping_error(error, why)


def stopping_error(error: APIError, why: str = "") -> APIError:
    """``error`` restated as the one error that stops a job: it concerns every request."""
    stop = type(error)(
        f"{why}{error.message}. It concerns every request, not their inputs (check the base "
        "URL, the model and its options, or the server's state); the job stops here",
        status=error.status,
        code=error.code,
        trace_id=error.trace_id,
    )
    stop.retryable = False
    return stop
