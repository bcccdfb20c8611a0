"""Throughput of sfembed.testing.LocalServer: can it keep up with the engine's benchmarks?

The server runs alone in a child process (one core, as in a test run); this process drives it with
N concurrent aiohttp requests of 64 unique texts each and prints requests/s, embeddings/s, latency
percentiles and the server's CPU use (100% means the server was the bottleneck)::

    .venv/bin/python benchmarks/bench_server.py --seconds 3 --concurrency 1 8 32

Items never repeat within the LRU cache's reach, so every vector is really generated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import orjson

MODEL = "BAAI/bge-m3"  # 1024 dimensions
KEY = "sk-local-test"
BODIES = 256  # distinct request bodies cycled through: 256 x 64 items outrun the vector cache
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "embedding",
    "engines",
    "count",
    "tokens",
]


@dataclass
class Run:
    """One measured load: format, concurrency and what it achieved."""

    encoding: str
    concurrency: int
    requests: int
    seconds: float
    latencies_s: list[float]
    server_cpu_s: float
    failures: int


def serve_forever() -> None:
    """Child process: run the server, print its URL on stdout, wait to be killed."""
    from sfembed.testing import ServerConfig, serve

    def ready(url: str) -> None:
        print(url, flush=True)

    asyncio.run(serve(ServerConfig(), on_ready=ready))


def text(doc: int, item: int) -> str:
    """A unique ~300-character text (about 60 tokens)."""
    words = [WORDS[(doc * 7 + item + i) % len(WORDS)] for i in range(48)]
    return f"document {doc} item {item}: " + " ".join(words)


def bodies(encoding: str, items: int) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "model": MODEL,
                "input": [text(doc, i) for i in range(items)],
                "encoding_format": encoding,
            }
        )
        for doc in range(BODIES)
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def worker(
    session: aiohttp.ClientSession, url: str, load: list[bytes], start: int, deadline: float
) -> tuple[int, list[float], int]:
    done, failures, latencies = 0, 0, []
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    while time.perf_counter() < deadline:
        body = load[(start + done + failures) % len(load)]
        sent = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()  # the full body crosses the wire; parsing it is the client's cost
            ok = resp.status == 200
        latencies.append(time.perf_counter() - sent)
        done, failures = done + ok, failures + (not ok)
    return done, latencies, failures


async def measure(
    url: str, pid: int, encoding: str, concurrency: int, seconds: float, items: int
) -> Run:
    load = bodies(encoding, items)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await worker(session, url, load, 0, time.perf_counter() + 0.3)  # warm up
        cpu_before, started = cpu_seconds(pid), time.perf_counter()
        deadline = started + seconds
        results = await asyncio.gather(
            *(worker(session, url, load, i * 17, deadline) for i in range(concurrency))
        )
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
    latencies = sorted(lat for _, lats, _ in results for lat in lats)
    done = sum(count for count, _, _ in results)
    failures = sum(fail for _, _, fail in results)
    return Run(encoding, concurrency, done, elapsed, latencies, cpu, failures)


def row(run: Run, items: int) -> str:
    rps = run.requests / run.seconds
    p50 = run.latencies_s[len(run.latencies_s) // 2] * 1000
    p99 = run.latencies_s[int(len(run.latencies_s) * 0.99)] * 1000
    cpu = 100 * run.server_cpu_s / run.seconds
    return (
        f"{run.encoding:>7} {run.concurrency:>5} {rps:>9.0f} {rps * items:>11.0f} "
        f"{p50:>8.1f} {p99:>8.1f} {cpu:>9.0f}% {run.failures:>6}"
    )


async def bench(url: str, pid: int, args: argparse.Namespace) -> None:
    print(f"{args.items} items x 1024-d ({MODEL}) per request, {args.seconds:g} s per row")
    print(f"{'format':>7} {'conc':>5} {'req/s':>9} {'emb/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'srv cpu':>10} {'errors':>6}")  # fmt: skip
    for encoding in ("base64", "float"):
        for concurrency in args.concurrency:
            run = await measure(url, pid, encoding, concurrency, args.seconds, args.items)
            print(row(run, args.items), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--items", type=int, default=64, help="items per request (max 64)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_forever()
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip() + "/embeddings"
        asyncio.run(bench(url, child.pid, args))
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    main()
