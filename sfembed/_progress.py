"""The progress hook: a tqdm bar fed from a job's live counters. The only module importing tqdm."""

from __future__ import annotations

import time
from typing import TextIO

from tqdm import tqdm

from ._types import JobStats

__all__ = ["TqdmProgress", "eta_s"]


class TqdmProgress:
    """Records done, tokens/s, requests in flight, 429s and retries, and an ETA at the limiter's
    pace (``eta``; tqdm's own estimate from the record rate stays in the bar)."""

    def __init__(self, *, total: int | None = None, file: TextIO | None = None) -> None:
        self._bar = tqdm(total=total, unit="rec", file=file, dynamic_ncols=True, smoothing=0.1)
        self._shown = 0
        self.last = JobStats()

    def update(self, stats: JobStats) -> None:
        self.last = stats
        elapsed = max(time.monotonic() - stats.started_s, 1e-9)
        self._bar.set_postfix(
            eta=_eta(stats, self._bar.total),
            tok_s=f"{stats.tokens / elapsed:,.0f}",
            inflight=stats.in_flight,
            r429=stats.rate_limited,
            retries=stats.retries,
            failed=len(stats.failures),
            refresh=False,
        )
        done = stats.resumed + stats.rows
        self._bar.update(done - self._shown)
        self._shown = done

    def close(self, stats: JobStats) -> None:
        self.update(stats)
        self._bar.close()


def eta_s(stats: JobStats, total: int | None) -> float | None:
    """Seconds left at the limiter's pace: the records left, at the tokens and requests per
    record seen so far, over the pace of whichever limit binds. None before anything is known."""
    if not total or not stats.rows or not stats.pace_tokens_per_s:
        return None
    left = max(total - stats.resumed - stats.rows, 0)
    by_tokens = left * stats.tokens / stats.rows / stats.pace_tokens_per_s
    by_requests = left * stats.requests / stats.rows / max(stats.pace_requests_per_s, 1e-9)
    return max(by_tokens, by_requests)


def _eta(stats: JobStats, total: float | None) -> str:
    seconds = eta_s(stats, int(total) if total else None)
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
