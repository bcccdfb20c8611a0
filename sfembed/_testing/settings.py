"""The local server's settings (:class:`ServerConfig`, its quota and faults), what it counts
(:class:`ServerStats`), and the constants its users read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from .._models import DEFAULT_CATALOG, ModelCatalog

TRACE_HEADER = "x-siliconcloud-trace-id"
#: Tokens an image item counts (before the model's special tokens), whatever its size.
IMAGE_TOKENS = 256
#: The outcomes :meth:`LocalServer.inject` can script.
INJECT_KINDS = frozenset(
    {"400", "model", "401", "403", "404", "413", "429-tpm", "429-rpm", "503", "504"}
    | {"reset", "stall", "bad-json", "no-data"}
    | {"405", "redirect", "html-502", "html-200", "error-200", "429-hour", "429-date"}
    | {"no-usage", "negative-usage", "huge-usage", "zero-usage", "tiny-usage"}
    | {"nan", "inf", "string-floats", "bool-floats"}
    | {"missing-item", "extra-item", "duplicate-index", "wrong-dims", "other-model"}
    | {"gzip", "trickle", "endless", "bom"}
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelLimits:
    """One model's quota per window: requests (``rpm``) and tokens (``tpm``); ``None``: no limit."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Faults:
    """Random misbehaviour, as probabilities per request drawn from ``random.Random(seed)``.

    ``rate_503`` / ``rate_504``: answer with that status. ``rate_reset``: send the headers and part
    of the body, then abort the connection. ``rate_stall``: hold the request ``stall_s`` seconds
    (past a client's read timeout) before answering it normally; it is counted against the limits
    on arrival, as any request the model takes. A scripted ``trickle`` sends its
    answer one byte every ``trickle_s`` seconds. ``latency_s`` seconds are added to
    every response, and ``latency_per_1k_tokens_s`` seconds per 1,000 tokens to each accepted
    request (a model's time grows with its input: 0.030 and 0.005 are a plausible shape). Over
    ``max_in_flight`` concurrent requests the extra ones get 503 (code 50505).
    With ``retry_after_s`` set, 429 and 503 answers carry ``Retry-After`` (whole seconds, rounded
    up) and ``retry-after-ms``. ``rate_429``: a 429 (the provider's TPM body) to a request the
    quota would have let in, as a gateway shared with other accounts may answer.
    ``latency_sigma`` > 0 gives the model's time a long tail: each accepted request's
    ``latency_per_1k_tokens_s`` share is multiplied by a log-normal draw of that sigma and mean
    1 (from ``random.Random(seed + 1)``, so the faults' draws stay those of ``seed``).
    """

    rate_503: float = 0.0
    rate_504: float = 0.0
    rate_reset: float = 0.0
    rate_stall: float = 0.0
    stall_s: float = 30.0
    trickle_s: float = 0.05
    latency_s: float = 0.0
    latency_per_1k_tokens_s: float = 0.0
    max_in_flight: int | None = None
    retry_after_s: float | None = None
    rate_429: float = 0.0
    latency_sigma: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.rate_503, self.rate_504, self.rate_reset, self.rate_stall, self.rate_429)
        if min(rates) < 0 or sum(rates) > 1:
            raise ValueError("fault rates must be >= 0 and sum to at most 1")
        if self.latency_s < 0 or self.latency_per_1k_tokens_s < 0 or self.latency_sigma < 0:
            raise ValueError("latencies and their sigma must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """How a :class:`LocalServer` behaves.

    ``api_key`` is the one bearer token accepted (``None``: any non-empty one). ``port`` 0 picks a
    free port. ``limits`` maps model names to their quota (others get ``default_limits``), counted
    over a sliding window of ``window_s`` seconds (with ``fixed_window``, a fixed one: the count
    starts afresh at each multiple of ``window_s`` of ``time.monotonic()``). A request of more
    than ``max_batch_items`` items gets 413. ``catalog`` lists the models served, with their token
    limits and dimensions. ``token_factor`` scales what a request is charged and its ``usage``
    (rounded up; the per-item limit is still judged on the unscaled count): a provider whose
    tokenizer counts more, or fewer, tokens than this server's own.
    """

    api_key: str | None = "sk-local-test"
    host: str = "127.0.0.1"
    port: int = 0
    window_s: float = 60.0
    limits: Mapping[str, ModelLimits] = field(default_factory=dict)
    default_limits: ModelLimits = ModelLimits()
    faults: Faults = Faults()
    max_batch_items: int = 64
    catalog: ModelCatalog = field(default_factory=lambda: DEFAULT_CATALOG)
    fixed_window: bool = False
    token_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.max_batch_items < 1:
            raise ValueError("window_s must be positive and max_batch_items at least 1")
        if not self.token_factor > 0:
            raise ValueError("token_factor must be positive")


@dataclass(kw_only=True, slots=True)
class ServerStats:
    """What the server saw since it was created (restarts do not reset it).

    ``requests`` counts every request; ``by_status`` every complete answer (resets and requests
    dropped by a stop are not answers). ``accepted`` holds one ``(time.monotonic(), tokens)`` per
    request admitted by the rate limiter, from which per-window utilisation can be computed.
    ``first_request_at`` is the ``time.monotonic()`` of the first request to the embeddings path.
    """

    requests: int = 0
    first_request_at: float | None = None
    by_status: Counter[int] = field(default_factory=Counter)
    rate_limited_tpm: int = 0
    rate_limited_rpm: int = 0
    resets: int = 0
    stalls: int = 0
    max_in_flight_seen: int = 0
    tokens_accepted: int = 0
    accepted: list[tuple[float, int]] = field(default_factory=list)
