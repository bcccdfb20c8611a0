"""The stage in front of dispatch: texts already embedded, or already on their way, are not sent.

Intake passes every chunk through :meth:`Dedup.admit` before packing. A chunk the cache holds is
answered at once from it; a text repeated within the job waits for the vector of the copy that is
sent (:meth:`Dedup.answered` hands it over, :meth:`Dedup.repeats_of` gives the waiting repeats
to a copy that failed or was cut in two). Vectors received are stored in the cache. Without a
cache the stage lets everything through and costs nothing.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias, cast

import numpy as np

from ._bounds import upper_bound
from ._cache import EmbeddingCache, keys_of_normalised
from ._models import ModelSpec
from ._types import Chunk, FloatArray, JobStats

__all__ = ["Dedup", "RowSink"]

_KEY = operator.attrgetter("key")  # a chunk's key, in C
#: ``dict.pop`` of the texts on their way, typed once (a cast's type is built when it runs).
_PopWaiting: TypeAlias = Callable[[bytes | None, None], "list[Chunk] | None"]


class RowSink(Protocol):
    """Where settled rows go (the delivery stage's ring)."""

    def put(self, chunks: list[Chunk], rows: FloatArray) -> None: ...


class Dedup:
    """Cache lookups and in-job deduplication for one job. Vectors are filed under ``scope``
    (the model and the endpoint that made them); ``truncating`` is ``long_mode == truncate``
    (the server may cut a text, so only texts it cannot cut are cached)."""

    def __init__(
        self,
        cache: EmbeddingCache | None,
        spec: ModelSpec,
        dims: int,
        stats: JobStats,
        *,
        scope: str,
        truncating: bool,
    ) -> None:
        self.cache = cache
        self.scope = scope
        self.spec = spec
        self.dims = dims
        self.stats = stats
        self.truncating = truncating
        # key of a text on its way -> the repeats waiting for its vector (None: none yet)
        self._waiting: dict[bytes, list[Chunk] | None] = {}

    def keys(self, texts: Sequence[str]) -> list[bytes] | None:
        """The cache keys of ``texts`` (normalised, none blank: a block of whole texts), for
        intake to make each chunk with its key and admit them with :meth:`admit_keyed`; None
        when keys are not made up front (no cache, or truncate mode, where a text the server
        may cut is not cached)."""
        if self.cache is None or self.truncating:
            return None
        return keys_of_normalised(texts)

    async def admit(self, chunks: list[Chunk], rows: RowSink) -> list[Chunk]:
        """The chunks still to send. Those the cache holds are put in ``rows`` at once, and a
        repeat of a text already on its way waits for that copy's answer."""
        if self.cache is None:
            return chunks
        if self.truncating:
            keyed = [chunk for chunk in chunks if self._cacheable(chunk)]
        else:  # without a call per chunk: every text is cacheable
            keyed = [chunk for chunk in chunks if type(chunk.item) is str and chunk.item]
        if not keyed:
            return chunks
        keys = self.cache.keys([cast(str, chunk.item) for chunk in keyed])
        for chunk, key in zip(keyed, keys, strict=True):
            chunk.key = key
        return await self._admit(chunks, keyed, keys, rows)

    async def admit_keyed(
        self, chunks: list[Chunk], keys: list[bytes], rows: RowSink
    ) -> list[Chunk]:
        """:meth:`admit` of chunks made with their keys, ``keys`` (from :meth:`keys`, in the
        same order): the usual block, without a pass over its chunks when none is cached and
        none repeats."""
        return await self._admit(chunks, chunks, keys, rows)

    async def _admit(
        self, chunks: list[Chunk], keyed: list[Chunk], keys: list[bytes], rows: RowSink
    ) -> list[Chunk]:
        assert self.cache is not None
        hits = await self.cache.lookup(self.scope, self.dims, keys)
        fresh = dict.fromkeys(keys)  # None: sent, and no repeat waits for it yet
        if not hits and len(fresh) == len(keys) and self._waiting.keys().isdisjoint(fresh):
            self._waiting.update(fresh)  # the usual block: every text new, all sent
            return chunks
        if hits and len(hits) == len(fresh):  # every text held (a job run again): all served
            return self._serve(chunks, keyed, keys, hits, rows)
        return self._hold(chunks, keyed, hits, rows)

    def _serve(
        self,
        chunks: list[Chunk],
        keyed: list[Chunk],
        keys: list[bytes],
        hits: dict[bytes, FloatArray],
        rows: RowSink,
    ) -> list[Chunk]:
        """What :meth:`_hold` does when the cache holds every key: ``keyed`` put in ``rows``
        without a Python step per chunk, and the chunks that were not keyed sent."""
        rows.put(keyed, np.stack(list(map(hits.__getitem__, keys))))
        self.stats.cached += len(keyed)
        if keyed is chunks:
            return []
        served = set(map(id, keyed))
        return [chunk for chunk in chunks if id(chunk) not in served]

    def _hold(
        self, chunks: list[Chunk], keyed: list[Chunk], hits: dict[bytes, FloatArray], rows: RowSink
    ) -> list[Chunk]:
        """The chunks to send, once those the cache holds are put in ``rows`` and repeats of a
        text on its way are set to wait for it."""
        served: list[Chunk] = []
        held: set[int] = set()
        waiting = self._waiting
        for chunk in keyed:
            key = cast(bytes, chunk.key)
            if key in hits:
                served.append(chunk)
            elif key in waiting:
                repeats = waiting[key]
                if repeats is None:
                    waiting[key] = [chunk]
                else:
                    repeats.append(chunk)
            else:
                waiting[key] = None  # this copy is sent; later repeats wait for it
                continue
            held.add(id(chunk))
        if served:
            rows.put(served, np.stack([hits[cast(bytes, c.key)] for c in served]))
            self.stats.cached += len(served)
        self.stats.deduplicated += len(held) - len(served)
        return [chunk for chunk in chunks if id(chunk) not in held]

    def _cacheable(self, chunk: Chunk) -> bool:
        """A text whose vector depends on the text alone: in truncate mode, not one the server
        might cut (its vector depends on the cut side)."""
        if not isinstance(chunk.item, str) or not chunk.item:
            return False
        limit = self.spec.max_input_tokens
        return not self.truncating or upper_bound(chunk.item, self.spec) <= limit

    def repeats_of(self, chunk: Chunk) -> list[Chunk]:
        """The repeats waiting for ``chunk``'s vector, which no longer wait: the caller fails
        them with it, or sends them on their own."""
        return (self._waiting.pop(chunk.key, None) or []) if chunk.key is not None else []

    async def answered(self, request: list[Chunk], vectors: FloatArray, rows: RowSink) -> None:
        """Give each answered text's vector to the repeats waiting for it, then keep the vectors
        in the cache. ``vectors`` are the answer's, as the decoder gave them: finite."""
        keys = list(map(_KEY, request))
        if self._waiting:  # one pop per key in C; a key of None was never waited on
            pop = cast(_PopWaiting, self._waiting.pop)
            found = list(map(pop, keys, itertools.repeat(None)))
            if any(found):
                for i, repeats in enumerate(found):
                    if repeats:
                        rows.put(repeats, np.repeat(vectors[i : i + 1], len(repeats), axis=0))
        if self.cache is None:
            return
        # The vectors of an answer: the decoder refused any holding NaN or infinity, so the cache
        # does not look for them again.
        store = self.cache._store_decoded
        if None not in keys:  # the usual case: every text was keyed
            await store(self.scope, self.dims, cast(list[bytes], keys), vectors)
            return
        keyed = [i for i, key in enumerate(keys) if key is not None]
        if keyed:
            known = [cast(bytes, keys[i]) for i in keyed]
            await store(self.scope, self.dims, known, vectors[keyed])
