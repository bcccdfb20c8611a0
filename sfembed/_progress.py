"""The progress hook: a tqdm bar fed from a job's live counters. The only module importing tqdm.

The bar stays off a job's way to its first request: tqdm is imported when the bar is first
drawn (at the first update, or ``show_after_s`` into the job), and its total, the input's lines,
is counted on a thread meanwhile (a file of gigabytes takes seconds to count).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from ._types import JobStats

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["TqdmProgress", "eta_s"]

log = logging.getLogger("sfembed")

#: tqdm's default lock holds a multiprocessing lock as well, whose import and semaphore cost
#: some 20 ms of start-up; the bar is only written from this process's threads.
_LOCK = threading.RLock()

#: Counts the input's lines for the bar's total; returns None when it cannot (a pipe, a compressed
#: file) or when the event it is given is set (the job ended first).
LineCounter = Callable[[threading.Event], int | None]

_REDRAW_S = 0.1  # tqdm's own shortest interval between redraws


class TqdmProgress:
    """Records done, tokens/s, requests in flight, 429s and retries, and an ETA at the limiter's
    pace (``eta``; tqdm's own estimate from the record rate stays in the bar).

    As an async context manager it counts its total with ``count`` on a thread and draws the bar
    after ``show_after_s`` seconds if no update came first; leaving it stops the count and
    closes the bar."""

    def __init__(
        self,
        *,
        total: int | None = None,
        file: TextIO | None = None,
        count: LineCounter | None = None,
        show_after_s: float = 0.5,
    ) -> None:
        self._total = total
        self._file = file
        self._count = count
        self._show_after_s = show_after_s
        self._bar: tqdm[Any] | None = None
        self._shown = 0
        self._stop_counting = threading.Event()
        self._counting: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drawn_s = 0.0  # when the bar was last redrawn, on the monotonic clock
        self.last = JobStats()

    async def __aenter__(self) -> TqdmProgress:
        self._timer = asyncio.get_running_loop().call_later(self._show_after_s, self.show)
        if self._count is not None:
            self._counting = asyncio.create_task(self._fill_total(self._count))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop_counting.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._counting is not None:
            await asyncio.wait([self._counting])  # the count ends at its next read, if not yet
            if not self._counting.cancelled() and self._counting.exception() is not None:
                log.warning("the bar's total was not counted: %s", self._counting.exception())
        self.close(self.last)

    async def _fill_total(self, count: LineCounter) -> None:
        self.set_total(await asyncio.to_thread(count, self._stop_counting))

    def set_total(self, total: int | None) -> None:
        """The records the job will have done at the end (None: unknown)."""
        self._total = total
        if self._bar is not None and total is not None:
            self._bar.total = total
            self._bar.refresh()

    def show(self) -> tqdm[Any]:
        """The bar, drawn now if it was not yet."""
        if self._bar is None:
            from tqdm import tqdm

            tqdm.set_lock(_LOCK)
            self._bar = tqdm(
                total=self._total,
                unit="rec",
                file=self._file,
                dynamic_ncols=True,
                smoothing=0.1,
            )
        return self._bar

    def update(self, stats: JobStats) -> None:
        """Show ``stats``: at once the first time, then at most every ``_REDRAW_S`` (a job hands
        over a batch of rows every few milliseconds; the bar redraws no faster)."""
        self.last = stats
        now = time.monotonic()
        if self._bar is not None and now - self._drawn_s < _REDRAW_S:
            return
        self._drawn_s = now
        self._draw(stats)

    def _draw(self, stats: JobStats) -> None:
        bar = self.show()
        elapsed = max(time.monotonic() - stats.started_s, 1e-9)
        bar.set_postfix(
            eta=_eta(stats, bar.total),
            tok_s=f"{stats.tokens / elapsed:,.0f}",
            inflight=stats.in_flight,
            r429=stats.rate_limited,
            retries=stats.retries,
            failed=len(stats.failures),
            refresh=False,
        )
        done = stats.resumed + stats.rows
        bar.update(done - self._shown)
        self._shown = done

    def close(self, stats: JobStats) -> None:
        """The bar with ``stats`` shown, closed; none is drawn now if none was (a job that
        ended before its first row)."""
        if self._bar is not None:
            self.last = stats
            self._draw(stats)
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
