"""sfembed: embed large corpora through the SiliconFlow embeddings API at your quota's speed.

The names below are the public API; everything in a module whose name starts with ``_`` is private.
The local test server lives in :mod:`sfembed.testing`.
"""

import importlib
import typing

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

if typing.TYPE_CHECKING:  # the names below load when first used: importing sfembed stays cheap
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

#: Where each public name not imported above is defined; its module is imported on first use
#: (PEP 562), so that a command line asking for --help, or a program needing one class, does not
#: pay for the client, numpy, the cache and the rest.
_LAZY = {
    "EmbeddingCache": "._cache",
    "EmbeddingClient": "._client",
    "BatchLimits": "._config",
    "IOSettings": "._config",
    "RateLimits": "._config",
    "RetryPolicy": "._config",
    "Settings": "._config",
    "Timeouts": "._config",
    "load_settings": "._config",
    "embed": "._engine",
    "embed_stream": "._engine",
    "Clock": "._limiter",
    "Limiter": "._limiter",
    "LoopClock": "._limiter",
    "ManualClock": "._limiter",
    "RateLimiter": "._limiter",
    "DEFAULT_CATALOG": "._models",
    "ModelCatalog": "._models",
    "ModelSpec": "._models",
    "SharedLimiter": "._quota",
    "EmbeddedBatch": "._types",
    "EmbeddingResult": "._types",
    "Failure": "._types",
    "JobStats": "._types",
    "Ticket": "._types",
    "WindowStats": "._types",
}


def __getattr__(name: str) -> object:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
