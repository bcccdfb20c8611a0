"""What the command line prints: the job's summary, the shared quota's line, the dry run's plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names are for the signatures only; nothing here runs a job
    from ._config import RateLimits
    from ._estimate import DryRun
    from ._job import JobSummary
    from ._quota import SharedLimiter

__all__ = ["dry_run_table", "quota_line", "summary_table"]


def quota_line(limiter: SharedLimiter) -> str:
    """The summary's line on the quota shared through Redis."""
    said = f"shared through {limiter.where}, {limiter.max_workers:,} worker(s) seen at once"
    if limiter.fallbacks:
        said += f"; paced alone {limiter.fallbacks:,} time(s) while Redis was unreachable"
    return f"  {'quota':<16}{said}"


def summary_table(summary: JobSummary, limits: RateLimits) -> str:
    """The job's figures, one per line; TPM utilisation is tokens over the limits' capacity in
    the job's wall time. A job shorter than one window has none: the window's whole quota may be
    spent at once, so over a few seconds of a 60 s window the ratio would read hundreds of
    percent and say nothing about the pace."""
    stats = summary.stats
    windows = summary.wall_s / limits.window_s
    if windows >= 1:
        utilisation = f"{stats.tokens / (limits.tpm * windows):.1%}"
    else:
        utilisation = f"- (the job was shorter than one {limits.window_s:g} s window)"
    lines = [
        ("records", f"{summary.records:,}"),
        ("rows written", f"{summary.rows:,}"),
        ("chunks", f"{stats.chunks:,}"),
        ("tokens", f"{stats.tokens:,}"),
        ("requests", f"{stats.requests:,}"),
        ("from cache", f"{stats.cached:,} (and {stats.deduplicated:,} repeats sent once)"),
        ("429s", f"{stats.rate_limited:,}"),
        ("retries", f"{stats.retries:,}"),
        ("failures", f"{summary.failed:,}"),
        ("wall time", f"{summary.wall_s:,.1f} s"),
        ("TPM utilisation", utilisation),
    ]
    if summary.resumed_records:
        lines.insert(1, ("resumed after", f"{summary.resumed_records:,} records done earlier"))
    return "\n".join(f"  {name:<16}{value}" for name, value in lines)


def dry_run_table(plan: DryRun, prices_file: str | None) -> str:
    """The plan of ``--dry-run``; ``prices_file`` is where the cost's prices came from."""
    source = (
        f"prices per million tokens from {prices_file}" if prices_file else "no prices file found"
    )
    rows = [
        ("records", f"{plan.records:,} ({plan.unusable:,} unusable)"),
        ("tokens (exact)", f"{plan.tokens:,}"),
        ("items after splitting", f"{plan.items:,}"),
        ("requests", f"{plan.requests:,}"),
        ("wall time at the limits", f"{plan.wall_s:,.0f} s ({plan.wall_s / 3600:.2f} h)"),
        ("cost", f"{plan.cost:,.2f} ({source})"),
    ]
    return "\n".join(f"  {name:<24}{value}" for name, value in rows)
