"""Which fault each request meets: the scripted ones in order, then random draws from a seed."""

from __future__ import annotations

import random
from collections import deque

from .settings import INJECT_KINDS, Faults

#: Scripted outcomes that answer a valid request with an altered success body (see altered_body).
ALTERED = frozenset(
    {"no-usage", "negative-usage", "huge-usage", "zero-usage", "tiny-usage"}
    | {"nan", "inf", "string-floats", "bool-floats"}
    | {"missing-item", "extra-item", "duplicate-index", "wrong-dims", "other-model"}
)
#: Scripted outcomes for which the request is still checked (and charged) as usual.
ANSWERED = ALTERED | {"stall", "trickle", "gzip", "bom"}


class FaultPlan:
    """Which fault each request meets: those injected, in order, then one drawn at random from the
    faults' rates (one draw per request, so that a seed replays the same faults)."""

    __slots__ = ("_injected", "_latency_rng", "_rng", "faults")

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._latency_rng = random.Random(faults.seed + 1)
        self._injected: deque[str] = deque()

    def replace(self, faults: Faults) -> None:
        """Put ``faults`` in force; the random draws restart from ``faults.seed``."""
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._latency_rng = random.Random(faults.seed + 1)

    def work_s(self, tokens: int) -> float:
        """The model's time (s) for an accepted request of ``tokens`` tokens: with a
        ``latency_sigma``, a log-normal multiple (mean 1) of the per-token latency."""
        faults = self.faults
        work_s = tokens / 1000 * faults.latency_per_1k_tokens_s
        sigma = faults.latency_sigma
        if sigma > 0 and work_s > 0:
            work_s *= self._latency_rng.lognormvariate(-sigma * sigma / 2, sigma)
        return work_s

    def inject(self, kind: str, count: int) -> None:
        """Script ``count`` requests' outcome ``kind`` (see ``LocalServer.inject``)."""
        if kind not in INJECT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {sorted(INJECT_KINDS)}")
        if count < 0:
            raise ValueError("count must be >= 0")
        self._injected.extend([kind] * count)

    def injected(self) -> str | None:
        """The next request's scripted outcome, if one is left."""
        return self._injected.popleft() if self._injected else None

    def draw(self, in_flight: int) -> str | None:
        """A random fault for a request, with ``in_flight`` requests being answered, or None."""
        faults = self.faults
        if faults.max_in_flight is not None and in_flight > faults.max_in_flight:
            return "503"
        draw = self._rng.random()
        for kind, rate in (
            ("503", faults.rate_503),
            ("504", faults.rate_504),
            ("reset", faults.rate_reset),
            ("stall", faults.rate_stall),
            ("429-tpm", faults.rate_429),
        ):
            if draw < rate:
                return kind
            draw -= rate
        return None
