"""Settings: frozen keyword-only dataclasses with units in their names, loaded from TOML.

Every value is checked where it enters, whether from a TOML file, keyword arguments or command
line flags (all of them build the dataclasses, whose ``__post_init__`` checks): a wrong one is a
ConfigError naming the key, the value and what is allowed, before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar, get_args

from ._exceptions import ConfigError
from ._models import DEFAULT_CATALOG, ModelCatalog, ModelSpec

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_ID_FIELD",
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "BatchLimits",
    "EncodingFormat",
    "IOSettings",
    "LongMode",
    "OutputDtype",
    "RateLimits",
    "RetryPolicy",
    "Settings",
    "Timeouts",
    "Truncate",
    "catalog_for",
    "load_settings",
    "model_spec",
    "with_options",
]

DEFAULT_BASE_URL = "https://api.siliconflow.cn/v1"
DEFAULT_KEY_ENV = "SILICONFLOW_API_KEY"

#: What to do with a record over the model's per-item limit: cut it and pool the pieces' vectors
#: into its row, give each piece a row, or let the server cut it.
LongMode: TypeAlias = Literal["pool", "chunks", "truncate"]
#: The float type of ``.npy`` output.
OutputDtype: TypeAlias = Literal["float32", "float16"]
# The choices below belong to the wire's types, the readers and the writers, all of which load
# numpy: kept here, with the settings that take them, so that --help names them without numpy.
#: How vectors travel from the server (the API's ``encoding_format``).
EncodingFormat: TypeAlias = Literal["float", "base64"]
#: Which end of a text over the model's limit the server cuts (the API's ``truncate``).
Truncate: TypeAlias = Literal["left", "right"]
#: Input format names the readers take (``tsv`` is tab-separated, without quoting).
INPUT_FORMATS = ("jsonl", "txt", "csv", "tsv", "parquet")
#: The field of a record that holds its id when none is named; without it, ids are line numbers.
DEFAULT_ID_FIELD = "id"
#: Output format names the writers take.
OUTPUT_FORMATS = ("npy", "jsonl", "parquet", "lance")
#: Concurrency above this is a typo, not a plan: each unit is a connection and a worker.
MAX_CONCURRENCY = 10_000


def _fail(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


def _choice(key: str, value: object, choices: object) -> None:
    allowed = get_args(choices)
    if not isinstance(value, str) or value not in allowed:
        raise _fail(key, value, "use one of " + ", ".join(repr(a) for a in allowed))


def _count(key: str, value: object, low: int = 1, high: int | None = None) -> None:
    """A whole number in [low, high]."""
    fits = isinstance(value, int) and not isinstance(value, bool)
    if not fits or value < low or (high is not None and value > high):  # type: ignore[operator]
        bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise _fail(key, value, f"a whole number {bounds}")


def _seconds(key: str, value: object, *, zero: bool = False, below: float | None = None) -> None:
    """A finite number of seconds (or a fraction): above zero, or at least zero, and under
    ``below``. An infinite one is refused: it divides to zero (a pace of nothing per window)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    low_ok = number and (value >= 0 if zero else value > 0)  # type: ignore[operator]
    finite = number and abs(value) < float("inf")  # type: ignore[arg-type]  # nan fails too
    if not low_ok or not finite or (below is not None and value >= below):  # type: ignore[operator]
        low = "0 or more" if zero else "more than 0"
        high = f" and less than {below:g}" if below is not None else ""
        raise _fail(key, value, f"a finite number {low}{high}")


def _text(key: str, value: object, *, empty: bool = False) -> None:
    if not isinstance(value, str) or (not empty and not value):
        raise _fail(key, value, "a text" + ("" if empty else ", not empty"))


def _flag(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")


@dataclass(frozen=True, kw_only=True, slots=True)
class RateLimits:
    """The account's limits for one model: requests and tokens per ``window_s`` seconds.

    ``headroom`` is the fraction kept unused so that clock skew and latency jitter between us and
    the server's own window never tip a request over. ``burst_s`` is how far ahead of a steady pace
    the limiter may run; by default half the headroom's share of the window (0.6 s of a 60 s
    window), so that pace plus burst stays under the limit and the limiter's hard window is a
    backstop, not the thing that paces (a job held at the window's edge meets the server's window
    at the same edge, and latency jitter then turns into 429s).
    """

    rpm: int = 2000
    tpm: int = 500_000
    window_s: float = 60.0
    headroom: float = 0.02
    burst_s: float | None = None

    @property
    def burst_allowance_s(self) -> float:
        """``burst_s``, or its default derived from the window and headroom."""
        return self.burst_s if self.burst_s is not None else self.window_s * self.headroom / 2

    def __post_init__(self) -> None:
        _count("rate.rpm", self.rpm)
        _count("rate.tpm", self.tpm)
        _seconds("rate.window_s", self.window_s)
        _seconds("rate.headroom", self.headroom, zero=True, below=0.5)
        if self.burst_s is not None:
            _seconds("rate.burst_s", self.burst_s, zero=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Bounded retries: at most ``max_attempts`` tries and ``max_total_s`` seconds per request.

    Backoff is exponential with full jitter, from ``initial_backoff_s`` up to ``max_backoff_s``;
    a server's ``Retry-After`` wins when present.
    """

    max_attempts: int = 8
    max_total_s: float = 300.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        _count("retry.max_attempts", self.max_attempts)
        _seconds("retry.max_total_s", self.max_total_s)
        _seconds("retry.initial_backoff_s", self.initial_backoff_s, zero=True)
        _seconds("retry.max_backoff_s", self.max_backoff_s, zero=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """Timeouts in seconds: connecting, and waiting for each read of the answer, per request;
    ``request_s``, the whole of one request from sending to the last byte of its answer (an
    answer trickling in byte by byte never trips the per-read limit), plus a second per MiB
    sent; and ``grace_s``, how long
    a job told to stop (Ctrl-C, SIGTERM) waits for the requests in flight before it exits
    without them."""

    connect_s: float = 10.0
    # A stalled answer holds up every row after it (rows leave in order from a bounded ring),
    # so the wait is kept short: an embedding request is answered in seconds.
    read_s: float = 30.0
    request_s: float = 120.0
    grace_s: float = 30.0

    def __post_init__(self) -> None:
        _seconds("timeouts.connect_s", self.connect_s)
        _seconds("timeouts.read_s", self.read_s)
        _seconds("timeouts.request_s", self.request_s)
        _seconds("timeouts.grace_s", self.grace_s, zero=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchLimits:
    """How requests are packed: at most ``max_items`` inputs and ``max_tokens`` tokens each."""

    max_items: int = 64
    max_tokens: int = 65_536

    def __post_init__(self) -> None:
        _count("batch.max_items", self.max_items)
        _count("batch.max_tokens", self.max_tokens)


@dataclass(frozen=True, kw_only=True, slots=True)
class IOSettings:
    """How a job reads its input and writes its output (the ``[io]`` table).

    ``None`` formats are inferred from the file suffix. ``dtype`` is ``float32`` or ``float16``
    (``.npy`` output only). ``image_field`` names a field holding an image URL, base64 data or a
    path, for the multimodal model. A job's progress is made durable, and resumable, every
    ``checkpoint_rows`` rows (each checkpoint syncs the files to disk). With ``cache``, vectors
    are kept in a cache at ``cache_path`` (default: ``sfembed-cache.sqlite`` in the output's
    folder, and its vectors beside it, ``sfembed-cache.sqlite-vectors``) and a text it holds is
    not sent again. LanceDB output is a table named by the output path (``vectors.lance``), or
    ``table`` in the folder the output names, and carries the input fields ``keep_fields`` names
    (a tuple, or one comma-separated string).
    """

    input_format: str | None = None
    id_field: str = DEFAULT_ID_FIELD
    text_field: str = "text"
    image_field: str | None = None
    output_format: str | None = None
    dtype: OutputDtype = "float32"
    checkpoint_rows: int = 8192
    cache: bool = True
    cache_path: str = ""
    table: str = ""  # LanceDB output: the table's name when the output names its folder
    keep_fields: tuple[str, ...] = ()  # input fields carried over beside the vector (LanceDB)

    def __post_init__(self) -> None:
        for key in ("input_format", "image_field", "output_format"):
            if getattr(self, key) is not None:
                _text(f"io.{key}", getattr(self, key))
        _text("io.id_field", self.id_field)
        _text("io.text_field", self.text_field)
        _choice("io.dtype", self.dtype, OutputDtype)
        _count("io.checkpoint_rows", self.checkpoint_rows)
        _flag("io.cache", self.cache)
        _text("io.cache_path", self.cache_path, empty=True)
        _text("io.table", self.table, empty=True)
        keep = self.keep_fields
        names = keep.split(",") if isinstance(keep, str) else list(keep)
        if not all(isinstance(name, str) and name.strip() for name in names):
            raise ConfigError(f"io.keep_fields must name fields, as 'title,url', not {keep!r}")
        object.__setattr__(self, "keep_fields", tuple(name.strip() for name in names))


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything a job needs besides its input and output."""

    model: str = "BAAI/bge-m3"
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = DEFAULT_KEY_ENV
    allow_insecure_http: bool = False  # the key over plain http to a host beyond this machine
    encoding_format: EncodingFormat = "base64"
    dimensions: int | None = None
    concurrency: int = 16
    long_mode: LongMode = "pool"
    truncate_side: Truncate = "right"
    overlap_tokens: int = 0
    rate: RateLimits = field(default_factory=RateLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    batch: BatchLimits = field(default_factory=BatchLimits)
    io: IOSettings = field(default_factory=IOSettings)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # A Redis URL (redis://host:6379/0) holding the quota shared by every worker that names the
    # same account label and model; empty: this process paces alone.
    quota: str = ""
    quota_account: str = "default"

    def __post_init__(self) -> None:
        _text("model", self.model)
        _text("base_url", self.base_url)
        _text("api_key_env", self.api_key_env)
        _flag("allow_insecure_http", self.allow_insecure_http)
        _choice("encoding_format", self.encoding_format, EncodingFormat)
        if self.dimensions is not None:
            _count("dimensions", self.dimensions)
        _count("concurrency", self.concurrency, high=MAX_CONCURRENCY)
        _choice("long_mode", self.long_mode, LongMode)
        _choice("truncate_side", self.truncate_side, Truncate)
        _count("overlap_tokens", self.overlap_tokens, low=0)
        for key, kind in _NESTED.items():
            if not isinstance(getattr(self, key), kind):
                raise _fail(key, getattr(self, key), f"a {kind.__name__} (a [{key}] table)")
        if not isinstance(self.models, Mapping):
            raise _fail("models", self.models, "a table of model tables")
        _text("quota", self.quota, empty=True)
        _text("quota_account", self.quota_account)


_T = TypeVar("_T")


def _build(cls: type[_T], values: Mapping[str, Any], where: str) -> _T:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: must be a table, not {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {_known(names)}")
    nested = {
        key: _build(_NESTED[key], value, f"{where}.{key}") if key in _NESTED else value
        for key, value in values.items()
    }
    return cls(**nested)


def _known(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


_NESTED: dict[str, type[Any]] = {
    "rate": RateLimits,
    "retry": RetryPolicy,
    "timeouts": Timeouts,
    "batch": BatchLimits,
    "io": IOSettings,
}


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the TOML file at ``path`` (or the defaults), then ``overrides`` on top.

    The file's top-level keys are :class:`Settings` fields; ``[rate]``, ``[retry]``, ``[timeouts]``,
    ``[batch]`` and ``[io]`` are tables, and ``[models."Org/name"]`` tables extend the catalogue.
    Raises ConfigError for an unreadable file, an unknown key or a value not allowed (naming the
    file, the key, the value and what is allowed).
    """
    values: dict[str, Any] = {}
    if path is not None:
        import tomllib  # here: a job without a config file starts without it

        try:
            with open(path, "rb") as handle:
                values = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config {str(path)!r}: {exc}") from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8: a file saved in another encoding
            raise ConfigError(
                f"config {str(path)!r}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
    where = f"config {str(path)!r}" if path is not None else "settings"
    try:
        settings = _build(Settings, values, where)
        catalog_for(settings)  # a [models] table's mistakes named with the file, now
    except ConfigError as exc:
        if path is None or str(exc).startswith(where):
            raise
        raise ConfigError(f"{where}: {exc}") from None
    return with_options(settings, **overrides)


def with_options(settings: Settings, **options: Any) -> Settings:
    """``settings`` with the fields named by ``options`` replaced (nested tables as whole
    dataclasses: ``rate=RateLimits(...)``). Raises ConfigError for an unknown name or a value
    not allowed."""
    if not options:
        return settings
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {_known(names)}")
    return dataclasses.replace(settings, **options)


def catalog_for(settings: Settings, base: ModelCatalog = DEFAULT_CATALOG) -> ModelCatalog:
    """``base`` extended by the settings' ``[models]`` table. Raises ConfigError for a bad one."""
    return base.with_table(settings.models) if settings.models else base


def model_spec(settings: Settings, base: ModelCatalog = DEFAULT_CATALOG) -> ModelSpec:
    """The spec of the settings' model, from ``base`` and the settings' ``[models]`` table.
    Resolve it once per job and pass it on. Raises ConfigError for a model without limits."""
    return catalog_for(settings, base)[settings.model]
