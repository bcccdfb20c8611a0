"""Does a batch job's memory stay flat as the corpus grows? N short documents, JSONL -> .npy.

    python benchmarks/bench_memory.py [--counts 100000,1000000] [--workdir DIR] [--keep]

For each N a JSONL file of unique short documents is written to the work directory (default
/tmp/sfembed-bench-memory), a local server without limits runs in its own process, and
``run_job`` embeds the file into ``.npy`` (base64, concurrency 16, limits far above anything
reached) in a process of its own, forked from a fresh interpreter so that nothing of this process
or of an earlier run counts in its memory. That process reports its peak RSS (``ru_maxrss``,
cross-checked with ``VmHWM``), its RSS before the job (interpreter and imports) and samples during
it, the wall time, rows/s and CPU time. The output is then checked here, memory-mapped: shape
(N, 1024), no NaN, about 1,000 random rows equal to the server's vector for their text (row i is
record i), and every line of the id sidecar naming record i at row i.

The bar: peak RSS under 300 MB, and the same at every N.

Each N's input, output (4 GB at a million documents) and the job's files beside them are in a
folder of the work directory, deleted once checked, and the work directory then if nothing else is
in it; ``--keep`` keeps them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# numpy, orjson, sfembed and the harness are imported where used: the job's process starts from a
# bare interpreter (see ``child_main``).

MODEL = "BAAI/bge-m3"
DIMS = 1024
KEY = "sk-local-test"
RSS_BAR_MB = 300.0


def text_of(i: int) -> str:
    """Record i's text: short (about ten tokens) and unique."""
    return f"document {i} about rivers and engines"


def id_of(i: int) -> str:
    return f"doc-{i}"


def write_input(path: Path, count: int) -> None:
    """A JSONL file of ``count`` records, streamed (reused when a previous run left it whole)."""
    if path.exists() and path.with_suffix(".done").exists():
        return
    import orjson

    with open(path, "wb") as out:
        block: list[bytes] = []
        for i in range(count):
            block.append(orjson.dumps({"id": id_of(i), "text": text_of(i)}))
            if len(block) == 10_000:
                out.write(b"\n".join(block) + b"\n")
                block = []
        if block:
            out.write(b"\n".join(block) + b"\n")
    path.with_suffix(".done").touch()


def _status_mb(field: str) -> float:
    """A ``VmRSS``/``VmHWM``-style line of /proc/self/status, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- the child: one job, measured ---------------------------------------------------------------
#
# ``ru_maxrss`` survives exec: a process started by fork (or vfork) + exec reports at least the RSS
# its parent had at that moment. So the job runs in a grandchild forked by a fresh, bare
# interpreter (this script with ``--child``, nothing heavy imported yet): its figure starts from
# that interpreter's ~20 MB and then counts only what the job itself imports and allocates.


def child_main(url: str, input_path: str, output_path: str, concurrency: int) -> None:
    """Fork the job's process, wait for it and pass its exit status on."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            report = _job(url, input_path, output_path, concurrency)
            sys.stdout.write(json.dumps(report) + "\n")
            sys.stdout.flush()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))


def _job(url: str, input_path: str, output_path: str, concurrency: int) -> dict[str, Any]:
    at_fork = _rss_mb()
    from sfembed import EmbeddingClient, IOSettings, JobStats, RateLimits, load_settings
    from sfembed._job import run_job

    settings = load_settings(
        base_url=url,
        rate=RateLimits(rpm=10**9, tpm=10**12),
        encoding_format="base64",
        concurrency=concurrency,
        io=IOSettings(cache=False),  # the job's own memory; the cache is measured on its own
    )
    samples: list[tuple[int, float]] = []
    calls = [0]

    def on_batch(stats: JobStats) -> None:
        calls[0] += 1
        if calls[0] % 200 == 0:
            samples.append((stats.rows, _rss_mb()))

    async def job() -> Any:
        async with EmbeddingClient(api_key=KEY, base_url=url) as client:
            return await run_job(
                input_path, output_path, settings, client=client, on_batch=on_batch
            )

    before = _rss_mb()
    cpu = time.process_time()
    started = time.monotonic()
    summary = asyncio.run(job())
    wall = time.monotonic() - started
    cpu = time.process_time() - cpu
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rows": summary.rows,
        "failed": summary.failed,
        "requests": summary.stats.requests,
        "rate_limited": summary.stats.rate_limited,
        "retries": summary.stats.retries,
        "wall_s": wall,
        "cpu_s": cpu,
        "maxrss_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
        "hwm_mb": _status_mb("VmHWM"),
        "at_fork_mb": at_fork,
        "before_mb": before,
        "end_mb": _rss_mb(),
        "samples": samples,
    }


def run_child(url: str, input_path: Path, output_path: Path, concurrency: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", url, str(input_path), str(output_path)]
    done = subprocess.run(
        [*command, str(concurrency)], stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the job's process failed (exit status {done.returncode})")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


# --- checking the output ------------------------------------------------------------------------


def verify(output_path: Path, count: int, sample: int, seed: int) -> dict[str, Any]:
    """Shape, NaN, sampled rows against the server's vectors, sampled ids against the sidecar."""
    import numpy as np
    import orjson

    from sfembed import testing
    from sfembed._writers import ids_path_for

    rows = np.load(output_path, mmap_mode="r")
    nan_rows = 0
    for start in range(0, rows.shape[0], 32_768):
        nan_rows += int(np.isnan(rows[start : start + 32_768]).any(axis=1).sum())
    picks = sorted(random.Random(seed).sample(range(count), min(sample, count)))
    wrong = 0
    for i in picks:
        expected = testing.expected_embedding(MODEL, text_of(i))
        wrong += i >= rows.shape[0] or not np.allclose(rows[i], expected, atol=1e-6)
    # Every row's id, not a sample: a batch out of order shows here however small it is.
    id_lines = bad_ids = 0
    with open(ids_path_for(output_path), "rb") as ids:
        for row, line in enumerate(ids):
            id_lines += 1
            entry = orjson.loads(line)
            bad_ids += entry["row"] != row or entry["id"] != id_of(row)
    return {
        "shape": tuple(rows.shape),
        "dtype": str(rows.dtype),
        "nan_rows": nan_rows,
        "sampled": len(picks),
        "wrong": wrong,
        "id_lines": id_lines,
        "bad_ids": bad_ids,
    }


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        url, input_path, output_path, concurrency = sys.argv[2:]
        child_main(url, input_path, output_path, int(concurrency))
        return
    from _harness import remove_if_empty

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100000,1000000", help="comma-separated N")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample", type=int, default=1000, help="rows spot-checked per run")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/sfembed-bench-memory"),
        help="folder of the inputs and outputs (default: %(default)s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the inputs and .npy outputs")
    args = parser.parse_args()
    counts = [int(text.replace("_", "")) for text in args.counts.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
    try:
        for count in counts:
            results.append(one_size(count, args))
    finally:
        if not args.keep:
            remove_if_empty(args.workdir)
    _print(results)


def one_size(count: int, args: argparse.Namespace) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """The job on ``count`` documents: its report and the output's check."""
    from _harness import server_process, tidy

    from sfembed import testing

    folder = args.workdir / f"n{count}"  # the job's files beside its output too (lock, manifest)
    folder.mkdir(parents=True, exist_ok=True)  # an input kept (--keep) is used again
    input_path = folder / "docs.jsonl"
    output_path = folder / "out.npy"
    try:
        started = time.monotonic()
        write_input(input_path, count)
        print(f"N={count:,}: input ready ({time.monotonic() - started:.1f} s)", flush=True)
        with server_process(testing.ServerConfig()) as (url, box):
            report = run_child(url, input_path, output_path, args.concurrency)
        server = box[0]
        report["server_429"] = server.rate_limited
        report["server_non_200"] = sum(n for status, n in server.by_status.items() if status != 200)
        print(f"N={count:,}: job done in {report['wall_s']:.1f} s, checking", flush=True)
        return count, report, verify(output_path, count, args.sample, seed=count)
    finally:
        if not args.keep:
            tidy(folder)


def _print(results: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> None:
    from _harness import table

    rows = []
    for count, report, _ in results:
        rows.append(
            (
                f"{count:,}",
                f"{report['wall_s']:.1f}",
                f"{count / report['wall_s']:,.0f}",
                f"{report['cpu_s']:.1f}",
                f"{report['at_fork_mb']:.0f} / {report['before_mb']:.0f}",
                f"{report['maxrss_mb']:.0f}",
                f"{report['hwm_mb']:.0f}",
                f"{report['end_mb']:.0f}",
                "yes" if report["maxrss_mb"] < RSS_BAR_MB else "**no**",
            )
        )
    header: tuple[str, ...] = (
        "N",
        "wall s",
        "rows/s",
        "client CPU s",
        "RSS at fork / after imports MB",
        "peak RSS MB (ru_maxrss)",
        "VmHWM MB",
        "RSS at end MB",
        f"< {RSS_BAR_MB:.0f} MB",
    )
    print()
    print(table(rows, header))

    print()
    checks = []
    for count, report, check in results:
        checks.append(
            (
                f"{count:,}",
                f"{check['shape'][0]:,} x {check['shape'][1]} {check['dtype']}",
                f"{report['rows']:,}",
                check["nan_rows"],
                f"{check['sampled'] - check['wrong']:,} / {check['sampled']:,}",
                f"{check['id_lines']:,}, {check['bad_ids']} wrong",
                f"{report['requests']:,}",
                f"{report['failed']} / {report['retries']} / {report['server_429']}",
            )
        )
    header = (
        "N",
        "output",
        "rows reported",
        "NaN rows",
        "sampled rows exact (atol 1e-6)",
        "id sidecar: lines, rows not their record",
        "requests",
        "failed / retries / 429s",
    )
    print(table(checks, header))

    print()
    lines = []
    for count, report, _ in results:
        samples = report["samples"]
        if not samples:
            continue
        picks = [samples[int(q * (len(samples) - 1))] for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
        lines.append((f"{count:,}", *(f"{rows:,}: {mb:.0f}" for rows, mb in picks)))
    if lines:
        header = ("N", "first sample", "25%", "50%", "75%", "last sample")
        print("RSS during the job (rows done: MB)")
        print()
        print(table(lines, header))

    shape_ok = all(
        check["shape"] == (count, DIMS)
        and check["nan_rows"] == 0
        and check["wrong"] == 0
        and check["bad_ids"] == 0
        and check["id_lines"] == count
        for count, _, check in results
    )
    peaks = [report["maxrss_mb"] for _, report, _ in results]
    print()
    print(f"outputs correct: {'yes' if shape_ok else 'NO'}")
    print(f"peak RSS spread across N: {max(peaks) - min(peaks):.1f} MB (max {max(peaks):.0f} MB)")


if __name__ == "__main__":
    main()
