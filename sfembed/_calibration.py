"""Calibration: the factor from local token counts to the server's, learnt from ``usage``."""

from __future__ import annotations

import math
from collections import deque

from ._exceptions import ConfigError, InputError

__all__ = ["Calibration"]


class Calibration:
    """The factor from local counts to the server's, learnt from each response's ``usage``.

    ``ratio`` (server tokens per local token) starts at ``prior``: 1.0 for an exact counter,
    and for the estimator a margin for its worst measured under-count. Observations are pooled
    until they hold at least ``min_sample`` local tokens, so that one short text cannot swing
    the factor; each pooled server/local ratio is kept for the last ``window`` samples. The
    ratio is then the largest of them: it rises with the first sample in which the server
    counts more than we charge, and falls only as far as the most demanding recent sample
    allows. Until ``min_samples`` samples are in, it never falls below the prior, whose caution
    is not yet disproved.
    """

    ESTIMATOR_PRIOR = 1.06  # covers the estimator's worst under-count (5%) with a little room

    def __init__(
        self,
        *,
        exact: bool,
        prior: float | None = None,
        window: int = 32,
        min_sample: int = 256,
        min_samples: int = 4,
    ) -> None:
        self.prior = prior if prior is not None else 1.0 if exact else self.ESTIMATOR_PRIOR
        if self.prior <= 0 or window <= 0 or min_sample <= 0 or min_samples <= 0:
            raise ConfigError("calibration: prior, window and sample sizes must be positive")
        self.min_samples = min_samples
        self._samples: deque[float] = deque(maxlen=window)
        self._min_sample = min_sample
        self._pool_local = self._pool_server = 0
        self.ratio = self.prior

    def charge(self, local_tokens: int) -> int:
        """Tokens to charge the limiter for a request we count at ``local_tokens``."""
        return math.ceil(local_tokens * self.ratio - 1e-9) if local_tokens > 0 else 0

    def observe(self, local_tokens: int, server_tokens: int) -> None:
        """Learn from one response: we counted ``local_tokens``, the server ``server_tokens``."""
        if local_tokens < 0 or server_tokens < 0:
            raise InputError(f"token counts cannot be negative ({local_tokens}, {server_tokens})")
        if local_tokens == 0:
            return  # images only: nothing to compare
        self._pool_local += local_tokens
        self._pool_server += server_tokens
        if self._pool_local < self._min_sample:
            return
        self._samples.append(self._pool_server / self._pool_local)
        self._pool_local = self._pool_server = 0
        evidence = max(self._samples)
        warm = len(self._samples) >= self.min_samples
        self.ratio = evidence if warm else max(evidence, self.prior)

    @property
    def samples(self) -> int:
        """Pooled observations currently in the window."""
        return len(self._samples)
