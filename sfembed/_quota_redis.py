"""The shared quota's Redis: a client for its URL, the quota's script on it, and what its errors
mean (unreachable, which a local stand-in may pace around once Redis has answered; or refused,
which waiting will not mend). Loaded with the shared quota only: redis-py is an extra."""

from __future__ import annotations

import importlib
import re
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from ._exceptions import ConfigError

__all__ = ["US", "Script", "denied", "quota_error", "redis_error", "unreachable", "where"]

US = 1_000_000  # the script's times are microseconds


def where(url: str) -> str:
    """host:port/db of a Redis URL, without a password, for log lines and errors. Raises
    ConfigError, echoing nothing of the URL, when its port or database cannot be read: most
    often a password holding ``/``, ``?``, ``#`` or ``@`` not percent-encoded, whose rest would
    be read as the port or the path."""
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(_UNREADABLE) from None
    if "@" in parts.path + parts.query + parts.fragment:  # the end of a password, misread
        raise ConfigError(_UNREADABLE)
    host = parts.hostname or "localhost"
    if parts.scheme in ("redis", "rediss") and not re.fullmatch(r"/?|/\d+", parts.path):
        # redis-py reads a path that is not one number as database 0 ('/O' for '/0') or joins
        # its digits ('/1/2' is database 12): a typo would share a quota no other worker is on.
        # The path is not echoed: it may be the end of a password.
        raise ConfigError(
            f"quota URL {host}:{port}: the path must be a database number, as in "
            "redis://host:6379/0 (a password holding '/', '?', '#' or '@' must be "
            "percent-encoded)"
        )
    return f"{host}:{port}{parts.path or '/0'}"


_UNREADABLE = (
    "quota URL: its port or database cannot be read (a password holding '/', '?', '#' or '@' "
    "must be percent-encoded, as in redis://:p%40ss@host:6379/0)"
)


class Script:
    """The quota's script on one Redis, for the keys under ``prefix``: ``head`` are the limits
    every call passes (see the script's header)."""

    _NAMES = ("state", "log", "charges", "workers", "line", "due", "counts")

    def __init__(self, url: str, timeout_s: float, prefix: str, head: list[int]) -> None:
        self.redis = _connect(url, timeout_s)
        self._source = resources.files(__package__).joinpath("_quota_script.lua").read_text("utf-8")
        self._run = self.redis.register_script(self._source)
        self._keys = [f"{prefix}:{name}" for name in self._NAMES]
        self._head = head
        self.calls = 0

    async def load(self) -> None:
        """Load the script into Redis (what its first run would do); raises redis-py's errors."""
        self.calls += 1
        await self.redis.script_load(self._source)

    async def __call__(self, op: object, *args: object) -> list[Any]:
        """One run of operation ``op``; raises redis-py's errors."""
        self.calls += 1
        reply: list[Any] = await self._run(keys=self._keys, args=[op, *self._head, *args])
        return reply


def _import_redis() -> Any:
    """redis.asyncio, or a ConfigError naming the extra to install."""
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError as error:
        raise ConfigError("a shared quota needs redis-py: pip install 'sfembed[redis]'") from error


def _connect(url: str, timeout_s: float) -> Any:
    """An asyncio Redis client for ``url``; ConfigError for a bad URL or without redis-py."""
    named = where(url)  # refuses a URL whose port or database cannot be read
    redis = _import_redis()
    backoff = importlib.import_module("redis.backoff")
    retry = importlib.import_module("redis.asyncio.retry")
    try:
        # One quick retry for a pooled connection the server dropped, then the stand-in. Not
        # for a timeout: a Redis that did not answer in time (stopped, overloaded, the network
        # gone) will not answer a second try sooner, and every caller of the process waits in
        # the turn meanwhile. A silent Redis costs one timeout, not two.
        lost = importlib.import_module("redis.exceptions").ConnectionError
        return redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry.Retry(backoff.NoBackoff(), 1, supported_errors=(lost,)),
        )
    except ValueError as error:
        raise _masked(f"quota URL {named!r}: {error}", url) from None


def redis_error() -> type[BaseException]:
    """redis-py's base error."""
    return importlib.import_module("redis.exceptions").RedisError  # type: ignore[no-any-return]


def unreachable() -> tuple[type[BaseException], ...]:
    """The errors of a Redis that did not answer (and a wrong password: see ``denied``)."""
    exceptions = importlib.import_module("redis.exceptions")
    return (exceptions.ConnectionError, exceptions.TimeoutError, OSError)


def denied(error: BaseException) -> bool:
    """A wrong password or a user without the right: redis-py calls it a connection error, but
    Redis answered, and waiting will not mend it."""
    exceptions = importlib.import_module("redis.exceptions")
    return isinstance(error, exceptions.AuthenticationError | exceptions.AuthorizationError)


def quota_error(error: BaseException, url: str) -> ConfigError:
    """The ConfigError for what the Redis at ``url`` did (refused the call, or did not answer
    when it never had), naming the URL without its password."""
    if denied(error) or not isinstance(error, unreachable()):
        said = f"Redis refused the call: {error}"
    else:
        said = (
            f"Redis did not answer ({type(error).__name__}: {error}); nothing was sent: "
            "check the URL and that Redis runs"
        )
    return _masked(f"quota URL {where(url)!r}: {said}", url)


def _masked(text: str, url: str) -> ConfigError:
    """The ConfigError saying ``text``, the URL's password masked wherever it echoed it."""
    password = urlsplit(url).password
    return ConfigError(text.replace(password, "***") if password else text)
