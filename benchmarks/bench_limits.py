"""Does a job run at the speed of its quota? A TPM-bound and an RPM-bound run, window by window.

    python benchmarks/bench_limits.py [--scenario tpm|rpm|both] [--window-s 6]

The local server (own process) enforces the limits over a sliding window; sfembed is given the
same limits. For every whole window after the first it prints the tokens and requests the server
accepted, as a share of the limit, then the 429s and a check of every row: short documents must
hold exactly the server's vector for their text, long ones a finite unit vector.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import numpy as np
from _harness import max_sliding, server_process, table, windows

from sfembed import (
    BatchLimits,
    EmbeddingClient,
    JobStats,
    RateLimits,
    embed,
    load_settings,
    testing,
)

MODEL = "BAAI/bge-m3"


@dataclass
class Scenario:
    name: str
    documents: list[str]
    rpm: int
    tpm: int
    max_items: int


def _scenarios(args: argparse.Namespace) -> list[Scenario]:
    mixed = list(testing.synthetic_corpus(args.documents, seed=1, long_every=100))
    tiny = [f"item {i}: {word}" for i, word in enumerate(["alpha", "beta", "gamma"] * 20_000)]
    return [
        Scenario("tpm", mixed, rpm=100_000, tpm=args.tpm, max_items=64),
        Scenario("rpm", tiny, rpm=args.rpm, tpm=100_000_000, max_items=16),
    ]


async def _run(url: str, scenario: Scenario, window_s: float) -> tuple[np.ndarray, JobStats, float]:
    rate = RateLimits(rpm=scenario.rpm, tpm=scenario.tpm, window_s=window_s)
    settings = load_settings(
        base_url=url, rate=rate, batch=BatchLimits(max_items=scenario.max_items), concurrency=32
    )
    stats = JobStats()
    started = time.monotonic()
    async with EmbeddingClient(api_key="sk-local-test", base_url=url) as client:
        rows = await embed(
            scenario.documents,
            model=MODEL,
            settings=settings,
            client=client,
            stats=stats,
            errors="nan",
        )
    return rows, stats, time.monotonic() - started


def _misplaced(rows: np.ndarray, documents: list[str]) -> int:
    """Rows that are not their document's vector (short ones exactly, long ones unit-norm)."""
    bad = 0 if len(rows) == len(documents) else abs(len(rows) - len(documents))
    for row, text in zip(rows, documents, strict=False):
        if len(text) < 2000:
            bad += not np.allclose(row, testing.expected_embedding(MODEL, text), atol=1e-6)
        else:
            bad += not (np.isfinite(row).all() and abs(float(np.linalg.norm(row)) - 1) < 1e-4)
    return bad


def _report(scenario: Scenario, window_s: float) -> None:
    limits = testing.ModelLimits(rpm=scenario.rpm, tpm=scenario.tpm)
    config = testing.ServerConfig(window_s=window_s, default_limits=limits)
    with server_process(config) as (url, box):
        rows, stats, wall_s = asyncio.run(_run(url, scenario, window_s))
    report = box[0]
    per_window = windows(report.accepted, window_s)
    shares = [(t / scenario.tpm, r / scenario.rpm) for t, r in per_window]
    print(
        f"\n## {scenario.name.upper()}-bound: {len(scenario.documents):,} documents, "
        f"RPM {scenario.rpm:,} / TPM {scenario.tpm:,} per {window_s:g} s window\n"
    )
    print(
        table(
            [
                (i, f"{t:,}", f"{s_t:.1%}", f"{r:,}", f"{s_r:.1%}")
                for i, ((t, r), (s_t, s_r)) in enumerate(zip(per_window, shares, strict=True))
            ],
            ("window", "tokens", "of TPM", "requests", "of RPM"),
        )
    )
    bound = [s[0] if scenario.name == "tpm" else s[1] for s in shares[1:]]
    peak_tokens, peak_requests = max_sliding(report.accepted, window_s)
    sent = sum(report.by_status.values())
    print()
    print(
        table(
            [
                ("wall time", f"{wall_s:.1f} s"),
                ("rows / documents", f"{len(rows):,} / {len(scenario.documents):,}"),
                ("rows lost or misplaced", _misplaced(rows, scenario.documents)),
                ("failures", len(stats.failures)),
                (
                    f"min {scenario.name.upper()} share, windows 2..n",
                    f"{min(bound):.1%}" if bound else "-",
                ),
                (
                    f"mean {scenario.name.upper()} share, windows 2..n",
                    f"{sum(bound) / len(bound):.1%}" if bound else "-",
                ),
                ("peak sliding-window tokens / TPM", f"{peak_tokens / scenario.tpm:.1%}"),
                ("peak sliding-window requests / RPM", f"{peak_requests / scenario.rpm:.1%}"),
                (
                    "requests sent / 429s",
                    f"{sent:,} / {report.rate_limited:,} "
                    f"({report.rate_limited / max(sent, 1):.2%})",
                ),
                ("other answers", dict(sorted(report.by_status.items()))),
                ("retries", stats.retries),
            ],
            ("figure", "value"),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=["tpm", "rpm", "both"], default="both")
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--tpm", type=int, default=600_000, help="tokens per window")
    parser.add_argument("--rpm", type=int, default=600, help="requests per window")
    args = parser.parse_args()
    for scenario in _scenarios(args):
        if args.scenario in (scenario.name, "both"):
            _report(scenario, args.window_s)


if __name__ == "__main__":
    main()
