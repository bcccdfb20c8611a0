"""Many processes, one account: do N sfembed processes on a quota shared through Redis hold it?

    python benchmarks/bench_shared.py [--workers 2,4,8] [--window-s 6] [--runs shared,alone,...]
        [--keep]

The local server runs in a process of its own (a sliding window, an answer in 30 ms), a private
Redis-compatible server in another, and N sfembed processes each embed one shard of one corpus
(``embed(..., limiter=SharedLimiter(...))``), every one told the account's whole limits, as a
user with N cron jobs would. Runs:

* ``shared``: N = each of ``--workers`` on the shared quota;
* ``alone``: the same N processes pacing alone (no Redis), for comparison;
* ``kill``: 4 shared processes, one SIGKILLed a third of the way in;
* ``restart``: 4 shared processes; Redis is stopped a third of the way in and started again
  (empty, on the same port) ``--outage-s`` later.

Per run it prints the share of the limit the server accepted in each whole window (from the first
accepted request), the whole-run ratio (the ideal time, tokens accepted / TPM per second, over the
time from the first accepted request to the last), 429s, the peak of any sliding window, the
Jain index of the tokens each process was admitted while all of them were running, rows wrong
(each row must be the server's vector for its text), Redis round trips per admitted request, and
for ``kill`` whether any key was left one window after the run.

Each run's outputs go to a temporary folder, deleted once checked (``--keep`` keeps it and prints
where).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import numpy as np
from _harness import ServerReport, max_sliding, server_process, table, windows

from sfembed import (
    DEFAULT_CATALOG,
    BatchLimits,
    JobStats,
    RateLimits,
    SharedLimiter,
    embed,
    load_settings,
    testing,
)

MODEL = "BAAI/bge-m3"
KEY_ENV = "SFEMBED_BENCH_KEY"
LATENCY_S = 0.030


@dataclass
class Worker:
    """What one sfembed process reports back."""

    index: int
    admissions: list[tuple[float, int]] = field(default_factory=list)  # (wall time, tokens)
    # (time.monotonic(), as the server's log: comparable across processes on one machine)
    settles: list[tuple[float, int, int]] = field(default_factory=list)  # (time, charged, used)
    limited_at: list[float] = field(default_factory=list)  # times of the 429s it was told of
    switched_at: list[float] = field(default_factory=list)  # admissions that changed shared/local
    round_trips: int = 0
    rate_limited: int = 0
    fallbacks: int = 0
    workers_seen: int = 0
    failures: int = 0


class _Recording(SharedLimiter):
    """A SharedLimiter that notes each admission, settlement and 429 with its wall time."""

    report: Worker

    async def acquire(self, tokens: int) -> Any:
        ticket = await super().acquire(tokens)
        self.report.admissions.append((time.time(), tokens))
        if self.shared == len(self.report.switched_at) % 2:  # it changed since the last note
            self.report.switched_at.append(time.monotonic())
        return ticket

    async def settle(self, ticket: Any, used_tokens: int) -> None:
        charged = ticket.tokens
        await super().settle(ticket, used_tokens)
        if charged:
            self.report.settles.append((time.monotonic(), charged, used_tokens))

    async def on_rate_limited(
        self, limit: str | None = None, retry_after_s: float | None = None
    ) -> None:
        self.report.limited_at.append(time.monotonic())
        await super().on_rate_limited(limit, retry_after_s)


def _work(index: int, texts: list[str], config: dict[str, Any], out: str, conn: Connection) -> None:
    """One sfembed process: embed ``texts`` into ``out`` (.npy), then send its Worker report."""
    os.environ[KEY_ENV] = testing.ServerConfig().api_key or ""
    rate = RateLimits(rpm=config["rpm"], tpm=config["tpm"], window_s=config["window_s"])
    settings = load_settings(
        base_url=config["url"], rate=rate, api_key_env=KEY_ENV, batch=BatchLimits(max_items=32)
    )
    report = Worker(index)
    conn.send("ready")
    conn.recv()  # "go": all processes start together, so that their shares can be compared

    async def run() -> None:
        stats = JobStats()
        limiter: SharedLimiter | None = None
        if config["quota"]:
            limiter = _Recording(config["quota"], rate, model=MODEL, lead_s=config["lead_s"])
            limiter.report = report
        try:
            rows = await embed(
                texts, model=MODEL, settings=settings, stats=stats, errors="nan", limiter=limiter
            )
        finally:
            if limiter is not None:
                await limiter.aclose()
        np.save(out, rows)
        report.rate_limited, report.failures = stats.rate_limited, len(stats.failures)
        if limiter is not None:
            report.round_trips, report.fallbacks = limiter.round_trips, limiter.fallbacks
            report.workers_seen = limiter.max_workers

    asyncio.run(run())
    conn.send(report)


@dataclass
class Run:
    name: str
    workers: int
    report: ServerReport
    results: dict[int, Worker]
    shards: list[list[str]]
    outputs: list[Path]
    killed: int | None = None
    keys_left: list[str] | None = None
    event_at: float | None = None  # time.monotonic() of the kill or of Redis stopping
    back_at: float | None = None  # and of Redis answering again


def run(
    name: str,
    texts: list[str],
    workers: int,
    args: argparse.Namespace,
    redis: testing.RedisServer | None,
    folder: Path,
) -> Run:
    limits = testing.ModelLimits(rpm=args.rpm, tpm=args.tpm)
    server = testing.ServerConfig(
        window_s=args.window_s, default_limits=limits, faults=testing.Faults(latency_s=LATENCY_S)
    )
    shards = [texts[i::workers] for i in range(workers)]
    outputs = [folder / f"{name}-{i}.npy" for i in range(workers)]
    context = mp.get_context("spawn")
    results: dict[int, Worker] = {}
    killed = None
    event_at = back_at = None
    with server_process(server) as (url, box):
        config = {"url": url, "rpm": args.rpm, "tpm": args.tpm, "window_s": args.window_s}
        config["quota"] = redis.url if redis is not None and name != "alone" else ""
        config["lead_s"] = args.lead_s
        pipes, processes = [], []
        for index, shard in enumerate(shards):
            parent, child = mp.Pipe()
            process = context.Process(
                target=_work, args=(index, shard, config, str(outputs[index]), child)
            )
            process.start()
            pipes.append(parent)
            processes.append(process)
        for parent in pipes:
            assert parent.recv() == "ready"
        for parent in pipes:
            parent.send("go")
        ideal_s = _ideal_s(texts, args)
        if name == "kill":
            time.sleep(ideal_s / 3)
            killed = 0
            event_at = time.monotonic()
            pid = processes[killed].pid
            assert pid is not None  # started above
            os.kill(pid, signal.SIGKILL)
        elif name == "restart" and redis is not None:
            time.sleep(ideal_s / 3)
            event_at = time.monotonic()
            redis.stop()
            time.sleep(args.outage_s)
            redis.start()
            back_at = time.monotonic()
        for index, (parent, process) in enumerate(zip(pipes, processes, strict=True)):
            if index != killed:
                results[index] = parent.recv()
            process.join()
    keys_left = None
    if redis is not None and name == "kill":
        time.sleep(args.window_s * 1.1)
        keys_left = _keys(redis.url)
    return Run(
        name, workers, box[0], results, shards, outputs, killed, keys_left, event_at, back_at
    )


def _ideal_s(texts: list[str], args: argparse.Namespace) -> float:
    """The run's ideal time by the server's own count, to time the kill and the outage."""
    spec = DEFAULT_CATALOG[MODEL]
    tokens = sum(testing.count_tokens(text, spec) for text in texts)
    tokens_per_s: float = args.tpm / args.window_s
    return tokens / tokens_per_s


def _keys(url: str) -> list[str]:
    import redis as redis_py

    client = redis_py.Redis.from_url(url, decode_responses=True)
    try:
        # redis-py types a reply for str and bytes clients alike: this one decodes (str).
        return sorted(cast(list[str], client.keys("sfembed:*")))
    finally:
        client.close()


def _jain(results: dict[int, Worker]) -> float:
    """Jain's index of the tokens each process was admitted while all of them were running."""
    spans = [(w.admissions[0][0], w.admissions[-1][0]) for w in results.values() if w.admissions]
    if len(spans) < 2:
        return float("nan")
    start, end = max(s for s, _ in spans), min(e for _, e in spans)
    shares = [
        sum(tokens for when, tokens in w.admissions if start <= when <= end)
        for w in results.values()
    ]
    total = sum(shares)
    return total * total / (len(shares) * sum(s * s for s in shares)) if total else float("nan")


def _limited_at(run: Run, start: float) -> str:
    times = sorted(t - start for w in run.results.values() for t in w.limited_at)
    return ", ".join(f"{t:.1f}" for t in times) or "-"


def _events(run: Run, start: float) -> str:
    times = [t - start for t in (run.event_at, run.back_at) if t is not None]
    return ", ".join(f"{t:.1f}" for t in times) or "-"


def _local_spans(run: Run, start: float) -> str:
    spans = []
    for w in run.results.values():
        times = [f"{t - start:.1f}" for t in w.switched_at]
        spans += ["-".join(times[i : i + 2]) for i in range(0, len(times), 2)]
    return ", ".join(spans) or "-"


def _rows_wrong(run: Run) -> int:
    wrong = 0
    for index, (shard, out) in enumerate(zip(run.shards, run.outputs, strict=True)):
        if index == run.killed:
            continue
        rows = np.load(out)
        if len(rows) != len(shard):
            wrong += abs(len(rows) - len(shard))
        for row, text in zip(rows, shard, strict=False):
            if len(text) < 2000:
                wrong += not np.array_equal(row, testing.expected_embedding(MODEL, text))
            else:
                wrong += not (np.isfinite(row).all() and abs(float(np.linalg.norm(row)) - 1) < 1e-4)
    return wrong


def _counted_over_charged(run: Run, start: float, window_s: float) -> str:
    """Server's count over the charge of the settled requests, first window / after."""
    first = [(c, u) for w in run.results.values() for t, c, u in w.settles if t < start + window_s]
    later = [(c, u) for w in run.results.values() for t, c, u in w.settles if t >= start + window_s]

    def ratio(pairs: list[tuple[int, int]]) -> str:
        charged = sum(c for c, _ in pairs)
        return f"{sum(u for _, u in pairs) / charged:.3f}" if charged else "-"

    over = [u / c for w in run.results.values() for _, c, u in w.settles if u > c]
    most = f", {len(over)} counted above it (at most {max(over):.3f})" if over else ""
    return f"{ratio(first)} / {ratio(later)}{most}"


def summarise(run: Run, args: argparse.Namespace) -> None:
    accepted = run.report.accepted
    per_window = windows(accepted, args.window_s)
    shares = [(t / args.tpm, r / args.rpm) for t, r in per_window]
    tokens = sum(t for _, t in accepted)
    span_s = accepted[-1][0] - accepted[0][0] if accepted else 0.0
    ideal_s = max(tokens / args.tpm, len(accepted) / args.rpm) * args.window_s
    peak_tokens, peak_requests = max_sliding(accepted, args.window_s)
    sent = sum(run.report.by_status.values())
    limited = run.report.rate_limited
    admitted = sum(len(w.admissions) for w in run.results.values())
    trips = sum(w.round_trips for w in run.results.values())
    bound = [s for s, _ in shares[1:]]
    start = accepted[0][0] if accepted else 0.0
    title = {"kill": ", one SIGKILLed", "restart": f", Redis down {args.outage_s:g} s"}
    print(
        f"\n## {run.name}: {run.workers} processes{title.get(run.name, '')}, "
        f"TPM {args.tpm:,} / RPM {args.rpm:,} per {args.window_s:g} s\n"
    )
    print(
        table(
            [(i, f"{t:.1%}", f"{r:.1%}") for i, (t, r) in enumerate(shares)],
            ("window", "of TPM", "of RPM"),
        )
    )
    rows: list[tuple[str, Any]] = [
        ("whole-run ratio (ideal / actual)", f"{ideal_s / span_s:.3f}" if span_s else "-"),
        (
            "windows after the first: min / mean of TPM",
            f"{min(bound):.1%} / {sum(bound) / len(bound):.1%}" if bound else "-",
        ),
        ("peak sliding-window tokens / TPM", f"{peak_tokens / args.tpm:.1%}"),
        ("peak sliding-window requests / RPM", f"{peak_requests / args.rpm:.1%}"),
        ("requests / 429s", f"{sent:,} / {limited:,} ({limited / max(sent, 1):.2%})"),
        ("Jain index (tokens admitted while all ran)", f"{_jain(run.results):.3f}"),
        ("rows wrong", _rows_wrong(run)),
        ("failures", sum(w.failures for w in run.results.values())),
    ]
    if run.name != "alone":
        rows += [
            ("429s at (s after the first accepted request)", _limited_at(run, start)),
            ("killed / Redis stopped, started at (s)", _events(run, start)),
            ("local pacing, per worker (s)", _local_spans(run, start)),
            (
                "server count / charge: first window / after",
                _counted_over_charged(run, start, args.window_s),
            ),
            ("Redis round trips per admitted request", f"{trips / max(admitted, 1):.2f}"),
            ("workers seen at once (most)", max(w.workers_seen for w in run.results.values())),
            ("fallbacks to local pacing", sum(w.fallbacks for w in run.results.values())),
        ]
    if run.keys_left is not None:
        rows.append(("keys left one window after the run", len(run.keys_left)))
    print()
    print(table(rows, ("figure", "value")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="2,4,8", help="process counts for the shared run")
    parser.add_argument("--runs", default="shared,alone,kill,restart")
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--tpm", type=int, default=60_000, help="the account's tokens per window")
    parser.add_argument("--rpm", type=int, default=200, help="the account's requests per window")
    parser.add_argument("--documents", type=int, default=4_000)
    parser.add_argument("--outage-s", type=float, default=2.0, help="Redis down this long")
    parser.add_argument("--lead-s", type=float, default=None, help="booking lead (default: own)")
    parser.add_argument("--keep", action="store_true", help="keep each run's outputs (.npy)")
    args = parser.parse_args()
    texts = list(testing.synthetic_corpus(args.documents, seed=11, long_every=0))
    runs = args.runs.split(",")
    with testing.RedisServer() as redis:
        for name in runs:
            several = name in ("shared", "alone")
            counts = [int(n) for n in args.workers.split(",")] if several else [4]
            for count in counts:
                folder = Path(tempfile.mkdtemp(prefix="bench_shared_"))
                try:
                    summarise(run(name, texts, count, args, redis, folder), args)
                finally:
                    if args.keep:
                        print(f"outputs kept in {folder}")
                    else:
                        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
