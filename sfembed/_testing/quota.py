"""The account's quota as the local server keeps it: a sliding window per model."""

from __future__ import annotations

import time
from collections import deque

from .calls import Call
from .settings import ModelLimits, ServerConfig, ServerStats


class _Window:
    """One model's log of admitted requests: (time.monotonic(), tokens), over a sliding window,
    or with ``fixed``, since the start of the current fixed one."""

    __slots__ = ("_fixed", "_log", "_tokens")

    def __init__(self, fixed: bool = False) -> None:
        self._fixed = fixed
        self._log: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def refusal(self, now: float, tokens: int, limits: ModelLimits, window_s: float) -> str | None:
        """``"RPM"`` or ``"TPM"`` if the request must be refused, else None (and it is logged)."""
        start = now // window_s * window_s if self._fixed else now - window_s
        while self._log and (self._log[0][0] < start if self._fixed else self._log[0][0] <= start):
            self._tokens -= self._log.popleft()[1]
        if limits.rpm is not None and len(self._log) + 1 > limits.rpm:
            return "RPM"
        if limits.tpm is not None and self._tokens + tokens > limits.tpm:
            return "TPM"
        self._log.append((now, tokens))
        self._tokens += tokens
        return None


class Quota:
    """The account's limits per model (sliding windows, or fixed ones); a request over one is
    refused."""

    __slots__ = ("_config", "_stats", "_windows")

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self._config = config
        self._stats = stats
        self._windows: dict[str, _Window] = {}

    def refusal(self, call: Call) -> str | None:
        """``"RPM"`` or ``"TPM"`` if ``call`` is over its model's quota; otherwise None, and
        ``call`` is charged to the quota."""
        now = time.monotonic()
        limits = self._config.limits.get(call.model, self._config.default_limits)
        if limits.rpm is not None or limits.tpm is not None:  # unlimited models keep no log
            window = self._windows.get(call.model)
            if window is None:
                window = self._windows[call.model] = _Window(self._config.fixed_window)
            limit = window.refusal(now, call.tokens, limits, self._config.window_s)
            if limit is not None:
                return limit
        self._stats.tokens_accepted += call.tokens
        self._stats.accepted.append((now, call.tokens))
        return None
