"""The command line: arguments -> settings -> ``asyncio.run(...)`` -> exit code. Thin by design."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import testing
from ._client import EmbeddingClient
from ._config import RateLimits, Settings, load_settings
from ._engine import catalog_for, client_for, shared_limiter_for
from ._exceptions import SFEmbedError
from ._job import JobSummary, dry_run, price_of, run_job
from ._manifest import load_manifest, manifest_path_for
from ._progress import TqdmProgress
from ._quota import SharedLimiter

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: A job stopped by a signal after a clean checkpoint: run it again with --resume (EX_TEMPFAIL).
EXIT_STOPPED = 75


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
    _add_embed(commands)
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


def _add_embed(commands: Any) -> None:
    embed = commands.add_parser("embed", help="embed every record of a file into an output file")
    embed.add_argument("input", help="JSONL, TXT, CSV/TSV or Parquet file")
    embed.add_argument("--out", required=True, help=".npy (default), .jsonl or .parquet path")
    embed.add_argument("--config", help="job settings (TOML); flags override its keys")
    embed.add_argument("--dry-run", action="store_true", help="count and estimate; send nothing")
    embed.add_argument("--local", action="store_true", help="use the built-in local server")
    embed.add_argument("--errors", help="errors file (default: OUT.errors.jsonl)")
    embed.add_argument("--prices", default=None, help="prices TOML for --dry-run")
    embed.add_argument("--no-progress", action="store_true")
    embed.add_argument(
        "--resume", action="store_true", help="continue the job OUT's manifest describes"
    )
    embed.add_argument(
        "--no-cache", action="store_true", help="neither read nor fill the cache (config io.cache)"
    )
    embed.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="send the key over plain http to a host other than this machine "
        "(config allow_insecure_http)",
    )
    for flag, key, kind in _FLAGS:
        embed.add_argument(
            flag,
            dest=key.replace(".", "__"),
            type=kind,
            default=None,
            help=_FLAG_HELP.get(key, f"config key {key}"),
        )
    embed.set_defaults(run=_embed)


#: Flags that override a config key: (flag, dotted config key, type).
_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--model", "model", str),
    ("--format", "io.output_format", str),
    ("--input-format", "io.input_format", str),
    ("--id-field", "io.id_field", str),
    ("--text-field", "io.text_field", str),
    ("--image-field", "io.image_field", str),
    ("--dtype", "io.dtype", str),
    ("--base-url", "base_url", str),
    ("--api-key-env", "api_key_env", str),
    ("--rpm", "rate.rpm", int),
    ("--tpm", "rate.tpm", int),
    ("--window-s", "rate.window_s", float),
    ("--concurrency", "concurrency", int),
    ("--batch-size", "batch.max_items", int),
    ("--encoding", "encoding_format", str),
    ("--dimensions", "dimensions", int),
    ("--long", "long_mode", str),
    ("--overlap-tokens", "overlap_tokens", int),
    ("--truncate-side", "truncate_side", str),
    ("--checkpoint-rows", "io.checkpoint_rows", int),
    ("--cache", "io.cache_path", str),
    ("--grace-s", "timeouts.grace_s", float),
    ("--quota", "quota", str),
    ("--quota-account", "quota_account", str),
)

_FLAG_HELP = {
    "quota": "share the account's limits with every other worker on this Redis, e.g. "
    "redis://host:6379/0 (config key quota; default: pace alone); needs sfembed[redis]",
    "quota_account": "the label of the account whose quota is shared: workers with the same "
    "label and model share one quota (config key quota_account; default: default)",
}


def _settings(args: argparse.Namespace) -> Settings:
    """The config file's settings, then every flag given on top (``dataclasses.replace``)."""
    settings = load_settings(args.config)
    for _, key, _ in _FLAGS:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            settings = _replace(settings, key, value)
    if args.allow_insecure_http:
        settings = _replace(settings, "allow_insecure_http", True)
    return _replace(settings, "io.cache", False) if args.no_cache else settings


def _replace(settings: Settings, key: str, value: object) -> Settings:
    if "." not in key:
        top: dict[str, Any] = {key: value}
        return dataclasses.replace(settings, **top)
    table, name = key.split(".")
    inner: dict[str, Any] = {name: value}
    outer: dict[str, Any] = {table: dataclasses.replace(getattr(settings, table), **inner)}
    return dataclasses.replace(settings, **outer)


async def _embed(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.dry_run:
        return _print_dry_run(args, settings)
    if not args.local:
        async with client_for(settings) as client:
            return await _run(args, settings, client)
    limits = testing.ModelLimits(rpm=settings.rate.rpm, tpm=settings.rate.tpm)
    config = testing.ServerConfig(window_s=settings.rate.window_s, default_limits=limits)
    async with testing.LocalServer(config) as server:
        print(
            f"local server on {server.url} (RPM {limits.rpm:,}, TPM {limits.tpm:,} "
            f"per {settings.rate.window_s:g} s)"
        )
        local = dataclasses.replace(settings, base_url=server.url)
        async with EmbeddingClient(api_key=config.api_key, base_url=server.url) as client:
            return await _run(args, local, client)


async def _run(args: argparse.Namespace, settings: Settings, client: EmbeddingClient) -> int:
    if not settings.quota:
        return await _run_with(args, settings, client, None)
    async with shared_limiter_for(settings) as limiter:
        return await _run_with(args, settings, client, limiter)


async def _run_with(
    args: argparse.Namespace,
    settings: Settings,
    client: EmbeddingClient,
    limiter: SharedLimiter | None,
) -> int:
    progress = None if args.no_progress else TqdmProgress(total=_count_lines(args.input))
    stop = asyncio.Event()
    job = asyncio.ensure_future(
        run_job(
            args.input,
            args.out,
            settings,
            client=client,
            errors_path=args.errors,
            on_batch=progress.update if progress else None,
            resume=args.resume,
            stop=stop,
            limiter=limiter,
        )
    )
    try:
        with _Signals(stop, job, settings.timeouts.grace_s) as signals:
            summary = await _outcome(job)
    finally:
        if progress is not None:
            progress.close(progress.last)
    if summary is not None:
        return _report(summary, settings.rate, limiter)
    if signals.forced:
        print("sfembed: exited at once; run again with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    grace = f"the {settings.timeouts.grace_s:g} s grace period ended with requests in flight"
    print(
        f"sfembed: stopped after {_records_done(args.out)} records ({grace}); "
        "run again with --resume to continue",
        file=sys.stderr,
    )
    return EXIT_STOPPED


def _records_done(out: str) -> str:
    """The records the last checkpoint of the job writing ``out`` holds, as text."""
    try:
        manifest = load_manifest(manifest_path_for(out))
    except SFEmbedError:
        manifest = None
    return "?" if manifest is None else f"{manifest.checkpoint.records:,}"


async def _outcome(job: asyncio.Future[JobSummary]) -> JobSummary | None:
    """The job's summary, or None when a second signal or the grace period cancelled it."""
    try:
        return await job
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves, not just the job
        return None


def _report(summary: JobSummary, limits: RateLimits, limiter: SharedLimiter | None) -> int:
    print(_summary(summary, limits))
    if limiter is not None:
        print(f"  {'quota':<16}{_shared(limiter)}")
    if summary.errors_path is not None:
        print(f"{summary.failed:,} record(s) failed: see {summary.errors_path}")
    if summary.stopped:
        again = "with --resume to continue" if summary.manifest_path else "to start over"
        print(f"stopped after {summary.records:,} records; run again {again}", file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_FAILED if summary.errors_path is not None else EXIT_OK


class _Signals:
    """SIGINT and SIGTERM while a job runs: the first stops it gracefully (no new requests, those
    in flight answered, a checkpoint, then exit) within ``grace_s`` seconds; a second cancels it
    at once. Either way the manifest's last checkpoint leaves the job resumable."""

    def __init__(self, stop: asyncio.Event, job: asyncio.Future[Any], grace_s: float) -> None:
        self.stop = stop
        self.job = job
        self.grace_s = grace_s
        self.loop = asyncio.get_running_loop()
        self.deadline: asyncio.TimerHandle | None = None
        self.forced = False  # a second signal, not the grace period, cancelled the job

    def __enter__(self) -> _Signals:
        for number in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(number, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self.loop.remove_signal_handler(number)
        if self.deadline is not None:
            self.deadline.cancel()

    def _on_signal(self) -> None:
        if self.stop.is_set():
            print("sfembed: second signal, exiting now", file=sys.stderr)
            self.forced = True
            self.job.cancel()
            return
        print(
            f"sfembed: stopping: waiting up to {self.grace_s:g} s for requests in flight "
            "(Ctrl-C again to exit at once)",
            file=sys.stderr,
        )
        self.stop.set()
        self.deadline = self.loop.call_later(self.grace_s, self.job.cancel)


def _count_lines(path: str) -> int | None:
    """Lines of a text input, for the bar's total (None for binary formats)."""
    if path.endswith(".parquet"):
        return None
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def _print_dry_run(args: argparse.Namespace, settings: Settings) -> int:
    spec = catalog_for(settings)[settings.model]
    # A prices file the user names must exist; the shipped default is used when present.
    prices = Path(args.prices) if args.prices else _PRICES
    known = args.prices is not None or prices.exists()
    plan = dry_run(args.input, settings, spec, price_of(spec.name, prices) if known else 0.0)
    source = f"prices per million tokens from {prices}" if known else "no prices file found"
    rows = [
        ("records", f"{plan.records:,} ({plan.unusable:,} unusable)"),
        ("tokens (exact)", f"{plan.tokens:,}"),
        ("items after splitting", f"{plan.items:,}"),
        ("requests", f"{plan.requests:,}"),
        ("wall time at the limits", f"{plan.wall_s:,.0f} s ({plan.wall_s / 3600:.2f} h)"),
        ("cost", f"{plan.cost:,.2f} ({source})"),
    ]
    print("\n".join(f"  {name:<24}{value}" for name, value in rows))
    return EXIT_OK


_PRICES = Path("configs/prices.toml")


def _shared(limiter: SharedLimiter) -> str:
    said = f"shared through {limiter.where}, {limiter.max_workers:,} worker(s) seen at once"
    if limiter.fallbacks:
        said += f"; paced alone {limiter.fallbacks:,} time(s) while Redis was unreachable"
    return said


def _summary(summary: JobSummary, limits: RateLimits) -> str:
    stats = summary.stats
    windows = summary.wall_s / limits.window_s
    utilisation = stats.tokens / (limits.tpm * windows) if windows else 0.0
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
        ("TPM utilisation", f"{utilisation:.1%}"),
    ]
    if summary.resumed_records:
        lines.insert(1, ("resumed after", f"{summary.resumed_records:,} records done earlier"))
    return "\n".join(f"  {name:<16}{value}" for name, value in lines)
