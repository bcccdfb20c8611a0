"""Does a job survive a faulty server, every row correct and in place, without amplifying retries?

    python benchmarks/bench_faults.py [--documents 20000] [--batch-size 8] [--read-s 2]
                                      [--latency-ms 20]

A file-to-.npy job (``sfembed._job.run_job``) runs twice against the local server in its own
process: once fault-free, once with 3% 503s, 1% 504s, 1% connections reset mid-answer, 0.5%
answers stalled past the client's read timeout, and the server process killed (SIGKILL) halfway
through the job and started again on the same port. Every answer takes ``--latency-ms`` in both
runs, so that requests are in flight when the process dies. It prints the requests the server saw
in each run, the faults it injected by kind, the bound 1.1 x (fault-free requests + injected
faults), the wall times, and a check of every row: its vector and its id must be its document's.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from _harness import KillableServer, ServerReport, server_process, table

from sfembed import (
    BatchLimits,
    EmbeddingClient,
    JobStats,
    RateLimits,
    Timeouts,
    load_settings,
    testing,
)
from sfembed._job import JobSummary, run_job
from sfembed._writers import ids_path_for

MODEL = "BAAI/bge-m3"
BOUND = 1.1
#: Longer than any run, so no stall is ever answered: a request neither answered nor reset was
#: either stalled or in flight when the process was killed (see ``_injected``).
STALL_S = 600.0


@dataclass
class Run:
    """One job: what each server process saw, the job's summary, the wall time."""

    reports: list[ServerReport]
    summary: JobSummary
    wall_s: float
    down_s: float = 0.0  # from the kill until the new server process listened
    in_flight_at_kill: int = 0  # the client's requests in flight when the process was killed

    @property
    def requests(self) -> int:
        return sum(report.requests for report in self.reports)


@dataclass(frozen=True)
class Job:
    """The job both runs do: input and output paths and the client's settings."""

    source: Path
    out: Path
    batch_size: int
    concurrency: int
    read_s: float

    async def run(self, url: str, on_batch: Callable[[JobStats], None] | None = None) -> JobSummary:
        # No quota: what is measured is what faults cost, not pacing. Retries use the default
        # policy (0.5 s initial backoff, 8 attempts), as a user's job would.
        settings = load_settings(
            base_url=url,
            model=MODEL,
            rate=RateLimits(rpm=10**7, tpm=10**10),
            batch=BatchLimits(max_items=self.batch_size),
            concurrency=self.concurrency,
        )
        timeouts = Timeouts(read_s=self.read_s)
        async with EmbeddingClient(api_key="sk-local-test", base_url=url, timeouts=timeouts) as c:
            return await run_job(self.source, self.out, settings, client=c, on_batch=on_batch)


def _corpus(count: int) -> list[str]:
    # Short, distinct texts: a row holding another document's vector shows up as misplaced.
    texts = testing.synthetic_corpus(count, seed=4, long_every=0)
    return [f"document {n}: {text[:300]}" for n, text in enumerate(texts)]


def _write_input(path: Path, texts: list[str]) -> None:
    with open(path, "wb") as out:
        for n, text in enumerate(texts):
            out.write(orjson.dumps({"id": f"d{n}", "text": text}) + b"\n")


async def _fault_free(job: Job, latency_s: float) -> Run:
    config = testing.ServerConfig(faults=testing.Faults(latency_s=latency_s))
    with server_process(config) as (url, box):
        started = time.monotonic()
        summary = await job.run(url)
        wall_s = time.monotonic() - started
    return Run(box, summary, wall_s)


class _KillMidway:
    """Kills the server process, from a task of its own, once the job has handed over ``rows``
    rows and has ``busy`` requests in flight again (a run of rows is handed over when the oldest
    request completes, often after the others have drained while waiting for it), ``settle_s``
    later: time for those requests to reach the server, which is then working on them."""

    def __init__(self, server: KillableServer, rows: int, busy: int, settle_s: float) -> None:
        self.server = server
        self.rows = rows
        self.busy = busy
        self.settle_s = settle_s
        self.in_flight = 0  # the client's requests in flight at the kill
        self.started = False
        self._stats = JobStats()
        self._halfway = asyncio.Event()

    def on_batch(self, stats: JobStats) -> None:
        if stats.rows >= self.rows:
            self._stats = stats
            self._halfway.set()

    async def run(self) -> None:
        await self._halfway.wait()
        for _ in range(5000):  # at most about 5 s
            if self._stats.in_flight >= self.busy:
                break
            await asyncio.sleep(0.001)
        await asyncio.sleep(self.settle_s)
        self.in_flight = self._stats.in_flight
        self.started = True
        # In a thread: killing and spawning block, and the job must go on meanwhile.
        await asyncio.to_thread(self.server.kill_and_restart)


async def _with_faults(job: Job, faults: testing.Faults, kill_at_rows: int) -> Run:
    with KillableServer(testing.ServerConfig(faults=faults)) as server:
        settle_s = faults.latency_s / 2
        killing = _KillMidway(server, kill_at_rows, job.concurrency // 2, settle_s)
        killer = asyncio.create_task(killing.run())
        started = time.monotonic()
        try:
            summary = await job.run(server.url, killing.on_batch)
        finally:
            if not killing.started:
                killer.cancel()  # the job ended first: there is nothing to wait for
            await asyncio.gather(killer, return_exceptions=True)
        wall_s = time.monotonic() - started
    if not killing.started:
        raise SystemExit("the job ended before the server could be killed: use more documents")
    return Run(server.reports, summary, wall_s, server.down_s, killing.in_flight)


def _injected(reports: list[ServerReport]) -> dict[str, int]:
    """Faults by kind over every server process (see STALL_S for the last one)."""
    totals = dict.fromkeys(("503", "504", "reset", "stall", "killed"), 0)
    for report in reports:
        unanswered = report.requests - sum(report.by_status.values()) - report.resets
        totals["503"] += report.by_status[503]
        totals["504"] += report.by_status[504]
        totals["reset"] += report.resets
        totals["stall"] += report.stalls
        totals["killed"] += unanswered - report.stalls
    return totals


def _rows_check(out: Path, texts: list[str]) -> dict[str, int]:
    """Rows that hold their document's vector and id, rows that hold something else, and
    documents without a row (or with a NaN one)."""
    rows = np.load(out)
    ids = [orjson.loads(line)["id"] for line in ids_path_for(out).read_bytes().splitlines()]
    present = min(len(rows), len(texts))
    expected = np.stack([testing.expected_embedding(MODEL, text) for text in texts[:present]])
    lost = np.isnan(rows[:present]).any(axis=1)
    right = np.abs(rows[:present] - expected).max(axis=1) <= 1e-6
    right &= np.array([n < len(ids) and ids[n] == f"d{n}" for n in range(present)])
    return {
        "documents": len(texts),
        "rows": len(rows),
        "correct": int(right.sum()),
        "misplaced": int((~right & ~lost).sum()),
        "lost": int(lost.sum()) + len(texts) - present,
    }


def _print_report(clean: Run, faulty: Run, check: dict[str, int], args: argparse.Namespace) -> None:
    faults = _injected(faulty.reports)
    print(f"\n## {args.documents:,} documents, {args.batch_size} per request\n")
    print(_runs_table(clean, faulty), end="\n\n")
    print(_faults_table(faults, args.read_s), end="\n\n")
    print(_outcome_table(clean, faulty, faults, check))


def _runs_table(clean: Run, faulty: Run) -> str:
    rows = [
        (name, f"{run.requests:,}", f"{run.summary.stats.retries:,}", f"{run.wall_s:.1f} s")
        for name, run in (("fault-free", clean), ("faults + kill", faulty))
    ]
    return table(rows, ("run", "requests the server saw", "client retries", "wall time"))


def _faults_table(faults: dict[str, int], read_s: float) -> str:
    labels = {
        "503": "503",
        "504": "504",
        "reset": "connection reset mid-answer",
        "stall": f"stalled past the {read_s:g} s read timeout",
        "killed": "in flight at the server when its process was killed",
    }
    rows = [(labels[kind], f"{count:,}") for kind, count in faults.items()]
    rows.append(("total injected", f"{sum(faults.values()):,}"))
    return table(rows, ("fault", "count"))


def _outcome_table(clean: Run, faulty: Run, faults: dict[str, int], check: dict[str, int]) -> str:
    base = clean.requests + sum(faults.values())
    beyond = faulty.summary.stats.retries - sum(faults.values())
    rows = [
        ("fault-free requests + injected faults", f"{base:,}"),
        (f"bound: {BOUND:g} x that", f"{BOUND * base:,.0f}"),
        ("requests with faults", f"{faulty.requests:,} ({faulty.requests / base:.3f} x)"),
        ("client retries the server never saw (refused, or lost with the process)", beyond),
        ("client requests in flight at the kill", faulty.in_flight_at_kill),
        ("server down (kill to new process listening)", f"{faulty.down_s:.2f} s"),
        ("rows / documents", f"{check['rows']:,} / {check['documents']:,}"),
        (
            "rows correct / misplaced / lost",
            f"{check['correct']:,} / {check['misplaced']} / {check['lost']}",
        ),
        ("entries in the errors file", faulty.summary.failed),
    ]
    return table(rows, ("figure", "value"))


async def _main(args: argparse.Namespace) -> None:
    texts = _corpus(args.documents)
    latency_s = args.latency_ms / 1000
    faults = testing.Faults(
        rate_503=0.03,
        rate_504=0.01,
        rate_reset=0.01,
        rate_stall=0.005,
        stall_s=STALL_S,
        latency_s=latency_s,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "corpus.jsonl"
        _write_input(source, texts)
        clean = await _fault_free(_job(source, Path(folder) / "clean", args), latency_s)
        job = _job(source, Path(folder) / "faults", args)
        faulty = await _with_faults(job, faults, kill_at_rows=len(texts) // 2)
        check = _rows_check(job.out, texts)
    _print_report(clean, faulty, check, args)


def _job(source: Path, folder: Path, args: argparse.Namespace) -> Job:
    # Each run writes in a folder of its own: a job keeps a vector cache beside its output, and
    # the second run must not find the first one's vectors there.
    folder.mkdir()
    return Job(source, folder / "out.npy", args.batch_size, args.concurrency, args.read_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=8, help="documents per request")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--read-s", type=float, default=2.0, help="the client's read timeout")
    parser.add_argument("--seed", type=int, default=1, help="of the server's fault draws")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=20.0,
        help="added to every answer, so the kill finds requests in flight",
    )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
