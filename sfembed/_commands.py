"""The commands ``sfembed embed``, ``report`` and ``serve``, run from their parsed arguments.

``embed`` turns its flags into settings, checks the service's key and address, then runs the
job with a progress bar and signal handling (a first SIGINT or SIGTERM stops it after a
checkpoint, a second at once) and returns the exit code ``_cli`` documents.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import importlib
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._config import DEFAULT_KEY_ENV, RateLimits, Settings, load_settings, model_spec
from ._exceptions import ConfigError, SFEmbedError
from ._options import overrides, replaced

# The modules a command needs are imported when it runs, not here: --help and a usage error
# should not load the client, the local server or the cache, and a job should reach its first
# request without paying for what only a later moment of it needs.
if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._client import EmbeddingClient
    from ._job import JobSummary
    from ._quota import SharedLimiter

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "embed",
    "serve",
    "settings_from",
    "show_report",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: A job stopped by a signal after a clean checkpoint: run it again with --resume (EX_TEMPFAIL).
EXIT_STOPPED = 75

_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHOWN_VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]*")  # a conventional name, safe to print back
_PRICES = Path("configs/prices.toml")


def settings_from(args: argparse.Namespace) -> Settings:
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


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse two flags given together where one would quietly undo the other."""
    given = overrides(args)
    if args.local and "base_url" in given:
        raise ConfigError(
            "--local and --base-url: --local runs against the built-in server and would "
            "ignore the base URL; give one of them"
        )
    if args.no_cache and "io.cache_path" in given:
        raise ConfigError("--no-cache and --cache: the cache named would not be used; give one")


async def embed(args: argparse.Namespace) -> int:
    _check_flags(args)
    settings = settings_from(args)
    _check_for_model(settings)
    if args.dry_run:
        return _dry_run(args, settings)
    if not args.local:
        _check_service(settings)
    _load_beside_job("aiohttp.web" if args.local else "aiohttp")
    if not args.local:
        from ._client import client_for

        async with client_for(settings) as client:
            return await _run(args, settings, client)
    from ._client import EmbeddingClient
    from ._testing.server import LocalServer
    from ._testing.settings import ModelLimits, ServerConfig

    limits = ModelLimits(rpm=settings.rate.rpm, tpm=settings.rate.tpm)
    config = ServerConfig(window_s=settings.rate.window_s, default_limits=limits)
    async with LocalServer(config) as server:
        print(
            f"local server on {server.url} (RPM {limits.rpm:,}, TPM {limits.tpm:,} "
            f"per {settings.rate.window_s:g} s)"
        )
        local = dataclasses.replace(settings, base_url=server.url)
        async with EmbeddingClient(api_key=config.api_key, base_url=server.url) as client:
            return await _run(args, local, client)


def _check_for_long_mode(settings: Settings) -> None:
    """Refuse a setting the long mode ignores: the job would not run as asked."""
    mode = settings.long_mode
    if settings.truncate_side != "right" and mode != "truncate":
        raise ConfigError(
            f"truncate_side = {settings.truncate_side!r} does nothing unless long_mode = "
            f"'truncate' (it is {mode!r}: a long text is split, not cut)"
        )
    if settings.overlap_tokens and mode == "truncate":
        raise ConfigError(
            f"overlap_tokens = {settings.overlap_tokens} does nothing with long_mode = "
            "'truncate' (a long text is cut, not split into pieces)"
        )


def _check_for_model(settings: Settings) -> None:
    """Refuse dimensions the model does not offer, an overlap the model's pieces cannot hold
    (the cutter would quietly shorten it), and an image field for a text-only model, as usage
    errors (exit 2), before a file is touched. Raises ConfigError."""
    wanted, overlap = settings.dimensions, settings.overlap_tokens
    _check_for_long_mode(settings)
    image = settings.io.image_field
    if image and not model_spec(settings).accepts_images:
        raise ConfigError(
            f"io.image_field = {image!r} is not allowed: model {settings.model} takes text only "
            "(each record with an image would fail); leave it unset or choose a multimodal model"
        )
    if wanted is None and not overlap:
        return
    spec = model_spec(settings)
    most = (spec.max_input_tokens - spec.special_tokens) // 2  # half a piece, as cut
    if overlap > most:
        raise ConfigError(
            f"overlap_tokens = {overlap} is not allowed: model {spec.name} takes at most {most} "
            f"(half of a piece of {spec.max_input_tokens - spec.special_tokens} tokens)"
        )
    if wanted is None:
        return
    if not spec.accepts_dimensions:
        given = f"it gives {spec.dimensions[0]}; leave dimensions unset"
        raise ConfigError(
            f"dimensions = {wanted} is not allowed: model {spec.name} takes none ({given})"
        )
    if wanted not in spec.dimensions:
        offered = ", ".join(map(str, spec.dimensions))
        raise ConfigError(
            f"dimensions = {wanted} is not allowed: model {spec.name} offers {offered}"
        )


def _load_beside_job(library: str) -> None:
    """Import ``library`` (aiohttp, which the client needs) on a thread while this one imports
    the job's own modules, the first request needing both; return once both are loaded. Most of
    aiohttp's import time is its connector building two TLS contexts, which loads the system's
    certificates with the interpreter lock released (some 45 ms of CPU here, even for a
    plain-http server): the job's modules load meanwhile. The thread imports a library only,
    none of sfembed's modules, so neither thread can wait on a module the other is importing.

    The collector is off meanwhile: the imports allocate as many objects as a job's first
    thousands of records and free hardly any (measured: 6 young collections of 10,000, some
    12 ms, for nothing)."""

    def load() -> None:
        with contextlib.suppress(Exception):  # the client's own import raises it again
            importlib.import_module(library)

    collecting = gc.isenabled()
    gc.disable()
    try:
        thread = threading.Thread(target=load, name="sfembed-import")
        thread.start()
        from . import _job, _progress  # noqa: F401 (the job's modules, loaded meanwhile)

        thread.join()
    finally:
        if collecting:
            gc.enable()


async def _run(args: argparse.Namespace, settings: Settings, client: EmbeddingClient) -> int:
    if not settings.quota:
        return await _run_with(args, settings, client, None)
    from ._engine import shared_limiter_for

    async with shared_limiter_for(settings) as limiter:
        return await _run_with(args, settings, client, limiter)


async def _run_with(
    args: argparse.Namespace,
    settings: Settings,
    client: EmbeddingClient,
    limiter: SharedLimiter | None,
) -> int:
    from ._job import run_job
    from ._progress import TqdmProgress

    stop = asyncio.Event()
    count = functools.partial(_count_lines, args.input)
    progress = None if args.no_progress else TqdmProgress(count=count)
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
            # Only a report shows the cost (a prices file named is checked all the same).
            **(_pricing(args, settings) if args.report or args.prices else {}),
        )
    )
    async with progress or contextlib.nullcontext():
        with _Signals(stop, job, settings.timeouts.grace_s) as signals:
            summary = await _outcome(job)
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
    from ._manifest import load_manifest, manifest_path_for

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
    from ._summary import quota_line, summary_table

    print(summary_table(summary, limits))
    if limiter is not None:
        print(quota_line(limiter))
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


def _count_lines(inputs: list[str], stop: threading.Event) -> int | None:
    """Lines of the inputs, for the bar's total (None for binary, compressed or piped inputs,
    or inputs that cannot be read: the job then says why; or once ``stop`` is set)."""
    from ._sources import count_lines, find_sources

    try:
        return count_lines(find_sources(inputs), stop)
    except (SFEmbedError, OSError):
        return None


def _pricing(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The price per million tokens of the job's model, and the file it comes from: a prices
    file the user names must exist; the shipped default is used when present."""
    prices = Path(args.prices) if args.prices else _PRICES
    if args.prices is None and not prices.exists():
        return {"price_per_million": None, "prices_file": None}
    from ._estimate import price_of

    spec = model_spec(settings)
    return {"price_per_million": price_of(spec.name, prices), "prices_file": str(prices)}


def _dry_run(args: argparse.Namespace, settings: Settings) -> int:
    """``--dry-run``: count and price the job without sending; print the plan."""
    from ._estimate import dry_run
    from ._summary import dry_run_table

    spec = model_spec(settings)
    pricing = _pricing(args, settings)
    plan = dry_run(args.input, settings, spec, pricing["price_per_million"] or 0.0)
    print(dry_run_table(plan, pricing["prices_file"]))
    return EXIT_OK


async def show_report(args: argparse.Namespace) -> int:
    from ._report import load_report, plot_report, report_table

    report = load_report(args.report)
    if args.plot:
        _check_plot_path(Path(args.report), Path(args.plot))
    with _damaged_report(args.report):
        table = report_table(report)
    print(table)
    if args.plot:
        with _damaged_report(args.report):
            plot_report(report, args.plot)
        print(f"plot written to {args.plot}")
    return EXIT_OK


def _check_plot_path(report: Path, plot: Path) -> None:
    """Raise ConfigError when ``plot`` is the report, or a file that is not a PNG (the user's),
    or its folder is missing (found before the table is printed)."""
    if not plot.parent.is_dir():
        raise ConfigError(f"the folder of --plot {str(plot.parent)!r} is missing or not a folder")
    with contextlib.suppress(OSError):  # a plot that cannot be written says so when written
        if plot.exists() and os.path.samefile(report, plot):
            raise ConfigError(f"--plot {str(plot)!r} is the report itself: name a .png file")
        if plot.is_file():
            with open(plot, "rb") as file:
                if file.read(8) != b"\x89PNG\r\n\x1a\n":
                    raise ConfigError(
                        f"--plot {str(plot)!r} exists and is not a PNG: refusing to write over "
                        "it; name another file"
                    )


@contextlib.contextmanager
def _damaged_report(path: str) -> Iterator[None]:
    """Turn a report whose fields are missing or of the wrong kind into one ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as error:
        what = f"{type(error).__name__}: {error}"
        raise ConfigError(
            f"{path!r} is a damaged run report ({what}): run the job again with --report"
        ) from None


async def serve(args: argparse.Namespace) -> int:
    from . import testing

    rates = (args.rate_503, args.rate_504, args.rate_reset, args.rate_stall)
    if sum(rates) > 1:  # each is checked alone by the parser
        raise ConfigError(
            f"--rate-503, --rate-504, --rate-reset and --rate-stall add up to {sum(rates):g}: "
            "their sum must be at most 1"
        )
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
    import socket

    try:
        await testing.serve(config, on_ready=lambda url: print(f"serving on {url}", flush=True))
    except socket.gaierror as error:  # the address to listen on does not resolve
        raise ConfigError(f"--host {args.host!r}: {error.strerror or error}") from None
    return EXIT_OK
