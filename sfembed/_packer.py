"""Chunks -> requests under an item cap and a token cap; halving and bisection of refused requests.

Requests are filled greedily in arrival order: a request closes when the next chunk would break
either cap. Output order is restored later by the writer's reorder buffer, so packing never has to
wait for a slow record. A 413 halves the item cap for the rest of the job; a 400 is narrowed down
by bisection so that one bad item fails alone and the others are sent once.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from operator import attrgetter

from ._config import Settings
from ._models import ModelSpec
from ._types import Chunk

__all__ = ["Packer", "bisect", "packer_for", "request_tokens"]

_TOKENS = attrgetter("tokens")
_WEIGHT = attrgetter("weight")
#: The server's count per token of our estimate up to which requests keep the token cap a dry
#: run counts with: the estimate's own error (the limiter's margin on a request not answered).
_SHARE_SLACK = 1.15


class Packer:
    """Greedy packing of chunks into requests of at most ``max_items`` and ``max_tokens``.

    A chunk larger than ``max_tokens`` on its own travels alone (the chunker has already kept it
    under the model's per-item limit), and so does one of more than ``alone_over`` tokens (by
    its exact count when known): a server that counts a near-limit text as over the limit
    refuses the whole request, and alone, only that text is sent again.

    With ``share_tokens`` (a share of the window, in the server's tokens) and ``most_tokens``
    (the user's cap, in ours), :meth:`calibrate` brings ``max_tokens`` down to that share in our
    tokens once the server's count per token of ours is known to be higher than our estimate's
    error allows.
    """

    def __init__(
        self,
        *,
        max_items: int,
        max_tokens: int,
        alone_over: int | None = None,
        share_tokens: int | None = None,
        most_tokens: int | None = None,
    ) -> None:
        self.max_items = max_items
        self.max_tokens = max_tokens
        self.alone_over = alone_over
        self._share = share_tokens
        self._most = most_tokens if most_tokens is not None else max_tokens
        self._ratio = 1.0
        self._open: list[Chunk] = []
        self._tokens = 0

    def calibrate(self, ratio: float) -> None:
        """The server counts ``ratio`` tokens per token of ours: a request is the window's share
        in its tokens, not in ours, give or take the estimate's error (a server counting 1.5
        times ours made each request 1/19 of the window, not 1/32, and the windows lurched to
        95-96% of the limit)."""
        if ratio == self._ratio or ratio <= 0 or self._share is None:
            return
        self._ratio = ratio
        # Within the estimate's own error of the server's count, the cap stays the one a dry
        # run counts requests with; never larger (a server counting 0.8 times ours gains
        # nothing from larger requests: windows 96.9% at least, against 97.5%).
        share = self._share * min(1.0, _SHARE_SLACK / ratio)
        self.max_tokens = max(1, min(self._most, int(share)))

    def add(self, chunks: Sequence[Chunk], *, most: int | None = None) -> Iterator[list[Chunk]]:
        """Add chunks in order; yields each request as it fills. ``most``, when the caller
        knows one, is at least every chunk's tokens and weight (else they are looked at)."""
        alone = self.alone_over
        if most is None and chunks and alone is not None:
            most = max(_largest(chunks))
        if chunks and alone is not None and most is not None and most > alone:
            yield from self._add_each(chunks, alone)
        else:  # the usual chunks, none near the limit: a request's worth at a time
            yield from self._add_runs(chunks)
        if len(self._open) >= self.max_items:
            yield self._close()

    def _add_each(self, chunks: Sequence[Chunk], alone_over: int) -> Iterator[list[Chunk]]:
        for chunk in chunks:
            if (chunk.weight or chunk.tokens) > alone_over:
                yield from self.flush()
                yield [chunk]
                continue
            if self._open and not self._fits(chunk):
                yield self._close()
            self._open.append(chunk)
            self._tokens += chunk.tokens

    def _add_runs(self, chunks: Sequence[Chunk]) -> Iterator[list[Chunk]]:
        """What :meth:`_add_each` does when no chunk travels alone, from the running sum of the
        chunks' tokens: the open request takes the longest run of chunks that fits both caps
        (one bisection), and closes when the next does not fit."""
        ends = list(itertools.accumulate(map(_TOKENS, chunks)))  # tokens up to each chunk
        start, count = 0, len(chunks)
        while start < count:
            before = ends[start - 1] if start else 0
            fit = before + self.max_tokens - self._tokens  # the most ``ends`` may reach
            most = min(count, start + self.max_items - len(self._open))
            stop = bisect_right(ends, fit, start, max(start, most))
            if stop == start:
                if self._open:
                    yield self._close()
                    continue
                stop = start + 1  # over max_tokens on its own: a request of its own
            self._open.extend(chunks[start:stop])
            self._tokens += ends[stop - 1] - before
            start = stop

    def flush(self) -> Iterator[list[Chunk]]:
        """Yields the last, partly filled request, if any."""
        if self._open:
            yield self._close()

    def halve(self) -> None:
        """The server refused a request as too large (413): halve the item cap from now on."""
        self.max_items = max(1, self.max_items // 2)

    def _fits(self, chunk: Chunk) -> bool:
        return len(self._open) < self.max_items and self._tokens + chunk.tokens <= self.max_tokens

    def _close(self) -> list[Chunk]:
        batch, self._open, self._tokens = self._open, [], 0
        return batch


def _largest(chunks: Sequence[Chunk]) -> tuple[int, int]:
    """The most tokens and the largest weight of ``chunks`` (not empty), without a call each."""
    return max(map(_TOKENS, chunks)), max(map(_WEIGHT, chunks))


def bisect(batch: Sequence[Chunk]) -> tuple[list[Chunk], list[Chunk]]:
    """Two halves of a refused request, to narrow a 400 or a 413 down (``len(batch) >= 2``)."""
    middle = len(batch) // 2
    return list(batch[:middle]), list(batch[middle:])


def request_tokens(settings: Settings, spec: ModelSpec) -> int:
    """The token cap of one request: 1/32 of the window's quota whatever the model's item limit
    (at most ``batch.max_tokens``); a text over it travels alone. A request that is a large share
    of the window makes the pace lurch: capped at bge-m3's 8,192 of a 60,000-token window,
    windows ran from 75% to 92% full. Large enough, too, that the RPM does not bind first."""
    return max(1, min(settings.batch.max_tokens, window_share(settings)))


def window_share(settings: Settings) -> int:
    """The share of the window's quota (tokens, as the server counts them) one request takes."""
    rate = settings.rate
    quota = rate.tpm * (1 - rate.headroom)
    return int(max(quota / 32, 1.25 * quota / max(1.0, rate.rpm * (1 - rate.headroom))))


def packer_for(settings: Settings, spec: ModelSpec) -> Packer:
    """The packer of a job (and of its dry run, which must count the same requests): a text
    over half the item limit travels alone, as a refusal would halve it. Its token cap starts
    at the window's share in our tokens, and follows the server's count (see
    :meth:`Packer.calibrate`)."""
    return Packer(
        max_items=settings.batch.max_items,
        max_tokens=request_tokens(settings, spec),
        alone_over=spec.max_input_tokens // 2,
        share_tokens=max(1, window_share(settings)),
        most_tokens=settings.batch.max_tokens,
    )
