"""sfembed: embed large corpora through the SiliconFlow embeddings API at your quota's speed.

The names below are the public API; everything in a module whose name starts with ``_`` is private.
The local test server lives in :mod:`sfembed.testing`.
"""

from ._cache import EmbeddingCache
from ._client import EmbeddingClient
from ._config import (
    BatchLimits,
    IOSettings,
    RateLimits,
    RetryPolicy,
    Settings,
    Timeouts,
    load_settings,
)
from ._engine import embed, embed_stream
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchTooLargeError,
    ConfigError,
    GatewayTimeoutError,
    InputError,
    JobError,
    MalformedResponseError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    SFEmbedError,
    UnknownModelError,
)
from ._limiter import Clock, Limiter, LoopClock, ManualClock, RateLimiter
from ._models import DEFAULT_CATALOG, ModelCatalog, ModelSpec
from ._quota import SharedLimiter
from ._types import EmbeddedBatch, EmbeddingResult, Failure, JobStats, Ticket, WindowStats

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CATALOG",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchLimits",
    "BatchTooLargeError",
    "Clock",
    "ConfigError",
    "EmbeddedBatch",
    "EmbeddingCache",
    "EmbeddingClient",
    "EmbeddingResult",
    "Failure",
    "GatewayTimeoutError",
    "IOSettings",
    "InputError",
    "JobError",
    "JobStats",
    "Limiter",
    "LoopClock",
    "MalformedResponseError",
    "ManualClock",
    "ModelCatalog",
    "ModelNotFoundError",
    "ModelSpec",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitError",
    "RateLimiter",
    "RateLimits",
    "RetryPolicy",
    "SFEmbedError",
    "ServerError",
    "Settings",
    "SharedLimiter",
    "Ticket",
    "Timeouts",
    "UnknownModelError",
    "WindowStats",
    "embed",
    "embed_stream",
    "load_settings",
]
