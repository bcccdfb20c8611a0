"""What does the cache save a nightly job? Three runs of one 100,000-document job, JSONL -> .npy.

    python benchmarks/bench_cache.py [--count 100000] [--changed 0.02] [--workdir DIR] [--keep]
    python benchmarks/bench_cache.py --cpu [--count 100000] [--workdir DIR] [--keep]

1. ``first``: an empty cache; every document is sent.
2. ``unchanged``: the same file again: every vector should come from the cache, zero requests.
3. ``changed``: a copy in which a fraction (2% by default) of the documents was edited: only
   those should be sent.

A local server with realistic limits for a small account (RPM 2,000 and TPM 2,000,000 per 60 s
window would make the first run take minutes, so the window is 6 s: RPM 2,000, TPM 500,000 per 6
s) runs in its own process and counts requests and embedded tokens. Each run's output is checked
against the server's known vectors (row i is record i). Printed: requests, tokens embedded, texts
from the cache, wall time and the output check, per run.

With ``--cpu``, the cache alone, as a job uses it: ``lookup`` then ``store`` of ``--count`` new
rows of 1,024 dims in requests of 64, then ``close``, in this process; printed, the CPU per row
(user and system time apart, the cache's thread included) of each run, against an empty cache.

``--workdir`` holds the inputs, the outputs and the cache: 1.6 GB at 100,000 documents. It must
be new, empty, or one this benchmark made (one holding other files is refused, not emptied), and
it is deleted at the end, unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).parent))
from _harness import fresh_workdir, server_process, table

from sfembed import EmbeddingCache, EmbeddingClient, RateLimits, load_settings, testing
from sfembed._cache import normalise
from sfembed._cachestore import vectors_path
from sfembed._job import CACHE_NAME, JobSummary, run_job

MODEL = "BAAI/bge-m3"
KEY = "sk-local-test"
WINDOW_S = 6.0
RPM, TPM = 2_000, 500_000


def corpus(count: int, seed: int) -> list[str]:
    texts = testing.synthetic_corpus(count, seed=seed, long_every=0)
    return [f"{n}: {text[:400]}" for n, text in enumerate(texts)]


def write(path: Path, texts: list[str]) -> None:
    with open(path, "wb") as out:
        for n, text in enumerate(texts):
            out.write(orjson.dumps({"id": f"doc-{n}", "text": text}) + b"\n")


async def job(url: str, source: Path, out: Path) -> JobSummary:
    rate = RateLimits(rpm=RPM, tpm=TPM, window_s=WINDOW_S)
    settings = load_settings(base_url=url, rate=rate, model=MODEL)
    async with EmbeddingClient(api_key=KEY, base_url=url) as client:
        return await run_job(source, out, settings, client=client)


def check(out: Path, texts: list[str], sample: int = 500) -> str:
    rows = np.load(out, mmap_mode="r")
    if rows.shape[0] != len(texts) or np.isnan(rows).any():
        return "WRONG shape or NaN"
    picks = random.Random(1).sample(range(len(texts)), min(sample, len(texts)))
    wrong = sum(
        # Texts are sent normalised (see sfembed._cache): the server's vector is of that form.
        not np.allclose(rows[i], testing.expected_embedding(MODEL, normalise(texts[i])), atol=1e-6)
        for i in picks
    )
    return f"{len(picks) - wrong}/{len(picks)} sampled rows right"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run(name: str, source: Path, out: Path, texts: list[str], port: int) -> dict[str, Any]:
    # One port for every run: the cache files vectors under the endpoint that made them, and a
    # server on another port is another endpoint, whose vectors are not served.
    config = testing.ServerConfig(
        window_s=WINDOW_S, default_limits=testing.ModelLimits(rpm=RPM, tpm=TPM), port=port
    )
    started = time.monotonic()
    with server_process(config) as (url, box):
        summary = asyncio.run(job(url, source, out))
    wall = time.monotonic() - started
    report = box[0]
    return {
        "run": name,
        "records": f"{summary.records:,}",
        "requests": f"{report.requests:,}",
        "tokens embedded": f"{sum(tokens for _, tokens in report.accepted):,}",
        "from cache": f"{summary.stats.cached:,}",
        "wall s": f"{wall:.1f}",
        "output": check(out, texts),
    }


async def _lookup_and_store(path: Path, keys: list[bytes], rows: np.ndarray) -> None:
    async with EmbeddingCache(path) as cache:
        for start in range(0, len(keys), 64):
            part = keys[start : start + 64]
            await cache.lookup(MODEL, rows.shape[1], part)
            # A fresh array per request, as the decoder makes them.
            await cache.store(MODEL, rows.shape[1], part, rows[: len(part)].copy())


def cpu(count: int, workdir: Path, runs: int = 3) -> None:
    """CPU per row of lookup + store + close of ``count`` new rows, ``runs`` times."""
    rows = np.random.default_rng(1).standard_normal((64, 1024), dtype=np.float32)
    results = []
    for run in range(runs):
        path = workdir / f"cpu-{run}" / "cache.sqlite"
        path.parent.mkdir(parents=True)
        keys = [os.urandom(16) for _ in range(count)]
        before = resource.getrusage(resource.RUSAGE_SELF)
        asyncio.run(_lookup_and_store(path, keys, rows))
        after = resource.getrusage(resource.RUSAGE_SELF)
        user = (after.ru_utime - before.ru_utime) / count * 1e6
        system = (after.ru_stime - before.ru_stime) / count * 1e6
        results.append((f"{run + 1}", f"{user:.2f}", f"{system:.2f}", f"{user + system:.2f}"))
        shutil.rmtree(path.parent)
    print(f"{count:,} rows of 1,024 dims, lookup + store in requests of 64, then close")
    print(table(results, ("run", "user us/row", "system us/row", "total us/row")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.02)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/sfembed-bench-cache"),
        help="folder of the runs' files: new, empty, or one this benchmark made; emptied first, "
        "deleted at the end (default: %(default)s)",
    )
    parser.add_argument("--cpu", action="store_true", help="the cache's CPU per row, alone")
    parser.add_argument(
        "--keep", action="store_true", help="keep --workdir and its files (1.6 GB at 100,000)"
    )
    args = parser.parse_args()
    fresh_workdir(args.workdir)
    try:
        if args.cpu:
            cpu(args.count, args.workdir)
        else:
            three_runs(args)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


def three_runs(args: argparse.Namespace) -> None:
    """The first run, the same file again, and the edited copy."""
    texts = corpus(args.count, seed=4)
    edited = list(texts)
    picks = random.Random(2).sample(range(args.count), int(args.count * args.changed))
    for n in picks:
        edited[n] = edited[n] + " (edited)"
    write(args.workdir / "docs.jsonl", texts)
    write(args.workdir / "docs-edited.jsonl", edited)
    port = free_port()
    rows = [
        run("first", args.workdir / "docs.jsonl", args.workdir / "a.npy", texts, port),
        run("unchanged", args.workdir / "docs.jsonl", args.workdir / "b.npy", texts, port),
        run("changed", args.workdir / "docs-edited.jsonl", args.workdir / "c.npy", edited, port),
    ]
    cache = args.workdir / CACHE_NAME
    index, vectors = (path.stat().st_size / 2**20 for path in (cache, vectors_path(cache)))
    print(
        f"{args.count:,} documents, {len(picks):,} edited; cache: index {index:,.0f} MiB, "
        f"vectors {vectors:,.0f} MiB"
    )
    print(table([tuple(row.values()) for row in rows], tuple(rows[0])))


if __name__ == "__main__":
    main()
