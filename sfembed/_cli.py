"""The command line: arguments -> settings -> ``asyncio.run(...)`` -> exit code.

This module parses the arguments of ``sfembed embed``, ``sfembed report`` and ``sfembed serve``
(the options of ``embed`` that set a job setting are listed in ``_options``); ``_commands`` runs
them, and ``_summary`` words the tables they print.

Exit codes: 0 all embedded; 1 some records failed, or an error stopped the job; 2 bad usage (a
mistyped option, a setting out of range, clashing paths, a resume that does not match); 75
stopped by a signal after a checkpoint (resumable); 130 interrupted at once.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import __version__
from ._exceptions import ConfigError, SFEmbedError

__all__ = ["main"]

_M_ARENA_MAX = -8  # glibc's mallopt parameter for the most arenas

#: What a command runs, given its parsed arguments: the exit code.
Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]

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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sfembed`` command; returns the process exit code."""
    # A job keeps thousands of small objects in flight (records, chunks, requests), hardly any
    # in a cycle: the collector's default young collection, every 700 allocations, went over
    # them some 500 times per 100,000 records (3.6 us of CPU a record); every 10,000, 0.7 us.
    # Set first, as the imports before a job's first request allocate as much: with the default,
    # some 8% of their time (24 ms of 0.3 s, in 99 young collections) went to collections that
    # found next to nothing to free; with 10,000, half that.
    gc.set_threshold(10_000, 20, 20)
    _one_malloc_arena()
    _one_blas_thread()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:  # argparse: --help, --version (0) or a usage error (2)
        if isinstance(exit.code, int):
            return exit.code
        from ._commands import EXIT_USAGE

        return EXIT_USAGE
    # What runs a command (asyncio, logging; for a job numpy and the rest) loads only now: the
    # parser needs the settings' defaults alone, so --help and a usage error stay cheap.
    import asyncio
    import logging

    from . import _commands

    logging.basicConfig(format="sfembed: %(message)s", level=logging.WARNING)

    try:
        return int(asyncio.run(_command(args.command)(args)))
    except ConfigError as error:
        print(f"sfembed: error: {error}", file=sys.stderr)
        return _commands.EXIT_USAGE
    except SFEmbedError as error:
        print(f"sfembed: error: {error}", file=sys.stderr)
        return _commands.EXIT_FAILED
    except BrokenPipeError:
        # The reader of our output left (`sfembed report run.json | head -1`): as `cat` does,
        # stop without a word, and keep the interpreter's last flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _commands.EXIT_FAILED
    except OSError as error:  # the disk refused a write: full, read-only, too large a file
        where = f"{error.filename}: " if error.filename else ""
        print(f"sfembed: error: {where}{error.strerror or error}", file=sys.stderr)
        return _commands.EXIT_FAILED
    except KeyboardInterrupt:
        print("sfembed: interrupted", file=sys.stderr)
        return _commands.EXIT_INTERRUPTED


def _command(name: str) -> Command:
    """What the command ``name`` (as the parser stores it) runs."""
    from . import _commands

    commands: dict[str, Command] = {
        "embed": _commands.embed,
        "report": _commands.show_report,
        "serve": _commands.serve,
    }
    return commands[name]


def _one_malloc_arena() -> None:
    """Keep glibc's malloc to one arena in this process unless the user chose
    (``MALLOC_ARENA_MAX``).

    By default glibc gives each thread that allocates an arena of its own (up to 8 per core):
    the import thread, the cache's writer and indexer and the executor's each grew one, and
    memory freed in one arena is not reused by another. One arena measured 95-97 MB of peak RSS
    on a 400,000-document job against 101-102 MB, for the same CPU: the threads allocate
    holding the interpreter lock, so they hardly contend for the arena's. Set before any thread
    starts, as a thread keeps the arena it first took. A setting for this process, the command
    line's: the library leaves a user's process as it is."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):  # not glibc: no such setting
        return
    if libc.startswith("glibc"):
        import ctypes  # numpy loads it in any case

        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)


def _one_blas_thread() -> None:
    """Keep OpenBLAS, which numpy loads, to one thread in this process unless the user chose.

    The command line does no linear algebra (a vector's norm at most), and the pool OpenBLAS
    starts as numpy loads, one thread per core, spins for some 0.1 s of each core (measured: 80
    ms of CPU beside numpy's own 60 ms, and 20 ms more on the loading thread): the very cores a
    job's start-up is using to load its client. Set before numpy loads, as OpenBLAS reads it
    then: first thing, whatever the command loads later."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but an argument it does not know is named without a value that may be
    a key: ``--key sk-...`` or ``--token=sk-...`` would otherwise be printed back as given; and
    an option is only known by its whole name (argparse would take ``--no-cach`` for
    ``--no-cache``, or ``--conc`` for ``--concurrency``: a mistyped option runs as another)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            shown = [_shown(argument) for argument in extra]
            self.error("unrecognized arguments: " + " ".join(shown))
        return parsed


def _shown(argument: str) -> str:
    """``argument`` as a usage error may print it: an option's name, a value unless it looks
    like a key (a long run of letters, digits, - and _, or anything holding 'sk-')."""
    name, equals, value = (
        argument.partition("=") if argument.startswith("-") else ("", "", argument)
    )
    token = value.strip()
    key_like = len(token) >= 20 and all(c.isalnum() or c in "-_" for c in token)
    if value and ("sk-" in value or key_like):
        value = "(a value not shown)"
    return f"{name}{equals}{value}" if name else value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


def _add_embed(commands: Any) -> None:
    from ._options import add_options  # the settings' types and defaults, for the help texts

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
    embed.set_defaults(command="embed")


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
    report.set_defaults(command="report")


def _add_serve(commands: Any) -> None:
    from ._options import _number as number  # the embed options' checks, loaded already

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
        type=number(int, 0, above=False, most=65535),
        default=0,
        metavar="PORT",
        help="the port to listen on; 0 picks a free one (default: 0)",
    )
    serve.add_argument(
        "--api-key",
        type=_server_key,
        default="sk-local-test",
        metavar="KEY",
        help="the key clients must send (default: sk-local-test)",
    )
    serve.add_argument(
        "--window-s",
        type=number(float, 0, above=True),
        default=60.0,
        metavar="SECONDS",
        help="the rate-limit window, in seconds (default: 60)",
    )
    serve.add_argument(
        "--rpm",
        type=number(int, 0, above=True),
        metavar="N",
        help="requests per window allowed per model (default: no limit)",
    )
    serve.add_argument(
        "--tpm",
        type=number(int, 0, above=True),
        metavar="N",
        help="tokens per window allowed per model (default: no limit)",
    )
    for fault, what in (
        ("503", "answered 503 Service Unavailable"),
        ("504", "answered 504 Gateway Timeout"),
        ("reset", "whose connection is reset"),
        ("stall", "held 30 s (past a client's read timeout), then answered"),
    ):
        serve.add_argument(
            f"--rate-{fault}",
            type=number(float, 0, above=False, most=1),
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
    serve.set_defaults(command="serve")


def _server_key(value: str) -> str:
    """A key a client can send: not blank, no spaces around it, no control character (the
    client strips the spaces of a pasted key; a header carries no control character)."""
    if not value.strip() or value != value.strip() or any(ord(c) < 32 for c in value):
        raise argparse.ArgumentTypeError(
            "no client could send this key: give one that is not blank, with no spaces around "
            "it and no control characters"
        )
    return value
