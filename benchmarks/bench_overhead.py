"""What does the client cost? CPU seconds per million embeddings, pipeline against the raw floor.

    python benchmarks/bench_overhead.py [--documents 200000] [--formats base64,float]
                                        [--repeats 2] [--no-profile] [--profile-out PATH]

A local server without limits or added latency runs in its own process. Each measurement runs in
a fresh client process: after a warm-up of 2,000 documents (connections, tables, first-use
costs), it embeds N short unique documents to bge-m3 (1024 dimensions) and reports its own CPU
time (``time.process_time()``: user + system, all threads) around the run, split into user and
system from ``getrusage``, and the minor page faults it took (fresh memory the kernel had to
map). Three ways of sending:

* ``raw``: ``EmbeddingClient.embed`` on slices of 64 texts, ``asyncio.gather`` under a
  semaphore of 16: HTTP and decoding only, the floor of any client built on this one.
* ``stream``: the same pipeline through ``sfembed.embed_stream``, each batch of rows dropped
  once counted: the engine's own cost, without building the result (what a batch job pays
  before its writer).
* ``pipeline``: ``sfembed.embed(...)``: counting, packing, limiter, retries, reordering and the
  final (N, 1024) array; rate limits far above anything reached, concurrency 16.

The server's CPU over the same run is reported for context (it shares the machine's cores).
Then, unless ``--no-profile``, the base64 pipeline runs once more under cProfile; the statistics
go to ``--profile-out`` (``.prof``, plus a ``.txt`` by cumulative and by own time) and the top 15
by cumulative and by own time are printed. With ``--repeats`` above 1 the run of least CPU is
shown, and the highest per-million figure beside it.

The target: at most 20 CPU s per million embeddings.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import multiprocessing as mp
import pstats
import resource
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from _harness import server_process, table

from sfembed import EmbeddingClient, RateLimits, embed, embed_stream, load_settings, testing
from sfembed._types import EncodingFormat

MODEL = "BAAI/bge-m3"
DIMS = 1024
KEY = "sk-local-test"
ITEMS = 64
CONCURRENCY = 16
WARM_UP = 2_000
TARGET_S = 20.0


def documents(count: int, offset: int = 0) -> list[str]:
    """Short unique texts (about ten tokens each)."""
    return [f"document {i} about rivers and engines" for i in range(offset, offset + count)]


# --- the server: a LocalServer that also reports its CPU time -----------------------------------


def _serve(config: testing.ServerConfig, conn: Connection) -> None:
    """As the harness's, but what it sends back at the end is its CPU seconds since it started
    serving (the warm-up included), then its request count."""

    async def run() -> None:
        async with testing.LocalServer(config) as server:
            started = time.process_time()
            conn.send(server.url)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            conn.send((time.process_time() - started, server.stats.requests))

    asyncio.run(run())


# --- the client: one measured run in a process of its own ---------------------------------------


async def _pipeline(client: EmbeddingClient, texts: list[str], fmt: EncodingFormat) -> int:
    settings = load_settings(
        base_url="http://127.0.0.1",  # unused: the client is given
        rate=RateLimits(rpm=10**9, tpm=10**12),
        encoding_format=fmt,
        concurrency=CONCURRENCY,
    )
    rows = await embed(texts, model=MODEL, settings=settings, client=client)
    _spot_check(rows, texts)
    return int(rows.shape[0])


async def _stream(client: EmbeddingClient, texts: list[str], fmt: EncodingFormat) -> int:
    settings = load_settings(
        base_url="http://127.0.0.1",  # unused: the client is given
        rate=RateLimits(rpm=10**9, tpm=10**12),
        encoding_format=fmt,
        concurrency=CONCURRENCY,
    )
    rows = 0
    first: np.ndarray | None = None
    stream = embed_stream(texts, model=MODEL, settings=settings, client=client)
    async for batch in stream:
        if first is None:
            first = batch.embeddings
        rows += len(batch)
    assert first is not None
    _spot_check(first, texts[: len(first)])
    return rows


async def _raw(client: EmbeddingClient, texts: list[str], fmt: EncodingFormat) -> int:
    gate = asyncio.Semaphore(CONCURRENCY)
    checked: list[np.ndarray] = []

    async def one(start: int) -> int:
        async with gate:
            result = await client.embed(
                texts[start : start + ITEMS], model=MODEL, encoding_format=fmt
            )
        if start == 0:
            checked.append(result.embeddings)
        return int(result.embeddings.shape[0])

    counts = await asyncio.gather(*(one(start) for start in range(0, len(texts), ITEMS)))
    _spot_check(checked[0], texts[:ITEMS])
    return sum(counts)


def _spot_check(rows: np.ndarray, texts: list[str]) -> None:
    """A few rows against the server's vectors: a fast run that is wrong measures nothing."""
    if rows.shape != (len(texts), DIMS):
        raise SystemExit(f"got rows of shape {rows.shape} for {len(texts)} texts")
    for i in np.linspace(0, len(texts) - 1, 16).astype(int).tolist():
        if not np.allclose(rows[i], testing.expected_embedding(MODEL, texts[i]), atol=1e-6):
            raise SystemExit(f"row {i} is not the vector of its text")


_MODES = {"raw": _raw, "stream": _stream, "pipeline": _pipeline}


def _measure(
    url: str,
    mode: str,
    fmt: EncodingFormat,
    count: int,
    profile_out: str | None,
    conn: Connection,
) -> None:
    run = _MODES[mode]
    texts = documents(count)

    async def main() -> dict[str, Any]:
        async with EmbeddingClient(
            api_key=KEY, base_url=url, max_connections=CONCURRENCY
        ) as client:
            await run(client, documents(WARM_UP, offset=count), fmt)
            profiler = cProfile.Profile() if profile_out else None
            before = resource.getrusage(resource.RUSAGE_SELF)
            cpu, wall = time.process_time(), time.monotonic()
            if profiler is not None:
                profiler.enable()
            rows = await run(client, texts, fmt)
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            after = resource.getrusage(resource.RUSAGE_SELF)
        report: dict[str, Any] = {
            "rows": rows,
            "cpu_s": cpu,
            "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime,
            "wall_s": wall,
            "faults": after.ru_minflt - before.ru_minflt,
        }
        if profiler is not None and profile_out:
            report["profile"] = _save_profile(profiler, Path(profile_out))
        return report

    conn.send(asyncio.run(main()))


Entry = tuple[str, int, float, float]


def _save_profile(profiler: cProfile.Profile, path: Path) -> dict[str, list[Entry]]:
    """Write the .prof and a .txt (top 40 by cumulative, then by own time); return the top 15
    of each order as (function, calls, own s, cumulative s)."""
    profiler.dump_stats(str(path))
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(40)
    path.with_suffix(".txt").write_text(text.getvalue())
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    tops = {}
    for order in ("cumulative", "tottime"):
        rows = []
        for key in stats.sort_stats(order).fcn_list[:15]:  # type: ignore[attr-defined]
            _, calls, own, cumulative, _ = entries[key]
            filename, line, name = key
            where = f"{Path(filename).name}:{line}" if line else filename
            rows.append((f"{name} ({where})", calls, own, cumulative))
        tops[order] = rows
    return tops


def measure(
    url: str, mode: str, fmt: EncodingFormat, count: int, profile_out: str | None = None
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_measure, args=(url, mode, fmt, count, profile_out, child))
    process.start()
    child.close()
    try:
        report: dict[str, Any] = parent.recv()
    except EOFError:
        process.join()
        raise SystemExit(f"the {mode} {fmt} run failed (exit code {process.exitcode})") from None
    process.join()
    return report


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=200_000)
    parser.add_argument("--formats", default="base64,float")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell; least CPU shown")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-out", default="/tmp/sfembed-overhead-pipeline.prof")
    args = parser.parse_args()
    count = args.documents
    formats = args.formats.split(",")

    rows = []
    for fmt in formats:
        for mode in _MODES:
            runs = []
            for _ in range(args.repeats):
                with server_process(testing.ServerConfig(), serve=_serve) as (url, box):
                    report = measure(url, mode, fmt, count)
                report["server_cpu_s"], report["requests"] = box[0]
                runs.append(report)
                print(f"{mode} {fmt}: {report['cpu_s']:.1f} client CPU s", flush=True)
            rows.append(_row(mode, fmt, count, runs))
    profiled: dict[str, Any] = {}
    if not args.no_profile:
        with server_process(testing.ServerConfig(), serve=_serve) as (url, _):
            profiled = measure(url, "pipeline", "base64", count, args.profile_out)

    header = (
        "client",
        "format",
        "embeddings",
        "wall s",
        "embeddings/s",
        "client CPU s (user + sys)",
        "client CPU s per million",
        "page faults per embedding",
        "server CPU s (incl. warm-up)",
        f"<= {TARGET_S:.0f} s/M",
    )
    print()
    print(table(rows, header))
    if profiled:
        listing = Path(args.profile_out).with_suffix(".txt")
        print()
        print(
            f"cProfile of the base64 pipeline ({count:,} embeddings, {profiled['cpu_s']:.1f} CPU s "
            f"and {profiled['wall_s']:.1f} s wall under the profiler; listing in {listing})"
        )
        for order, title in (("cumulative", "cumulative time"), ("tottime", "own time")):
            print()
            print(f"Top 15 by {title}:")
            print()
            lines = [
                (name, f"{calls:,}", f"{own:.2f}", f"{cumulative:.2f}")
                for name, calls, own, cumulative in profiled["profile"][order]
            ]
            print(table(lines, ("function", "calls", "own s", "cumulative s")))


def _row(mode: str, fmt: str, count: int, runs: list[dict[str, Any]]) -> tuple[Any, ...]:
    """The run of least CPU, with the highest per-million figure of the others beside it."""
    report = min(runs, key=lambda run: run["cpu_s"])
    per_million = report["cpu_s"] / count * 1e6
    worst = max(run["cpu_s"] for run in runs) / count * 1e6
    spread = f" (max {worst:.1f})" if len(runs) > 1 else ""
    return (
        mode,
        fmt,
        f"{report['rows']:,}",
        f"{report['wall_s']:.1f}",
        f"{report['rows'] / report['wall_s']:,.0f}",
        f"{report['cpu_s']:.2f} ({report['user_s']:.2f} + {report['sys_s']:.2f})",
        f"{per_million:.1f}{spread}",
        f"{report['faults'] / count:.2f}",
        f"{report['server_cpu_s']:.1f}",
        "yes" if per_million <= TARGET_S else "**no**",
    )


if __name__ == "__main__":
    main()
