"""The data that flows through sfembed: wire shapes, inputs and results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NotRequired, TypeAlias, TypedDict

import numpy as np
import numpy.typing as npt

from ._config import EncodingFormat, Truncate
from ._exceptions import SFEmbedError

__all__ = [
    "Chunk",
    "EmbeddedBatch",
    "EmbeddingResult",
    "EncodingFormat",
    "Failure",
    "FloatArray",
    "ImageInput",
    "InputItem",
    "IntArray",
    "JobStats",
    "MetaArray",
    "Span",
    "TextInput",
    "Ticket",
    "Truncate",
    "Unusable",
    "Usage",
    "WindowStats",
    "WireRequest",
]

FloatArray: TypeAlias = npt.NDArray[np.float32]
IntArray: TypeAlias = npt.NDArray[np.int64]
#: Rows of (position, chunk number, start, end), one per output row in ``chunks`` mode.
MetaArray: TypeAlias = npt.NDArray[np.int64]
#: A half-open range [start, end) of characters or tokens.
Span: TypeAlias = tuple[int, int]


class TextInput(TypedDict):
    """A text content object (VL model): ``{"text": ...}``."""

    text: str


class ImageInput(TypedDict):
    """An image content object (VL model): a URL, base64 data, or (client side) a local path."""

    image: str | Path


#: One item of a request: a string, a token-id list, or (VL model) a content object.
InputItem: TypeAlias = str | list[int] | TextInput | ImageInput


class Usage(TypedDict):
    """Token usage as the server counted it."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class WireRequest(TypedDict):
    """The JSON body of ``POST /embeddings``."""

    model: str
    input: str | list[object] | dict[str, str]
    encoding_format: NotRequired[EncodingFormat]
    dimensions: NotRequired[int]
    user: NotRequired[str]
    truncate: NotRequired[Truncate]


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """The answer to one request.

    ``embeddings`` is C-contiguous float32 of shape (items, dimensions), row i for input item i
    (ordered by the response's ``index``). ``trace_id`` comes from ``x-siliconcloud-trace-id``.
    ``usage`` is the server's count, or ``None`` when the answer carried none that can be true
    (missing, as some gateways strip it; negative; more than the request's items could hold).
    """

    embeddings: FloatArray
    usage: Usage | None
    model: str
    trace_id: str | None


@dataclass(slots=True)
class Chunk:
    """One item to send: a whole record, or one piece of an over-long one.

    ``unit`` is the output row it contributes to (the record's position in ``pool`` mode, the
    chunk's sequence number in ``chunks`` mode); ``tokens`` is the estimated count with special
    tokens (what requests are packed and charged by); ``start``/``end`` are its characters in the
    record's text; ``weight`` is its exact token count when known, for pooling (0: use tokens);
    ``key`` its cache key, when the job has a cache and the item can be cached.
    """

    unit: int
    position: int
    number: int
    item: str | dict[str, str]
    tokens: int
    start: int = 0
    end: int = 0
    weight: int = 0
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Unusable:
    """An input already known to be unusable (a reader's verdict on a malformed line, say).

    Given to the pipeline in its place, it keeps the record's row (NaN) and fails with ``reason``,
    so that rows and records stay aligned and the failure is reported, not dropped.
    """

    reason: str


class Ticket:
    """One request admitted by a limiter, and what it is charged now.

    ``id`` is chosen by the process that asked, unique among that limiter's tickets, so that a
    shared store can make settling and refunding idempotent. ``tokens`` and ``requests`` start at
    the charge asked for and one; ``settle`` corrects ``tokens`` to the server's count, and
    ``refund`` sets both to zero. Every limiter issues its own subclass; a ticket is only ever
    handed back to the limiter that issued it.
    """

    __slots__ = ("id", "requests", "tokens")

    def __init__(self, id: str, tokens: int, requests: int = 1) -> None:
        self.id = id
        self.tokens = tokens
        self.requests = requests

    @property
    def refunded(self) -> bool:
        """True once the ticket was refunded: it holds no charge."""
        return self.requests == 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, tokens={self.tokens}, requests={self.requests})"
        )


@dataclass(frozen=True, slots=True)
class Failure:
    """A record (or, in ``chunks`` mode, a chunk) that could not be embedded, and why.

    ``reason`` says why in words (for an error of the server's: with its status, provider code
    and trace id). ``error`` is that error, to branch on: an SFEmbedError of the class that
    failed it, and for an APIError its ``status``, ``code``, ``trace_id`` and ``retryable``. It
    is a copy without traceback, cause or context (it holds none of the job's frames, and
    pickles). An input the client would not send (a text that is not valid Unicode, an image
    for a text-only model) carries that InputError; an input refused as it was read (an empty
    text, a line that is not JSON) carries None. ``retryable`` is true when the input may be
    embedded if sent again later (the server was overloaded, timed out or unreachable past the
    retries).
    """

    position: int
    reason: str
    chunk: int | None = None
    error: SFEmbedError | None = field(default=None, compare=False)

    @property
    def retryable(self) -> bool:
        """True when sending the input again later may succeed (see the class docstring)."""
        return self.error is not None and self.error.retryable


@dataclass(frozen=True, slots=True)
class EmbeddedBatch:
    """Consecutive output rows: ``positions[i]`` is the input position of ``embeddings[i]``.

    Unpacks as ``positions, embeddings``. In ``chunks`` mode ``chunk_numbers`` and ``spans``
    (character start and end in the record) describe each row. A failed row is NaN, and
    ``failures`` says why for each failed row of this batch.
    """

    positions: IntArray
    embeddings: FloatArray
    chunk_numbers: IntArray | None = None
    spans: MetaArray | None = None
    failures: tuple[Failure, ...] = ()

    def __iter__(self) -> Iterator[IntArray | FloatArray]:
        yield self.positions
        yield self.embeddings

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(slots=True)
class WindowStats:
    """What one rate-limit window of a job saw: the requests settled in it and their tokens (the
    server's count), and the 429s answered in it, by the limit they named."""

    tokens: int = 0
    requests: int = 0
    rate_limited_tpm: int = 0
    rate_limited_rpm: int = 0
    rate_limited_other: int = 0  # a 429 that named neither limit


@dataclass(slots=True)
class JobStats:
    """Live counters of a job, read by progress hooks, the summary and the run report. Tokens
    are the server's.

    ``windows[i]`` covers seconds [i * window_s, (i + 1) * window_s) after ``started_s`` (on
    the monotonic clock); a request counts in the window where it was settled, a 429 where it
    was answered. ``first_request_s`` is when the first request went out, in seconds after
    ``started_s`` (None until then)."""

    records: int = 0
    chunks: int = 0
    rows: int = 0
    requests: int = 0
    tokens: int = 0
    rate_limited: int = 0
    retries: int = 0
    resumed: int = 0  # records an earlier run of the job had done (progress counts from there)
    cached: int = 0  # items answered by the cache, not sent
    deduplicated: int = 0  # items that repeated one already on its way, not sent again
    in_flight: int = 0
    pace_tokens_per_s: float = 0.0  # the limiter's current pace, for an ETA
    pace_requests_per_s: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    started_s: float = field(default_factory=time.monotonic)
    window_s: float = 60.0
    windows: list[WindowStats] = field(default_factory=list)
    first_request_s: float | None = None

    def sending(self) -> None:
        """A request goes out now."""
        self.in_flight += 1
        if self.first_request_s is None:
            self.first_request_s = time.monotonic() - self.started_s

    def settled(self, tokens: int) -> None:
        """A request was answered, and the server counted ``tokens`` for it."""
        self.requests += 1
        self.tokens += tokens
        window = self._window()
        window.requests += 1
        window.tokens += tokens

    def limited(self, limit: str | None) -> None:
        """A request was answered 429, naming ``limit`` (``"tpm"``, ``"rpm"`` or None)."""
        self.rate_limited += 1
        window = self._window()
        if limit == "tpm":
            window.rate_limited_tpm += 1
        elif limit == "rpm":
            window.rate_limited_rpm += 1
        else:
            window.rate_limited_other += 1

    def _window(self) -> WindowStats:
        index = max(0, int((time.monotonic() - self.started_s) // self.window_s))
        while len(self.windows) <= index:  # one per window, quiet ones too
            self.windows.append(WindowStats())
        return self.windows[index]
