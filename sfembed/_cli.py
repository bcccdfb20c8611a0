"""The command line: arguments -> settings -> ``asyncio.run(...)`` -> exit code.

Exit codes: 0 all embedded; 1 some records failed, or an error stopped the job; 2 bad usage (a
mistyped option, a setting out of range, clashing paths, a resume that does not match); 75
stopped by a signal after a checkpoint (resumable); 130 interrupted at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import __version__, testing
from ._client import EmbeddingClient, client_for
from ._config import DEFAULT_KEY_ENV, RateLimits, Settings, load_settings, model_spec
from ._engine import shared_limiter_for
from ._estimate import dry_run, price_of
from ._exceptions import ConfigError, SFEmbedError
from ._job import JobSummary, run_job
from ._manifest import load_manifest, manifest_path_for
from ._options import add_options, overrides, replaced
from ._progress import TqdmProgress
from ._quota import SharedLimiter
from ._report import load_report, plot_report, report_table
from ._sources import count_lines, find_sources

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: A job stopped by a signal after a clean checkpoint: run it again with --resume (EX_TEMPFAIL).
EXIT_STOPPED = 75

_DESCRIPTION = """\
Embed a corpus through the SiliconFlow embeddings API as fast as your account's rate limits
allow. Every record gets its row, in input order; a record that cannot be embedded is listed
in an errors file with the reason. A killed job continues with --resume, and a cache beside
the output means a rerun sends only the texts that changed.

examples:
  export SILICONFLOW_API_KEY=...
  sfembed embed docs.jsonl --out vectors.npy --model BAAI/bge-m3 --tpm 500000 --rpm 2000
  sfembed embed docs.jsonl --out vectors.npy --resume-or-restart --report run.json
"""

_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHOWN_VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]*")  # a conventional name, safe to print back


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sfembed`` command; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:  # argparse: --help, --version (0) or a usage error (2)
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    logging.basicConfig(format="sfembed: %(message)s", level=logging.WARNING)
    try:
        return int(asyncio.run(args.run(args)))
    except ConfigError as error:
        print(f"sfembed: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SFEmbedError as error:
        print(f"sfembed: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:  # the disk refused a write: full, read-only, too large a file
        where = f"{error.filename}: " if error.filename else ""
        print(f"sfembed: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sfembed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfembed",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sfembed {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_embed(commands)
    _add_report(commands)
    _add_serve(commands)
    return parser


def _add_report(commands: Any) -> None:
    report = commands.add_parser(
        "report",
        help="show a run report as a table, or plot it",
        description="Print the run report a job wrote with --report as a table; with --plot, "
        "also draw its tokens per window against the TPM limit, with the 429s, as a PNG.",
    )
    report.add_argument("report", metavar="REPORT", help="the run report (JSON) a job wrote")
    report.add_argument(
        "--plot",
        metavar="PATH",
        help="draw the plot into this PNG file; needs pip install 'sfembed[plot]' "
        "(default: no plot)",
    )
    report.set_defaults(run=_show_report)


async def _show_report(args: argparse.Namespace) -> int:
    report = load_report(args.report)
    print(report_table(report))
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}")
    return EXIT_OK


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the SiliconFlow-compatible local server, for trials and tests",
        description="Run sfembed's SiliconFlow-compatible server on this machine (real HTTP, "
        "the provider's error shapes, rate limits and injected faults). It prints its URL; "
        "clients must send the key given by --api-key.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="HOST",
        help="the address to listen on (default: 127.0.0.1)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=0,
        metavar="PORT",
        help="the port to listen on; 0 picks a free one (default: 0)",
    )
    serve.add_argument(
        "--api-key",
        default="sk-local-test",
        metavar="KEY",
        help="the key clients must send (default: sk-local-test)",
    )
    serve.add_argument(
        "--window-s",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the rate-limit window, in seconds (default: 60)",
    )
    serve.add_argument(
        "--rpm",
        type=int,
        metavar="N",
        help="requests per window allowed per model (default: no limit)",
    )
    serve.add_argument(
        "--tpm",
        type=int,
        metavar="N",
        help="tokens per window allowed per model (default: no limit)",
    )
    for fault, what in (
        ("503", "answered 503 Service Unavailable"),
        ("504", "answered 504 Gateway Timeout"),
        ("reset", "whose connection is reset"),
        ("stall", "left unanswered for a while"),
    ):
        serve.add_argument(
            f"--rate-{fault}",
            type=float,
            default=0.0,
            metavar="FRACTION",
            help=f"the fraction of requests {what}, 0 to 1 (default: 0)",
        )
    serve.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="the seed of the faults' random choices (default: 0)",
    )
    serve.set_defaults(run=_serve)


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
    embed = commands.add_parser(
        "embed",
        help="embed every record of a file into an output file",
        description="Embed every record of INPUT into --out, in input order. Failed records "
        "keep their row (NaN) and are listed, with the reason, in an errors file.",
    )
    embed.add_argument(
        "--config",
        metavar="PATH",
        help="a TOML file of job settings (see configs/); flags given here win "
        "over its keys (default: none)",
    )
    groups = {
        name: embed.add_argument_group(name)
        for name in (
            "input",
            "output",
            "model",
            "account limits",
            "service",
            "reliability",
            "progress",
        )
    }
    groups["input"].add_argument(
        "input",
        metavar="INPUT",
        nargs="+",
        help="what to embed: JSONL, TXT (one text per line), CSV/TSV or Parquet files, plain or "
        ".gz/.zst; folders of them; globs; or - for standard input. Several are read as one "
        "job in sorted path order",
    )
    groups["output"].add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the output file: .npy (with the ids in .ids.jsonl), .jsonl or .parquet; or a "
        "LanceDB table, NAME.lance (or its database folder with --table) (required)",
    )
    groups["output"].add_argument(
        "--errors",
        metavar="PATH",
        help="the errors file, one JSON line per failed record, "
        "written only if one fails (default: OUT.errors.jsonl)",
    )
    groups["output"].add_argument(
        "--report",
        metavar="PATH",
        help="write a run report (JSON) here at every checkpoint and at the end: records, "
        "failures by reason, the server's tokens, requests, 429s, cost, and per window the share "
        "of the limits used; see it with 'sfembed report PATH' (default: none)",
    )
    groups["service"].add_argument(
        "--local",
        action="store_true",
        help="run against the built-in local server: try anything without a key (default: off)",
    )
    groups["service"].add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="send the key over plain http to a host other than this machine (default: refused)",
    )
    reliability = groups["reliability"]
    reliability.add_argument(
        "--resume",
        action="store_true",
        help="continue the job OUT's manifest describes after its last "
        "checkpoint; refused if the input or a setting changed "
        "(default: start over)",
    )
    reliability.add_argument(
        "--resume-or-restart",
        action="store_true",
        help="continue the earlier job if it can be, else start over "
        "(the cache keeps what is unchanged): one command for every night "
        "(default: off)",
    )
    reliability.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor fill the cache (default: the cache is used)",
    )
    progress = groups["progress"]
    progress.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)"
    )
    progress.add_argument(
        "--dry-run",
        action="store_true",
        help="count the tokens exactly and print the requests, time and cost "
        "it would take; send nothing (default: off)",
    )
    progress.add_argument(
        "--prices",
        metavar="PATH",
        help="prices per million tokens (TOML), for the cost in --dry-run and --report "
        "(default: configs/prices.toml if present)",
    )
    add_options(groups)
    embed.set_defaults(run=_embed)


def _settings(args: argparse.Namespace) -> Settings:
    """The config file's settings, then every flag given on top (``dataclasses.replace``)."""
    settings = load_settings(args.config)
    for key, value in overrides(args).items():
        settings = replaced(settings, key, value)
    if args.allow_insecure_http:
        settings = replaced(settings, "allow_insecure_http", True)
    return replaced(settings, "io.cache", False) if args.no_cache else settings


def _check_service(settings: Settings) -> None:
    """Refuse, without printing them, a key given where a variable's name belongs, a variable
    that holds no key, and a base URL with credentials or a query. Raises ConfigError."""
    name = settings.api_key_env
    shown = name if _SHOWN_VARIABLE.fullmatch(name) else "named by --api-key-env"
    if not _VARIABLE.fullmatch(name):
        raise ConfigError(
            "--api-key-env takes the name of an environment variable (such as "
            f"{DEFAULT_KEY_ENV}), not the key itself: export the key in a variable and name it"
        )
    if not os.environ.get(name, "").strip():  # the client strips a key file's newline
        raise ConfigError(f"no API key: set the environment variable {shown}")
    parts = urlsplit(settings.base_url)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            "the base URL holds credentials (user:password@host): remove them; the API key "
            "goes in the environment variable --api-key-env names"
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            "the base URL holds a query string or fragment (after ? or #): give the API's "
            "address only, such as https://api.siliconflow.cn/v1"
        )


async def _embed(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.dry_run:
        return _print_dry_run(args, settings)
    if not args.local:
        _check_service(settings)
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
            resume=args.resume or args.resume_or_restart,
            restart=args.resume_or_restart,
            stop=stop,
            limiter=limiter,
            report_path=args.report,
            **_pricing(args, settings),
        )
    )
    try:
        with _Signals(stop, job, settings.timeouts.grace_s) as signals:
            summary = await _outcome(job)
    finally:
        if progress is not None:
            progress.close(progress.last)
    if summary is not None:
        return _finish(summary, settings.rate, limiter)
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


def _finish(summary: JobSummary, limits: RateLimits, limiter: SharedLimiter | None) -> int:
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


def _count_lines(inputs: list[str]) -> int | None:
    """Lines of the inputs, for the bar's total (None for binary, compressed or piped inputs,
    or inputs that cannot be read: the job then says why)."""
    try:
        return count_lines(find_sources(inputs))
    except (SFEmbedError, OSError):
        return None


def _pricing(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The price per million tokens of the job's model, and the file it comes from: a prices
    file the user names must exist; the shipped default is used when present."""
    prices = Path(args.prices) if args.prices else _PRICES
    if args.prices is None and not prices.exists():
        return {"price_per_million": None, "prices_file": None}
    spec = model_spec(settings)
    return {"price_per_million": price_of(spec.name, prices), "prices_file": str(prices)}


def _print_dry_run(args: argparse.Namespace, settings: Settings) -> int:
    spec = model_spec(settings)
    pricing = _pricing(args, settings)
    known = pricing["prices_file"] is not None
    plan = dry_run(args.input, settings, spec, pricing["price_per_million"] or 0.0)
    source = (
        f"prices per million tokens from {pricing['prices_file']}"
        if known
        else ("no prices file found")
    )
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
