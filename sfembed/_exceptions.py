"""The one error tree of sfembed.

Every error sfembed raises for a condition of data, settings or the server is an SFEmbedError::

    SFEmbedError
    ├── ConfigError                settings that cannot work (a value not allowed, bad TOML, no key)
    │   └── UnknownModelError      a model the catalogue lacks (also a KeyError, for Mapping.get)
    ├── JobError                   some inputs of a job could not be embedded (lists them all,
    │                              each with the error that failed it)
    ├── InputError                 local validation failed; nothing was sent (names item, cause)
    └── APIError                   the server answered with an error, or the exchange failed
        ├── APIStatusError         an HTTP error status no narrower class covers
        │   ├── BadRequestError        400, code 20015: invalid parameter (e.g. input too long)
        │   │   └── ModelNotFoundError 400, code 20012: the model does not exist
        │   ├── AuthenticationError    401: the key is wrong ("Invalid token")
        │   ├── PermissionDeniedError  403: no permission or no balance
        │   ├── NotFoundError          404: wrong base URL or path
        │   ├── BatchTooLargeError     413, code 20042: too many inputs in one request
        │   ├── RateLimitError         429: TPM or RPM limit reached (``limit``)   retryable
        │   └── ServerError            5xx                                         retryable
        │       ├── OverloadedError    503, code 50505: overloaded                 retryable
        │       └── GatewayTimeoutError  504: the gateway timed out                retryable
        ├── APIConnectionError     refused, or reset before a full answer          retryable
        │   └── APITimeoutError    connect or read timeout                         retryable
        └── MalformedResponseError a 200 that is not JSON, lacks ``data``, or has
                                   bad indices or vector lengths                   retryable

Every APIError carries ``status`` (HTTP status or ``None``), ``code`` (provider code or ``None``),
``message``, ``trace_id`` (from ``x-siliconcloud-trace-id``), ``retryable`` and ``retry_after_s``
(from ``Retry-After`` / ``retry-after-ms`` when a proxy sent one). No message, repr or attribute
ever holds the API key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._types import Failure

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchTooLargeError",
    "ConfigError",
    "GatewayTimeoutError",
    "InputError",
    "JobError",
    "MalformedResponseError",
    "ModelNotFoundError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitError",
    "SFEmbedError",
    "ServerError",
    "UnknownModelError",
]

RateLimitKind = Literal["tpm", "rpm"]


class SFEmbedError(Exception):
    """Base of every error sfembed raises."""

    retryable: bool = False


class ConfigError(SFEmbedError, ValueError):
    """Raised when settings cannot work: an unknown model without limits, a bad config file."""


class UnknownModelError(ConfigError, KeyError):
    """Raised for a model the catalogue lacks; a KeyError too, so that ``catalog.get`` and ``in``
    work as for any mapping. The message says how to give the model's limits."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class JobError(SFEmbedError):
    """Raised by ``embed`` when some inputs could not be embedded.

    ``failures`` lists each one as a ``Failure``: its input ``position``, its ``reason`` in
    words, and its ``error``, the SFEmbedError that failed it, to branch on (for an APIError:
    ``status``, ``code``, ``trace_id``, ``retryable``; an InputError for an input the client
    would not send, such as a text that is not valid Unicode; None for an input refused as it
    was read, such as an empty text). ``retryable`` is true when every failure is: the same
    inputs sent again later may all succeed (the server was overloaded, timed out or unreachable
    past the retries). A JobError pickles whole, failures and their errors included, so it crosses
    to a process pool or a Ray task; neither its message nor any failure holds the API key.
    """

    def __init__(self, failures: Sequence[Failure]) -> None:
        self.failures = list(failures)
        self.retryable = bool(self.failures) and all(f.retryable for f in self.failures)
        first = self.failures[0] if self.failures else None
        # The reason is closed off, so that nothing printed after the message runs into it.
        detail = (
            f" (the first, input {first.position}: {first.reason})" if first is not None else ""
        )
        super().__init__(f"{len(self.failures)} input(s) could not be embedded{detail}.")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its failures, not from its message: a process pool or a Ray task hands
        # an error to another process by pickling it, and JobError(message) cannot be built.
        return (type(self), (self.failures,), self.__dict__)


class InputError(SFEmbedError, ValueError):
    """Raised before sending when an input is invalid; ``item`` is its position in the request."""

    def __init__(self, message: str, *, item: int | None = None) -> None:
        self.item = item
        self.reason = message  # without the item prefix, for reports that name the item already
        prefix = f"input item {item}: " if item is not None else ""
        super().__init__(prefix + message)


class APIError(SFEmbedError):
    """Raised when the server answered with an error or the exchange with it failed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        trace_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.code = code
        self.trace_id = trace_id
        self.retry_after_s = retry_after_s
        super().__init__(message)

    def __str__(self) -> str:
        parts = [f"HTTP {self.status}" if self.status is not None else ""]
        parts.append(f"code {self.code}" if self.code is not None else "")
        parts.append(f"trace {self.trace_id}" if self.trace_id else "")
        head = ", ".join(p for p in parts if p)
        return f"{self.message} ({head})" if head else self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, trace_id={self.trace_id!r}, retryable={self.retryable!r})"
        )


class APIStatusError(APIError):
    """Raised for an HTTP error status that no narrower class covers."""


class BadRequestError(APIStatusError):
    """Raised on 400 (code 20015: a parameter is invalid, which includes an over-long input)."""


class ModelNotFoundError(BadRequestError):
    """Raised on 400 with code 20012: the model does not exist."""


class AuthenticationError(APIStatusError):
    """Raised on 401: the API key is wrong."""


class PermissionDeniedError(APIStatusError):
    """Raised on 403: the account has no permission for the model or no balance."""


class NotFoundError(APIStatusError):
    """Raised on 404: the base URL or path is wrong."""


class BatchTooLargeError(APIStatusError):
    """Raised on 413 with code 20042: more inputs in one request than the server allows."""


class RateLimitError(APIStatusError):
    """Raised on 429; ``limit`` is ``"tpm"`` or ``"rpm"`` when the message names it."""

    retryable = True

    @property
    def limit(self) -> RateLimitKind | None:
        found = re.search(r"Details:\s*(TPM|RPM)", self.message, re.IGNORECASE)
        return None if found is None else "tpm" if found[1].upper() == "TPM" else "rpm"


class ServerError(APIStatusError):
    """Raised on a 5xx answer; retried."""

    retryable = True


class OverloadedError(ServerError):
    """Raised on 503 (code 50505): the model service is overloaded; retried."""


class GatewayTimeoutError(ServerError):
    """Raised on 504: the gateway timed out; retried."""


class APIConnectionError(APIError):
    """Raised when the connection failed or was reset before a full answer; retried."""

    retryable = True


class APITimeoutError(APIConnectionError):
    """Raised when connecting or reading timed out; retried."""


class MalformedResponseError(APIError):
    """Raised on a 200 whose body is not JSON, lacks ``data``, or has bad indices or lengths."""

    retryable = True
