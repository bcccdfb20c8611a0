"""The progress hook: a tqdm bar fed from a job's live counters. The only module importing tqdm."""

from __future__ import annotations

import time
from typing import Protocol, TextIO

from tqdm import tqdm

from ._pipeline import JobStats

__all__ = ["ProgressHook", "TqdmProgress"]


class ProgressHook(Protocol):
    """Told of a job's counters now and then, and once more at the end."""

    def update(self, stats: JobStats) -> None: ...

    def close(self, stats: JobStats) -> None: ...


class TqdmProgress:
    """Records done, tokens/s, requests in flight, 429s and retries; ETA from the record rate."""

    def __init__(self, *, total: int | None = None, file: TextIO | None = None) -> None:
        self._bar = tqdm(total=total, unit="rec", file=file, dynamic_ncols=True, smoothing=0.1)
        self._shown = 0
        self.last = JobStats()

    def update(self, stats: JobStats) -> None:
        self.last = stats
        elapsed = max(time.monotonic() - stats.started_s, 1e-9)
        self._bar.set_postfix(
            tok_s=f"{stats.tokens / elapsed:,.0f}",
            inflight=stats.in_flight,
            r429=stats.rate_limited,
            retries=stats.retries,
            failed=len(stats.failures),
            refresh=False,
        )
        self._bar.update(stats.rows - self._shown)
        self._shown = stats.rows

    def close(self, stats: JobStats) -> None:
        self.update(stats)
        self._bar.close()
