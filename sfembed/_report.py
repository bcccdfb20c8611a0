"""The run report: what a job did, as JSON for machines, and as a table or a plot for people.

A job given a report path (``--report run.json``) rewrites it atomically at every checkpoint and
when it ends, in any way. The report holds::

    {"format": "sfembed-report", "version": 1, "status": "complete",  # running, stopped, failed
     "model": "BAAI/bge-m3", "input": "...", "output": "...",
     "records": 1000, "rows": 1000, "failed": 3, "failures_by_reason": {"empty text ...": 2, ...},
     "resumed_records": 0, "tokens": 812345, "requests": 120, "retries": 4,
     "rate_limited": {"tpm": 1, "rpm": 0, "other": 0}, "cache_hits": 17, "repeats": 2,
     "wall_s": 95.2, "first_request_s": 0.41,
     "cost": {"per_million_tokens": 0.5, "total": 0.41, "prices": "configs/prices.toml"},
     "limits": {"tpm": 500000, "rpm": 2000, "window_s": 60.0, "headroom": 0.02},
     "windows": [{"start_s": 0.0, "tokens": 480000, "requests": 70, "tokens_share": 0.96,
                  "requests_share": 0.035, "rate_limited": {"tpm": 0, "rpm": 0, "other": 0}}]}

Counting rules. ``tokens`` is the sum of the server's ``usage.total_tokens`` over the requests
this run had answered (an answer without a usable ``usage`` counts the tokens it was charged);
``requests`` counts answered requests, and ``rate_limited`` the 429 answers, by the limit the
answer named. A request refused otherwise, or cut off, is in neither. Records, rows and failures
include an earlier run's when this one resumed it; tokens, requests and windows are this run's.
Window i covers seconds [i * window_s, (i + 1) * window_s) from the job's start; a request
counts where it was answered. ``failures_by_reason`` groups reasons by their text up to the
first colon (details such as a JSON parser's column are cut off).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ._config import RateLimits
from ._exceptions import ConfigError
from ._types import JobStats, WindowStats

__all__ = ["load_report", "plot_report", "report_table", "run_report", "write_report"]

_FORMAT = "sfembed-report"
_VERSION = 1


def run_report(
    stats: JobStats,
    limits: RateLimits,
    *,
    status: str,
    counts: Mapping[str, int],
    reasons: Mapping[str, int],
    wall_s: float,
    price: float | None,
    where: Mapping[str, str],
) -> dict[str, Any]:
    """The report of a job: ``counts`` holds records, rows, failed and resumed_records;
    ``where`` the model, input and output (and the prices file, if any); ``price`` is per
    million tokens (None when unknown)."""
    cost = None
    if price is not None:
        cost = {
            "per_million_tokens": price,
            "total": round(stats.tokens / 1e6 * price, 6),
            "prices": where.get("prices"),
        }
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "status": status,
        "model": where.get("model"),
        "input": where.get("input"),
        "output": where.get("output"),
        **{name: counts.get(name, 0) for name in ("records", "rows", "failed")},
        "failures_by_reason": dict(reasons),
        "resumed_records": counts.get("resumed_records", 0),
        "tokens": stats.tokens,
        "requests": stats.requests,
        "retries": stats.retries,
        "rate_limited": _limited(stats.windows),
        "cache_hits": stats.cached,
        "repeats": stats.deduplicated,
        "wall_s": round(wall_s, 3),
        "first_request_s": _rounded(stats.first_request_s),
        "cost": cost,
        "limits": {
            "tpm": limits.tpm,
            "rpm": limits.rpm,
            "window_s": limits.window_s,
            "headroom": limits.headroom,
        },
        "windows": [_window(i, w, limits) for i, w in enumerate(stats.windows)],
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _limited(windows: list[WindowStats]) -> dict[str, int]:
    return {
        "tpm": sum(w.rate_limited_tpm for w in windows),
        "rpm": sum(w.rate_limited_rpm for w in windows),
        "other": sum(w.rate_limited_other for w in windows),
    }


def _window(index: int, window: WindowStats, limits: RateLimits) -> dict[str, Any]:
    return {
        "start_s": index * limits.window_s,
        "tokens": window.tokens,
        "requests": window.requests,
        "tokens_share": round(window.tokens / limits.tpm, 4),
        "requests_share": round(window.requests / limits.rpm, 4),
        "rate_limited": _limited([window]),
    }


def reason_group(reason: str) -> str:
    """The group a failure's reason is counted under: its text up to the first colon."""
    return reason.split(":", 1)[0].strip() or reason


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    """Replace the report at ``path`` atomically (a reader never sees half of one). Raises
    OSError."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    os.replace(temporary, path)


def load_report(path: str | Path) -> dict[str, Any]:
    """The report at ``path``. Raises ConfigError when it cannot be read or is not a report."""
    try:
        value = orjson.loads(Path(path).read_bytes())
    except OSError as error:
        raise ConfigError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    except orjson.JSONDecodeError as error:
        raise ConfigError(f"{str(path)!r} is not a run report: {error}") from None
    if not isinstance(value, dict) or value.get("format") != _FORMAT:
        raise ConfigError(f"{str(path)!r} is not an sfembed run report")
    if value.get("version") != _VERSION:
        raise ConfigError(f"{str(path)!r} is a report of version {value.get('version')!r}")
    return value


def report_table(report: Mapping[str, Any]) -> str:
    """The report as a table for a terminal."""
    limits = report["limits"]
    limited = report["rate_limited"]
    windows = report["windows"]
    busiest = max((w["tokens_share"] for w in windows), default=0.0)
    spent = report["tokens"] / (limits["tpm"] * max(report["wall_s"], 1e-9) / limits["window_s"])
    first = report["first_request_s"]
    cost = report["cost"]
    rows = [
        ("status", report["status"]),
        ("model", report["model"]),
        ("records", f"{report['records']:,} ({report['resumed_records']:,} done earlier)"),
        ("rows", f"{report['rows']:,}"),
        ("failed", f"{report['failed']:,}"),
        *((f"  {reason}", f"{count:,}") for reason, count in report["failures_by_reason"].items()),
        ("tokens (server)", f"{report['tokens']:,}"),
        ("requests", f"{report['requests']:,}"),
        (
            "429s",
            f"{sum(limited.values()):,} (TPM {limited['tpm']}, RPM {limited['rpm']}, "
            f"other {limited['other']})",
        ),
        ("retries", f"{report['retries']:,}"),
        ("cache hits", f"{report['cache_hits']:,} (and {report['repeats']:,} repeats sent once)"),
        ("wall time", f"{report['wall_s']:,.1f} s"),
        ("first request", "-" if first is None else f"after {first:,.2f} s"),
        (
            "cost",
            "-"
            if cost is None
            else f"{cost['total']:,.4f} at {cost['per_million_tokens']:g}"
            f" per million tokens ({cost['prices']})",
        ),
        ("limits", f"TPM {limits['tpm']:,}, RPM {limits['rpm']:,} per {limits['window_s']:g} s"),
        ("TPM used", f"{spent:.1%} over the run; busiest window {busiest:.1%}"),
    ]
    if report.get("error"):
        rows.insert(1, ("error", str(report["error"])))
    lines = [f"  {name:<17} {value}" for name, value in rows]  # a long reason kept apart
    lines.append("")
    lines.append(f"  {'window':>8}  {'tokens':>12}  {'TPM':>6}  {'requests':>8}  {'RPM':>6}  429s")
    for w in windows:
        lines.append(
            f"  {w['start_s']:>7g}s  {w['tokens']:>12,}  {w['tokens_share']:>6.1%}  "
            f"{w['requests']:>8,}  {w['requests_share']:>6.1%}  {sum(w['rate_limited'].values())}"
        )
    return "\n".join(lines)


def plot_report(report: Mapping[str, Any], path: str | Path) -> None:
    """Draw tokens per window against the TPM limit, with the 429s, into a PNG at ``path``.
    Raises ConfigError when matplotlib is missing (``pip install 'sfembed[plot]'``)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")  # no display: a file only
        pyplot = importlib.import_module("matplotlib.pyplot")
    except ImportError as error:
        raise ConfigError("--plot needs matplotlib: pip install 'sfembed[plot]'") from error
    limits, windows = report["limits"], report["windows"]
    starts = [w["start_s"] for w in windows]
    width = limits["window_s"] * 0.8
    ticker = importlib.import_module("matplotlib.ticker")
    figure, tokens_axis = pyplot.subplots(figsize=(10, 4.8), dpi=100)
    try:
        tokens_axis.bar(
            starts,
            [w["tokens"] for w in windows],
            width=width,
            align="edge",
            color="#4C72B0",
            label="tokens sent (server's count)",
        )
        tokens_axis.axhline(
            limits["tpm"], color="#C44E52", linestyle="--", label=f"TPM limit ({limits['tpm']:,})"
        )
        tokens_axis.set_xlabel(
            f"seconds since the job started (windows of {limits['window_s']:g} s)"
        )
        tokens_axis.set_ylabel("tokens per window")
        tokens_axis.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
        tokens_axis.set_ylim(0, max([limits["tpm"], *(w["tokens"] for w in windows)]) * 1.3)
        limited = [sum(w["rate_limited"].values()) for w in windows]
        errors_axis = tokens_axis.twinx()
        hit = [(s + width / 2, n) for s, n in zip(starts, limited, strict=True) if n]
        errors_axis.plot(
            [x for x, _ in hit],
            [n for _, n in hit],
            "v",
            color="#DD8452",
            markersize=9,
            label=f"429 answers ({sum(limited):,} in all)",
        )
        errors_axis.set_ylabel("429 answers per window")
        errors_axis.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        errors_axis.set_ylim(0, max([1, *limited]) * 1.3)
        handles = tokens_axis.get_legend_handles_labels()
        more = errors_axis.get_legend_handles_labels()
        tokens_axis.legend(
            handles[0] + more[0], handles[1] + more[1], loc="upper center", ncol=3, frameon=False
        )
        tokens_axis.set_title(
            f"{report['model']}: {report['tokens']:,} tokens in {report['requests']:,} requests, "
            f"{report['wall_s']:,.0f} s"
        )
        figure.tight_layout()
        figure.savefig(os.fspath(path), format="png")
    finally:
        pyplot.close(figure)
