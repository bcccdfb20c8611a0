"""Settings: frozen keyword-only dataclasses with units in their names, loaded from TOML."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._exceptions import ConfigError

__all__ = [
    "DEFAULT_BASE_URL",
    "BatchLimits",
    "IOSettings",
    "RateLimits",
    "RetryPolicy",
    "Settings",
    "Timeouts",
    "load_settings",
]

DEFAULT_BASE_URL = "https://api.siliconflow.cn/v1"
DEFAULT_KEY_ENV = "SILICONFLOW_API_KEY"


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
        if self.rpm <= 0 or self.tpm <= 0 or self.window_s <= 0:
            raise ConfigError("rate limits: rpm, tpm and window_s must be positive")
        if not 0 <= self.headroom < 0.5:
            raise ConfigError("rate limits: headroom must be in [0, 0.5)")


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """Timeouts in seconds: connecting, and waiting for each read of the answer, per request;
    ``request_s``, the whole of one request from sending to the last byte of its answer (an
    answer trickling in byte by byte never trips the per-read limit); and ``grace_s``, how long
    a job told to stop (Ctrl-C, SIGTERM) waits for the requests in flight before it exits
    without them."""

    connect_s: float = 10.0
    # A stalled answer holds up every row after it (rows leave in order from a bounded ring),
    # so the wait is kept short: an embedding request is answered in seconds.
    read_s: float = 30.0
    request_s: float = 120.0
    grace_s: float = 30.0


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchLimits:
    """How requests are packed: at most ``max_items`` inputs and ``max_tokens`` tokens each."""

    max_items: int = 64
    max_tokens: int = 65_536

    def __post_init__(self) -> None:
        if self.max_items <= 0 or self.max_tokens <= 0:
            raise ConfigError("batch limits: max_items and max_tokens must be positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class IOSettings:
    """How a job reads its input and writes its output (the ``[io]`` table).

    ``None`` formats are inferred from the file suffix. ``dtype`` is ``float32`` or ``float16``
    (``.npy`` output only). ``image_field`` names a field holding an image URL, base64 data or a
    path, for the multimodal model. A job's progress is made durable, and resumable, every
    ``checkpoint_rows`` rows (each checkpoint syncs the files to disk). With ``cache``, vectors
    are kept in an SQLite cache at ``cache_path`` (default: ``sfembed-cache.sqlite`` in the
    output's folder) and a text it holds is not sent again.
    """

    input_format: str | None = None
    id_field: str = "id"
    text_field: str = "text"
    image_field: str | None = None
    output_format: str | None = None
    dtype: str = "float32"
    checkpoint_rows: int = 8192
    cache: bool = True
    cache_path: str = ""

    def __post_init__(self) -> None:
        if self.checkpoint_rows <= 0:
            raise ConfigError("io.checkpoint_rows must be positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything a job needs besides its input and output."""

    model: str = "BAAI/bge-m3"
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = DEFAULT_KEY_ENV
    allow_insecure_http: bool = False  # the key over plain http to a host beyond this machine
    encoding_format: str = "base64"
    dimensions: int | None = None
    concurrency: int = 16
    long_mode: str = "pool"
    truncate_side: str = "right"
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


_T = TypeVar("_T")


def _build(cls: type[_T], values: Mapping[str, Any], where: str) -> _T:
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    nested = {
        key: _build(_NESTED[key], value, f"{where}.{key}") if key in _NESTED else value
        for key, value in values.items()
    }
    try:
        return cls(**nested)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


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
    Raises ConfigError for an unreadable file or an unknown key.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                values = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config {str(path)!r}: {exc}") from None
    settings = _build(Settings, values, str(path or "settings"))
    return dataclasses.replace(settings, **overrides) if overrides else settings
