"""The options of ``sfembed embed``: their groups, help texts (what, unit, default) and values.

Each option that sets a job setting names its key in a ``--config`` TOML file; a flag given on
the command line wins over the file. The help of every option says what it does, in what unit,
and its default, read from the settings' own defaults so that the two never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NamedTuple, get_args

# The settings alone, not the readers and writers whose formats they name: --help loads no numpy.
from ._config import (
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    EncodingFormat,
    LongMode,
    OutputDtype,
    Settings,
    Truncate,
)

__all__ = ["OPTIONS", "Option", "add_options", "default_of"]


def _number(kind: type[Any], least: float, *, above: bool, most: float | None = None) -> Any:
    """An argparse type: a ``kind`` number over (``above``) or at least ``least``, and at most
    ``most``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not abs(value) < float("inf"):  # nan or inf: not an amount
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < least or (above and value == least):
            bound = f"over {least:g}" if above else f"at least {least:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bound}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be at most {most:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_COUNT = _number(int, 0, above=True)  # 1, 2, ...
_AMOUNT = _number(int, 0, above=False)  # 0, 1, ...
_SECONDS = _number(float, 0, above=True)
_WAIT_S = _number(float, 0, above=False)


class Option(NamedTuple):
    """A flag that overrides the setting ``key`` (dotted: ``rate.tpm``). ``help`` may hold
    ``{default}``, which becomes the setting's default.

    A row of a table defined at every start, --help included: as a named tuple in some 1 M
    instructions, where a frozen dataclass took 4.5 M (the methods it compiles)."""

    flag: str
    key: str
    kind: Any
    metavar: str
    help: str
    group: str
    choices: tuple[str, ...] | None = None


OPTIONS: tuple[Option, ...] = (
    Option(
        "--input-format",
        "io.input_format",
        str,
        "FORMAT",
        "how to read the input: {choices} (default: from the file's suffix)",
        "input",
        INPUT_FORMATS,
    ),
    Option(
        "--id-field",
        "io.id_field",
        str,
        "NAME",
        "the field (JSONL, CSV, Parquet) holding each record's id (default: {default}; "
        "without it, the record's line number)",
        "input",
    ),
    Option(
        "--text-field",
        "io.text_field",
        str,
        "NAME",
        "the field holding the text to embed (default: {default})",
        "input",
    ),
    Option(
        "--image-field",
        "io.image_field",
        str,
        "NAME",
        "the field holding an image (URL, base64 data or a local path) for a multimodal model "
        "(default: none)",
        "input",
    ),
    Option(
        "--format",
        "io.output_format",
        str,
        "FORMAT",
        "the output's format: {choices} (default: from the suffix of --out)",
        "output",
        OUTPUT_FORMATS,
    ),
    Option(
        "--table",
        "io.table",
        str,
        "NAME",
        "LanceDB output: the table to upsert into, when --out names the database folder "
        "(default: the NAME of --out NAME.lance)",
        "output",
    ),
    Option(
        "--keep-fields",
        "io.keep_fields",
        str,
        "NAMES",
        "LanceDB output: input fields to carry over beside each vector, comma-separated, as "
        "title,url (default: none)",
        "output",
    ),
    Option(
        "--dtype",
        "io.dtype",
        str,
        "TYPE",
        "the element type of .npy output: {choices} (default: {default})",
        "output",
        get_args(OutputDtype),
    ),
    Option(
        "--checkpoint-rows",
        "io.checkpoint_rows",
        _COUNT,
        "N",
        "make progress durable and resumable every N rows; each checkpoint syncs the files to "
        "disk (default: {default})",
        "output",
    ),
    Option(
        "--model",
        "model",
        str,
        "MODEL",
        "the embedding model, as the API names it (default: {default})",
        "model",
    ),
    Option(
        "--dimensions",
        "dimensions",
        _COUNT,
        "N",
        "the length of each vector, for models that can shorten theirs (default: the "
        "model's full length)",
        "model",
    ),
    Option(
        "--encoding",
        "encoding_format",
        str,
        "ENCODING",
        "how vectors travel from the server: {choices}; the output is the same "
        "(default: {default}, the smaller answer)",
        "model",
        get_args(EncodingFormat),
    ),
    Option(
        "--long",
        "long_mode",
        str,
        "MODE",
        "what to do with a text over the model's token limit: pool (split it, embed the pieces, "
        "and average them into one row), chunks (one row per piece), truncate (the server cuts "
        "it) (default: {default})",
        "model",
        get_args(LongMode),
    ),
    Option(
        "--overlap-tokens",
        "overlap_tokens",
        _AMOUNT,
        "N",
        "tokens each piece of a split text repeats from the piece before it, at most half a "
        "piece (default: {default})",
        "model",
    ),
    Option(
        "--truncate-side",
        "truncate_side",
        str,
        "SIDE",
        "with --long truncate, which end of a long text is cut off: {choices} (default: {default})",
        "model",
        get_args(Truncate),
    ),
    Option(
        "--rpm",
        "rate.rpm",
        _COUNT,
        "N",
        "your account's request limit: requests per window; the window is --window-s seconds "
        "(default: {default})",
        "account limits",
    ),
    Option(
        "--tpm",
        "rate.tpm",
        _COUNT,
        "N",
        "your account's token limit: tokens per window; the window is --window-s seconds, "
        "{window} by default (default: {default})",
        "account limits",
    ),
    Option(
        "--window-s",
        "rate.window_s",
        _SECONDS,
        "SECONDS",
        "the length of the rate-limit window, in seconds (default: {default})",
        "account limits",
    ),
    Option(
        "--concurrency",
        "concurrency",
        _COUNT,
        "N",
        "requests in flight at once, at most (default: {default})",
        "account limits",
    ),
    Option(
        "--batch-size",
        "batch.max_items",
        _COUNT,
        "N",
        "texts per request, at most (default: {default})",
        "account limits",
    ),
    Option(
        "--quota",
        "quota",
        str,
        "URL",
        "share the account's limits with every other worker on this Redis, such as "
        "redis://host:6379/0; needs sfembed[redis]. A Redis that does not answer at the start "
        "stops the job before anything is sent (a closed port at once, a silent host after the "
        "2 s timeout); one lost mid-job is paced around (default: this job paces alone)",
        "account limits",
    ),
    Option(
        "--quota-account",
        "quota_account",
        str,
        "NAME",
        "the label of the account whose quota is shared: workers with the same label and model "
        "share one quota (default: {default})",
        "account limits",
    ),
    Option(
        "--base-url",
        "base_url",
        str,
        "URL",
        "the API's address (default: {default})",
        "service",
    ),
    Option(
        "--api-key-env",
        "api_key_env",
        str,
        "VARIABLE",
        "the name of the environment variable holding your API key, not the key itself "
        "(default: {default})",
        "service",
    ),
    Option(
        "--cache",
        "io.cache_path",
        str,
        "PATH",
        "the cache of vectors already embedded: a text it holds is not sent again "
        "(default: sfembed-cache.sqlite in the output's folder)",
        "reliability",
    ),
    Option(
        "--grace-s",
        "timeouts.grace_s",
        _WAIT_S,
        "SECONDS",
        "after Ctrl-C or SIGTERM, how long to wait for requests in flight before exiting "
        "(default: {default})",
        "reliability",
    ),
)


def default_of(key: str, settings: Settings | None = None) -> Any:
    """The value of the dotted setting ``key`` in ``settings`` (default: the defaults)."""
    value: Any = settings if settings is not None else Settings()
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _help(option: Option, defaults: Settings) -> str:
    default = default_of(option.key, defaults)
    shown = (
        f"{default:,}" if isinstance(default, int) and not isinstance(default, bool) else default
    )
    if isinstance(default, float):
        shown = f"{default:g}"
    text = option.help.format(
        default=shown,
        choices=", ".join(option.choices or ()),
        window=f"{defaults.rate.window_s:g}",
    )
    return f"{text}; config key {option.key}"


def add_options(groups: dict[str, argparse._ArgumentGroup]) -> None:
    """Add every option to its group; each stores None unless given."""
    defaults = Settings()
    for option in OPTIONS:
        groups[option.group].add_argument(
            option.flag,
            dest=option.key.replace(".", "__"),
            type=option.kind,
            default=None,
            metavar=option.metavar,
            choices=option.choices,
            help=_help(option, defaults),
        )


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags given set, by dotted key."""
    given = {}
    for option in OPTIONS:
        value = getattr(args, option.key.replace(".", "__"))
        if value is not None:
            given[option.key] = value
    return given


def replaced(settings: Settings, key: str, value: object) -> Settings:
    """``settings`` with the dotted ``key`` set to ``value``."""
    if "." not in key:
        top: dict[str, Any] = {key: value}
        return dataclasses.replace(settings, **top)
    table, name = key.split(".")
    inner: dict[str, Any] = {name: value}
    outer: dict[str, Any] = {table: dataclasses.replace(getattr(settings, table), **inner)}
    return dataclasses.replace(settings, **outer)
