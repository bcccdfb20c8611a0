"""EmbeddingClient: one aiohttp session, one ``POST /embeddings`` per call, errors mapped.

The client sends exactly one request per call and never retries: retrying belongs to ``_retry``,
which sends a retry back through the limiter. The API key lives only in the request headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import ipaddress
import logging
import math
import os
import re
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self, overload
from urllib.parse import urlsplit

import aiohttp
import orjson

from . import _exceptions as exc
from ._config import DEFAULT_BASE_URL, DEFAULT_KEY_ENV, Settings, Timeouts, catalog_for
from ._decoder import DecodedBody, decode_body
from ._models import DEFAULT_CATALOG, ModelCatalog, ModelSpec
from ._request import build_request
from ._types import EmbeddingResult, EncodingFormat, InputItem, Truncate

__all__ = ["EmbeddingClient", "client_for"]

log = logging.getLogger("sfembed")

TRACE_HEADER = "x-siliconcloud-trace-id"

_STATUS_ERRORS: dict[int, type[exc.APIStatusError]] = {
    400: exc.BadRequestError,
    422: exc.BadRequestError,  # some compatible gateways refuse an input so
    401: exc.AuthenticationError,
    403: exc.PermissionDeniedError,
    404: exc.NotFoundError,
    413: exc.BatchTooLargeError,
    429: exc.RateLimitError,
    503: exc.OverloadedError,
    504: exc.GatewayTimeoutError,
}
#: Statuses a later attempt may get past although no narrower class covers them.
_RETRYABLE_STATUSES = frozenset({408, 425})
_UPLOAD_BYTES_PER_S = 1 << 20  # the slowest uplink a request's deadline allows for
_MAX_FLOAT_BYTES = 32  # a float in JSON, with its comma, at its longest and then some
_UNKNOWN_DIMS = 16384  # the width assumed for a model outside the catalogue
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class EmbeddingClient:
    """An async context manager owning one pooled aiohttp session to a SiliconFlow-compatible API.

    A client is entered once: unopened, then open inside ``async with``, then closed for good.
    Entering it a second time, or again after it closed, raises RuntimeError (a second session
    would leak the first); so does sending outside ``async with``.

    The key is ``api_key`` or the environment variable named by ``api_key_env``, without the
    whitespace around it (a key file's trailing newline), quotes around it or a ``Bearer``
    before it. Plain ``http`` to a host other than
    loopback is refused (the key would cross the network in clear) unless
    ``allow_insecure_http``. Raises ConfigError for a missing key, one a header cannot carry,
    or a base URL with credentials, a query or a fragment; no message holds the key or the
    credentials.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_KEY_ENV,
        base_url: str = DEFAULT_BASE_URL,
        timeouts: Timeouts | None = None,
        catalog: ModelCatalog = DEFAULT_CATALOG,
        max_batch_items: int = 64,
        max_connections: int = 64,
        allow_insecure_http: bool = False,
    ) -> None:
        key = _checked_key(api_key, api_key_env)
        base_url = base_url.strip()  # pasted with a newline, as keys are
        _check_url(base_url, allow_insecure_http)
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._key_bytes = key.encode()
        self._url = base_url.rstrip("/") + "/embeddings"
        self._timeouts = timeouts or Timeouts()
        self._catalog = catalog
        self._max_items = max_batch_items
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._other_model_seen = False  # warned once of answers naming another model
        self._state = _State.UNOPENED

    def __repr__(self) -> str:
        return f"EmbeddingClient(url={self._url!r})"

    @property
    def catalog(self) -> ModelCatalog:
        return self._catalog

    @property
    def endpoint(self) -> str:
        """The URL requests go to (``{base_url}/embeddings``); it never holds credentials."""
        return self._url

    async def __aenter__(self) -> Self:
        if self._state is _State.OPEN:
            raise RuntimeError("this EmbeddingClient is open already: enter it once")
        if self._state is _State.CLOSED:
            raise RuntimeError(
                "this EmbeddingClient is closed and cannot be reopened: make another"
            )
        self._session = _session(self._timeouts, self._max_connections)
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        self._state = _State.CLOSED
        if session is not None:
            await session.close()

    # Two signatures: against the union, a list literal of content objects fails as list[int].
    @overload
    async def embed(
        self,
        input: InputItem,
        *,
        model: str,
        encoding_format: EncodingFormat = ...,
        dimensions: int | None = ...,
        user: str | None = ...,
        truncate: Truncate | None = ...,
    ) -> EmbeddingResult: ...
    @overload
    async def embed(
        self,
        input: Sequence[InputItem],
        *,
        model: str,
        encoding_format: EncodingFormat = ...,
        dimensions: int | None = ...,
        user: str | None = ...,
        truncate: Truncate | None = ...,
    ) -> EmbeddingResult: ...
    async def embed(
        self,
        input: InputItem | Sequence[InputItem],
        *,
        model: str,
        encoding_format: EncodingFormat = "float",
        dimensions: int | None = None,
        user: str | None = None,
        truncate: Truncate | None = None,
    ) -> EmbeddingResult:
        """Send one request and return its vectors in input order.

        Raises InputError (nothing sent) for invalid input, an APIError subclass for an error
        answer or a failed exchange; never retries.
        """
        payload, items, spec, expected, limit = _prepare(
            self, input, model, encoding_format, dimensions, user, truncate
        )
        raw, trace_id = await self._post(payload, limit)
        decoded = _decoded(raw, trace_id, items, spec, expected, encoding_format)
        return self._result(decoded, trace_id, model)

    async def embed_within(
        self,
        stall_s: float | None,
        input: Sequence[InputItem],
        *,
        model: str,
        encoding_format: EncodingFormat,
        dimensions: int | None,
        truncate: Truncate | None,
    ) -> EmbeddingResult:
        """:meth:`embed`, but an answer not come whole within ``stall_s`` seconds (None: no bound
        but the client's own) raises the builtin TimeoutError, for the caller to send it again.

        One deadline per request, the earlier of the two, instead of one each: a timer per
        request is the event loop's work too."""
        payload, items, spec, expected, limit = _prepare(
            self, input, model, encoding_format, dimensions, None, truncate
        )
        raw, trace_id = await self._post(payload, limit, stall_s)
        decoded = _decoded(raw, trace_id, items, spec, expected, encoding_format)
        return self._result(decoded, trace_id, model)

    def _result(self, decoded: DecodedBody, trace_id: str | None, model: str) -> EmbeddingResult:
        vectors, usage, answered = decoded
        if answered and answered != model and not self._other_model_seen:
            # A gateway may route to another model: its vectors would not mix with the ones asked.
            self._other_model_seen = True
            log.warning("the server answered for model %r, not the %r asked for", answered, model)
        return EmbeddingResult(vectors, usage, answered or model, trace_id)

    async def _post(
        self, payload: bytes, limit: int, stall_s: float | None = None
    ) -> tuple[bytes, str | None]:
        session = self._session
        if session is None:
            if self._state is _State.CLOSED:
                raise RuntimeError("this EmbeddingClient is closed: make another")
            raise RuntimeError("use EmbeddingClient inside 'async with'")
        failure: exc.APIError
        # Large uploads (images) get a second per MiB on top, so a slow uplink is no timeout.
        allowed_s = self._timeouts.request_s + len(payload) / _UPLOAD_BYTES_PER_S
        stalled = stall_s is not None and stall_s < allowed_s
        deadline = asyncio.timeout(stall_s if stalled else allowed_s)
        try:
            # The per-read timeout never fires for an answer that trickles in byte by byte: the
            # whole exchange has a deadline of its own. (One coroutine, not one per step: every
            # await of the exchange resumes each frame between the task and aiohttp.)
            # Never follow a redirect: it would take the key to a URL the user did not configure.
            async with (
                deadline,
                session.post(
                    self._url, data=payload, headers=self._headers, allow_redirects=False
                ) as resp,
            ):
                trace_id = resp.headers.get(TRACE_HEADER)
                if _announced(resp, limit, trace_id):
                    raw = await resp.read()
                else:
                    raw = await _read_capped(resp, limit, trace_id)
                if resp.status != 200:
                    # A proxy may echo the request, key and all, in its error body: never keep it.
                    raw = raw.replace(self._key_bytes, b"[redacted]")
                    raise _status_error(resp.status, raw, resp.headers, trace_id)
                return raw, trace_id
        except (TimeoutError, aiohttp.ServerTimeoutError) as error:
            if deadline.expired():
                if stalled:
                    raise TimeoutError from None  # the caller's deadline: it sends again
                failure = exc.APITimeoutError(
                    f"no full answer within {allowed_s:.0f} s (timeouts.request_s, plus a second "
                    "per MiB sent)"
                )
            else:
                failure = exc.APITimeoutError(f"request timed out: {type(error).__name__}")
        except aiohttp.ClientError as error:
            failure = exc.APIConnectionError(f"connection failed: {_describe(error)}")
        # Raised outside the handlers so that neither __cause__ nor __context__ holds the aiohttp
        # error: some (ClientResponseError) carry the request info, headers and all, with the key.
        raise failure


def _prepare(
    client: EmbeddingClient,
    input: InputItem | Sequence[InputItem],
    model: str,
    encoding_format: EncodingFormat,
    dimensions: int | None,
    user: str | None,
    truncate: Truncate | None,
) -> tuple[bytes, int, ModelSpec | None, int | None, int]:
    """(payload, items, spec, expected width, answer's byte limit) of a request by ``client``.
    Raises InputError."""
    spec = client.catalog.get(model)  # a model we do not know is sent for the server to judge
    body, items = build_request(
        input,
        model=model,
        spec=spec,
        max_items=client._max_items,
        encoding_format=encoding_format,
        dimensions=dimensions,
        user=user,
        truncate=truncate,
    )
    expected = None if spec is None else spec.output_dimensions(dimensions)
    # An answer bigger than its vectors could ever take is refused unread, not buffered.
    limit = items * ((expected or _UNKNOWN_DIMS) * _MAX_FLOAT_BYTES + 1024) + 65536
    return _dumps(body), items, spec, expected, limit


def _decoded(
    raw: bytes,
    trace_id: str | None,
    items: int,
    spec: ModelSpec | None,
    expected: int | None,
    encoding_format: EncodingFormat,
) -> DecodedBody:
    """An answer's rows, usage (None when it cannot be the request's count) and model."""
    vectors, usage, answered = decode_body(
        raw, items=items, dimensions=expected, encoding_format=encoding_format, trace_id=trace_id
    )
    if usage is not None and not _plausible(usage["total_tokens"], items, spec):
        usage = None
    return vectors, usage, answered


def _session(timeouts: Timeouts, max_connections: int) -> aiohttp.ClientSession:
    """A client's one pooled session: no deadline of aiohttp's own on a whole request (each
    request sets its own), and the connect and per-read limits of ``timeouts``."""
    connector = aiohttp.TCPConnector(limit=max_connections)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=timeouts.connect_s, sock_read=timeouts.read_s
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def client_for(settings: Settings) -> EmbeddingClient:
    """A client as the settings describe it (key, URL, timeouts, catalogue, caps); not opened."""
    return EmbeddingClient(
        api_key_env=settings.api_key_env,
        base_url=settings.base_url,
        allow_insecure_http=settings.allow_insecure_http,
        timeouts=settings.timeouts,
        catalog=catalog_for(settings),
        max_batch_items=settings.batch.max_items,
        max_connections=settings.concurrency,
    )


def _plausible(tokens: int, items: int, spec: ModelSpec | None) -> bool:
    """Whether a usage count can be true: every item costs a token at least, and none more than
    the model's per-item limit (a longer one is refused or cut)."""
    return items <= tokens and (spec is None or tokens <= items * spec.max_input_tokens)


def _announced(resp: aiohttp.ClientResponse, limit: int, trace_id: str | None) -> bool:
    """True if the body's length is announced and uncompressed: aiohttp then reads no byte past
    it, in one join, no loop of our own. Raises MalformedResponseError (retryable) when the
    announced length is over ``limit`` bytes."""
    length = resp.content_length
    if length is None:
        return False
    if length > limit:
        raise _too_big(resp.status, limit, trace_id)
    return "Content-Encoding" not in resp.headers


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, trace_id: str | None) -> bytes:
    """The body, or MalformedResponseError (retryable) once it passes ``limit`` bytes. (A
    compressed answer is counted as it is inflated.)"""
    parts: list[bytes] = []
    size = 0
    async for part in resp.content.iter_chunked(1 << 18):
        size += len(part)
        if size > limit:
            raise _too_big(resp.status, limit, trace_id)
        parts.append(part)
    return b"".join(parts)


def _too_big(status: int, limit: int, trace_id: str | None) -> exc.MalformedResponseError:
    return exc.MalformedResponseError(
        f"the answer is over {limit:,} bytes, more than its vectors could take",
        status=status,
        trace_id=trace_id,
    )


def _dumps(body: object) -> bytes:
    """The request's JSON. A text that is not valid Unicode (a lone surrogate, say) is an
    InputError naming its item, so that one bad text fails alone instead of its whole request."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        items = body.get("input") if isinstance(body, dict) else None
        for index, item in enumerate(items if isinstance(items, list) else []):
            if _unencodable(item):
                raise exc.InputError(
                    "text is not valid Unicode (a lone surrogate?)", item=index
                ) from None
        raise exc.InputError("the request cannot be written as JSON") from None


def _unencodable(item: object) -> bool:
    text = item.get("text") if isinstance(item, dict) else item
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _checked_key(api_key: str | None, api_key_env: str) -> str:
    """The key without surrounding whitespace or a pasted ``Bearer`` scheme. Never echoes it: a
    wrong key is still a secret."""
    source = "the api_key argument" if api_key is not None else f"${api_key_env}"
    key = (api_key if api_key is not None else os.environ.get(api_key_env) or "").strip()
    if key[:7].lower() == "bearer ":
        key = key[7:].strip()
    if len(key) > 1 and key[0] == key[-1] and key[0] in "\"'":  # quoted in a .env file
        key = key[1:-1].strip()
    if not key:
        if api_key is not None:
            raise exc.ConfigError("the API key given is empty")
        raise exc.ConfigError(f"no API key: set the environment variable {api_key_env}")
    bad = next(
        (i for i, char in enumerate(key) if not (char.isascii() and char.isprintable())), None
    )
    if bad is not None:
        raise exc.ConfigError(
            f"the API key in {source} has a character an HTTP header cannot carry "
            f"(at position {bad} of {len(key)}); check how the key was copied"
        )
    return key


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_url(base_url: str, allow_insecure_http: bool) -> None:
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise exc.ConfigError("base URL is not a valid URL") from None
    if "@" in parts.netloc:
        # Credentials in the URL would go out with every request and into every log line.
        raise exc.ConfigError(
            "base URL must not hold credentials (user:password@): the API key goes in "
            "SILICONFLOW_API_KEY (or the variable named by api_key_env)"
        )
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise exc.ConfigError(f"base URL must be https://host/... (or http://), not {shown!r}")
    if parts.path.rstrip("/").endswith("/embeddings"):
        base = shown.rstrip("/").removesuffix("/embeddings")
        raise exc.ConfigError(
            f"base URL must be the API's root, without /embeddings (added to each request): "
            f"use {base!r}"
        )
    if parts.query or parts.fragment or base_url.endswith(("?", "#")):
        raise exc.ConfigError(
            f"base URL must not have a query or fragment (requests go to {{base URL}}/embeddings): "
            f"use {shown!r}"
        )
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise exc.ConfigError(
            f"refusing to send the API key over plain http to {parts.hostname}: use https "
            "or allow insecure http explicitly"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _status_error(
    status: int, raw: bytes, headers: Any, trace_id: str | None
) -> exc.APIStatusError:
    code, message = _error_fields(raw)
    cls = _STATUS_ERRORS.get(status, exc.ServerError if status >= 500 else exc.APIStatusError)
    if status == 400 and code == 20012:
        cls = exc.ModelNotFoundError
    if 300 <= status < 400:
        message = _redirect_message(headers.get("Location"))
    error = cls(
        message or f"HTTP {status}",
        status=status,
        code=code,
        trace_id=trace_id,
        retry_after_s=_retry_after(headers),
    )
    if status in _RETRYABLE_STATUSES:
        error.retryable = True
    return error


def _redirect_message(location: str | None) -> str:
    """A redirect is never followed (it would take the key elsewhere): say where it points,
    without any credentials or query it carries."""
    if not location:
        return "the server answered with a redirect: check the base URL"
    parts = urlsplit(location)
    where = f"{parts.scheme}://{parts.hostname or ''}{parts.path}" if parts.scheme else parts.path
    return f"the server redirects to {where!r}: set the base URL to where it points"


def _error_fields(raw: bytes) -> tuple[int | None, str]:
    """(provider code, message) from a JSON object, a JSON string, an HTML page or plain text."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        if raw.lstrip()[:1] == b"<":  # a proxy's HTML error page: its title says enough
            import html  # here only: its entities' table is some 8 M instructions of start-up

            found = _TITLE.search(raw)
            title = found[1].decode("utf-8", "replace") if found else ""
            text = " ".join(html.unescape(title).split())[:200]
            return None, f"an HTML error page: {text}" if text else "an HTML error page"
        return None, raw.decode("utf-8", "replace").strip()[:500]
    if isinstance(body, dict):
        code = body.get("code")
        return (code if isinstance(code, int) else None), str(body.get("message") or "")
    return None, str(body)[:500]


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if (millis := headers.get("retry-after-ms")) is not None:
        with contextlib.suppress(ValueError):
            if math.isfinite(wait_ms := float(millis)):
                return max(0.0, wait_ms / 1000)
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        wait_s = float(value)
    except ValueError:
        return _seconds_until(value)
    return max(0.0, wait_s) if math.isfinite(wait_s) else None


def _seconds_until(http_date: str) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are UTC
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
