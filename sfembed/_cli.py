"""The command line: arguments -> settings -> ``asyncio.run(...)`` -> exit code. Thin by design."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import testing
from ._client import EmbeddingClient
from ._config import RateLimits, Settings, load_settings
from ._corpus import synthetic_corpus
from ._exceptions import SFEmbedError
from ._pipeline import JobStats, embed_stream
from ._progress import TqdmProgress

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sfembed`` command; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(asyncio.run(args.run(args)))
    except SFEmbedError as error:
        print(f"sfembed: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sfembed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfembed", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the SiliconFlow-compatible local server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    serve.add_argument("--api-key", default="sk-local-test", help="the key clients must send")
    serve.add_argument("--window-s", type=float, default=60.0)
    serve.add_argument("--rpm", type=int, help="requests per window, per model (default: none)")
    serve.add_argument("--tpm", type=int, help="tokens per window, per model (default: none)")
    for fault in ("503", "504", "reset", "stall"):
        serve.add_argument(f"--rate-{fault}", type=float, default=0.0, help=f"{fault} fraction")
    serve.add_argument("--seed", type=int, default=0)
    serve.set_defaults(run=_serve)
    demo = commands.add_parser("demo", help="embed a bundled sample against the local server")
    demo.add_argument("--records", type=int, default=2000)
    demo.add_argument("--model", default="BAAI/bge-m3")
    demo.add_argument("--config", help="a job config (TOML) to start from")
    demo.set_defaults(run=_demo)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    faults = testing.Faults(
        rate_503=args.rate_503,
        rate_504=args.rate_504,
        rate_reset=args.rate_reset,
        rate_stall=args.rate_stall,
        seed=args.seed,
    )
    config = testing.ServerConfig(
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        window_s=args.window_s,
        default_limits=testing.ModelLimits(rpm=args.rpm, tpm=args.tpm),
        faults=faults,
    )
    await testing.serve(config, on_ready=lambda url: print(f"serving on {url}", flush=True))
    return EXIT_OK


# The demo's account: small enough that pacing shows in a few seconds, over a 6 s window.
_DEMO_LIMITS = RateLimits(rpm=600, tpm=300_000, window_s=6.0)


async def _demo(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, model=args.model, rate=_DEMO_LIMITS)
    limits = testing.ModelLimits(rpm=_DEMO_LIMITS.rpm, tpm=_DEMO_LIMITS.tpm)
    config = testing.ServerConfig(window_s=_DEMO_LIMITS.window_s, default_limits=limits)
    print(f"sfembed demo: {args.records:,} mixed English/Chinese documents, some over-long")
    async with testing.LocalServer(config) as server:
        print(f"local server on {server.url} (RPM {limits.rpm}, TPM {limits.tpm} per 6 s)")
        documents = list(synthetic_corpus(args.records))
        local = dataclasses.replace(settings, base_url=server.url)
        stats, rows, checked = await _run_demo(local, documents, config.api_key or "")
        wall_s = time.monotonic() - stats.started_s
        print(_summary(stats, wall_s, _DEMO_LIMITS, server.stats.by_status.get(429, 0)))
    print(f"rows: {rows:,} for {len(documents):,} documents; {checked:,} checked in place")
    return EXIT_OK if rows == len(documents) and not stats.failures else EXIT_FAILED


async def _run_demo(
    settings: Settings, documents: list[str], key: str
) -> tuple[JobStats, int, int]:
    stats = JobStats()
    progress = TqdmProgress(total=len(documents))
    rows = checked = 0
    async with EmbeddingClient(api_key=key, base_url=settings.base_url) as client:
        refresher = asyncio.create_task(_refresh(progress, stats))
        try:
            async with contextlib.aclosing(
                embed_stream(
                    documents, model=settings.model, settings=settings, client=client, stats=stats
                )
            ) as batches:
                async for positions, vectors in batches:
                    checked += _check_in_place(settings, documents, positions, vectors)
                    rows += len(positions)
        finally:
            refresher.cancel()
            progress.close(stats)
    return stats, rows, checked


def _check_in_place(settings: Settings, documents: list[str], positions: Any, vectors: Any) -> int:
    """Compare every tenth row with the vector the server gives its document (short ones only)."""
    checked = 0
    for position, vector in zip(positions[::10], vectors[::10], strict=True):
        text = documents[int(position)]
        if len(text) < 2000:
            expected = testing.expected_embedding(settings.model, text)
            if not np.allclose(vector, expected, atol=1e-6):
                raise SFEmbedError(f"row {position} does not hold its document's vector")
            checked += 1
    return checked


async def _refresh(progress: TqdmProgress, stats: JobStats) -> None:
    while True:
        progress.update(stats)
        await asyncio.sleep(0.25)


def _summary(stats: JobStats, wall_s: float, limits: RateLimits, server_429s: int) -> str:
    windows = wall_s / limits.window_s
    utilisation = stats.tokens / (limits.tpm * windows) if windows else 0.0
    lines = [
        ("records", f"{stats.records:,}"),
        ("chunks", f"{stats.chunks:,}"),
        ("tokens", f"{stats.tokens:,}"),
        ("requests", f"{stats.requests:,}"),
        ("429s", f"{stats.rate_limited:,} (server saw {server_429s:,})"),
        ("retries", f"{stats.retries:,}"),
        ("failures", f"{len(stats.failures):,}"),
        ("wall time", f"{wall_s:,.1f} s"),
        ("TPM utilisation", f"{utilisation:.1%}"),
    ]
    return "\n".join(f"  {name:<16}{value}" for name, value in lines)
