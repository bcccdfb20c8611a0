"""The shared quota when Redis cannot be reached: the local limiter that stands in for it (at the
limits divided by the workers last seen, from this worker's own admissions of the window), the
record of those admissions, and the link to Redis that switches between the two: each run of the
script answered or, once Redis has answered, the stand-in taking over; then a probe of its own
asking Redis again, and this worker's window carried back into the shared log. See ``_quota``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ._config import RateLimits
from ._limiter import Clock, RateLimiter, effective_requests, effective_tokens
from ._quota_redis import US, Script, denied, quota_error, redis_error, unreachable

__all__ = ["Link", "Recent", "StandIn"]

log = logging.getLogger("sfembed")

_T = TypeVar("_T")


class Recent:
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
        return [str(x) for id, t, left_s in self.live() for x in (id, t, int(left_s * US))]


class StandIn:
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

    def take_over(self, error: BaseException, workers: int, recent: Recent) -> None:
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


class Link:
    """Redis as the shared limiter meets it. ``call`` runs the script: its reply, or None once
    the stand-in paces for a Redis that answered before and cannot be reached now. A Redis that
    has never answered, or that refuses the call, raises ConfigError: no worker then knows how
    many others share the quota. ``workers`` gives the live workers last seen (the stand-in's
    share is the limits divided by them)."""

    def __init__(
        self,
        url: str,
        script: Script,
        stand_in: StandIn,
        recent: Recent,
        *,
        worker: str,
        workers: Callable[[], int],
    ) -> None:
        self._url = url
        self.script = script
        self.stand_in = stand_in
        self.recent = recent
        self._worker = worker
        self._workers = workers
        self.answered = False  # Redis has answered once: an error after it is an outage
        self.probe: asyncio.Task[bool] | None = None  # asks Redis again, outside the turn

    async def open(self) -> None:
        """The first contact (it loads the script). Raises ConfigError as ``call``."""
        await self._contact(self.script.load)

    async def aclose(self) -> None:
        """Stop a probe of Redis still under way and close the connections to Redis."""
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.wait([probe])
            if not probe.cancelled():
                probe.exception()  # taken: what a probe met no longer matters once closed
        await self.script.redis.aclose()

    async def call(self, *args: object) -> list[Any] | None:
        """One run of the script; None (and the local stand-in) when Redis is unreachable."""
        reply = await self._contact(lambda: self.script(*args))
        if reply is not None and args[0] != "carry":  # which says whether it is restoring
            self.stand_in.hand_back()
        return reply

    async def _contact(self, call: Callable[[], Awaitable[_T]]) -> _T | None:
        try:
            reply = await call()
        except unreachable() as error:
            if denied(error) or not self.answered:
                raise quota_error(error, self._url) from None
            self.stand_in.take_over(error, self._workers(), self.recent)
            return None
        except redis_error() as error:  # it answered, but not as the quota's Redis can
            # (a database index out of range, a server that is not Redis): waiting will not
            # mend it, and redis-py's own error would not name the setting.
            raise quota_error(error, self._url) from None
        self.answered = True
        return reply

    async def answers_again(self) -> bool:
        """True if pacing is shared again. Redis is asked by a probe of its own, one at a time,
        that no caller waits for: one that does not answer takes up to ``timeout_s``, and
        every caller of this process waits for the one in the turn. Once the probe is answered,
        the carry runs in the turn, so that every admission of the stand-in is in it."""
        probe = self.probe
        if probe is not None and probe.done():
            self.probe = None
            if probe.result():  # raises what it met (ConfigError: Redis refused it)
                return await self.carry()
        if self.probe is None:
            carried = self.recent.carried()  # an early carry: the one in the turn completes it
            self.probe = asyncio.create_task(self._asked_again(carried))
        return False

    async def _asked_again(self, carried: list[str]) -> bool:
        return await self.call("carry", self._worker, *carried) is not None

    async def carry(self) -> bool:
        """Ask Redis again after an outage, carrying this worker's admissions of the window into
        the shared log (those it lacks; a count settled meanwhile corrects the one it holds).
        True if pacing is shared again."""
        reply = await self.call("carry", self._worker, *self.recent.carried())
        if reply is not None:
            self.stand_in.hand_back(restoring_s=int(reply[1]) / US)
        return self.stand_in.limiter is None
