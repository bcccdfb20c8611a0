"""The first stage: records -> counted, split, packed requests.

Records are read in blocks. Each block's tokens are estimated in one call (every request is
charged by the estimator, so one calibration holds for all), and the few texts that can really be
over the model's per-item limit are counted exactly, off the event loop and off the way of the
others: the rest of the block is packed and sent at once, while the exact tokenizer loads (up to
seconds, the first time) and counts. A text over the limit is cut
at token boundaries into pieces (:class:`Splitter`); its row is reserved in the reorder ring and
pooled back when its last piece is answered (``pool``), or each piece has a row (``chunks``). The
chunks pass the dedup stage and are packed into requests, which go to dispatch through a bounded
stream that closes when intake ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from asyncio import TaskGroup
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, TypeGuard, cast

import numpy as np

from ._bounds import SURE_SHARE, may_exceed
from ._cache import normalise, normalise_all
from ._chunker import char_range, drop_blank, split_spans
from ._config import Settings
from ._dedup import Dedup
from ._delivery import RowWriter
from ._estimator import CharClassEstimator
from ._models import ModelSpec
from ._packer import Packer
from ._streams import SendStream
from ._tokenizers import FAMILIES
from ._types import Chunk, JobStats, Span, Unusable

if TYPE_CHECKING:  # loaded with the exact counter, which a job of short texts never starts
    from ._tokenizer_process import ExactCounting

__all__ = ["BLOCK", "Input", "Intake", "Splitter"]

BLOCK = 512  # records counted per tokenizer call: large enough to amortise, small to stream
#: The first blocks are smaller, so that the first request waits for the reading and counting
#: of its own records only (a request holds 64 items at most), not of a whole block.
_FIRST_BLOCKS = (64, 128, 256)
#: Turns of the event loop given to the other stages after each of the first blocks, instead of
#: one: the job's first requests need some eight turns to be on the wire (a new connection's
#: callbacks, then the write), and as many again for a local server in this process to read
#: them; a block read and estimated between two of those turns holds them up by its whole time.
_FIRST_TURNS = 16
_IMAGE_TOKENS = 1024  # charged for an image before the server's count corrects it
#: A block of more characters than this is estimated off the event loop (a 10 MB text took
#: seconds of it).
_ESTIMATE_OFF_LOOP = 1 << 20

Input = str | dict[str, str] | Unusable
Offsets = Sequence[Span]


class Splitter:
    """Token counts of records, and the cutting of texts into pieces under the per-item limit.

    The limit is the model's, fixed, never learned from refusals: a record's cuts, and so its
    vector, must not depend on what happened earlier in the job."""

    def __init__(self, spec: ModelSpec, *, overlap_tokens: int, exact: bool) -> None:
        self.spec = spec
        self.limit = spec.max_input_tokens
        self.overlap_tokens = overlap_tokens
        self.exact = exact  # False in truncate mode: the server cuts, nothing is counted exactly
        family = FAMILIES.get(spec.tokenizer or "")
        self.estimator = CharClassEstimator(spec.special_tokens, family=family)
        self._exact: ExactCounting | None = None

    async def measure(self, block: Sequence[Input]) -> tuple[list[str], list[int], list[int]]:
        """The texts of a block, their estimated tokens, and the indices of those that can
        really be over the limit, to count exactly (:meth:`exact_counts`)."""
        if set(map(type, block)) == {str}:  # the usual block: the texts are the inputs
            texts = list(cast(Sequence[str], block))
        else:
            texts = [item if type(item) is str else _text_of(item) for item in block]
        if all(texts):  # the usual block: every input has a text, so every one is estimated
            tokens = await self._estimate(texts)
        else:
            estimates = iter(await self._estimate([text for text in texts if text]))
            tokens = [
                next(estimates) if text else _IMAGE_TOKENS if _is_image(item) else 0
                for item, text in zip(block, texts, strict=True)
            ]
        return texts, tokens, self._doubtful(texts, tokens)

    async def _estimate(self, texts: list[str]) -> list[int]:
        if sum(map(len, texts)) > _ESTIMATE_OFF_LOOP:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.estimator.count, texts)
        return self.estimator.count(texts)

    def _doubtful(self, texts: Sequence[str], tokens: Sequence[int]) -> list[int]:
        """A strict upper bound (from the text's length) proves most texts fit, and an estimate
        well under the limit the rest but a few: those are counted exactly. A text is thus cut,
        or sent whole, by what it is alone. A text that is not valid Unicode (a lone surrogate)
        is not counted: no tokenizer takes it, and it goes whole, for the client to refuse it
        alone."""
        if not self.exact:
            return []
        bar = SURE_SHARE * self.limit  # may_exceed's first test, made here without a call
        if not tokens or max(tokens) <= bar:  # the usual block: no text near the limit
            return []
        return [
            i
            for i, count in enumerate(tokens)
            if count > bar and may_exceed(texts[i], count, self.spec) and _encodable(texts[i])
        ]

    async def exact_counts(self, texts: Sequence[str]) -> list[int]:
        """Exact counts of ``texts``, in one batch off the event loop."""
        return await self.counting().count(texts)

    def counting(self) -> ExactCounting:
        """The exact counter, used the first time a text may be too long: loading takes seconds
        and, for XLM-R, some 300 MB that a job of short texts never needs. It runs in a process
        of its own (``_tokenizer_process``)."""
        if self._exact is None:
            from ._tokenizer_process import ExactCounting

            self._exact = ExactCounting(self.spec)
        return self._exact

    def fits(self, problem: str | None, exact: int | None) -> bool:
        """True when the record goes whole: unusable, proved short by its upper bound (``exact``
        is None), or short by its exact count."""
        return problem is not None or exact is None or exact <= self.limit

    async def cuts(self, text: str) -> tuple[Offsets, list[Span]]:
        """Token offsets of an over-long text and the token ranges it is cut into."""
        offsets = await self.counting().spans(text)
        # Off the event loop: a text of megabytes has millions of tokens to cut between, and the
        # requests already packed must keep going out meanwhile.
        return await asyncio.get_running_loop().run_in_executor(None, self._cut, text, offsets)

    def _cut(self, text: str, offsets: Offsets) -> tuple[Offsets, list[Span]]:
        limit = self.limit - self.spec.special_tokens
        spans = split_spans(text, offsets, limit, overlap=self.overlap_tokens)
        return offsets, drop_blank(text, offsets, spans)

    def piece(
        self, unit: int, position: int, number: int, text: str, offsets: Offsets, span: Span
    ) -> Chunk:
        """Piece ``number`` of record ``position``, the token range ``span`` of ``text``, for row
        ``unit``."""
        start, end = char_range(offsets, span)
        piece = normalise(text[start:end])
        weight = span[1] - span[0] + self.spec.special_tokens  # exact: pooling is by real tokens
        tokens = self.estimator.count([piece])[0]  # the charge basis, as for every item
        return Chunk(unit, position, number, piece, tokens, start, end, weight)

    async def halves(self, chunk: Chunk) -> list[Chunk] | None:
        """A refused near-limit text cut in two by exact tokens (a piece of blanks alone is
        dropped, so perhaps one), or None if it is a single token and cannot be cut."""
        text = chunk.item
        assert isinstance(text, str)
        offsets = await self.counting().spans(text)
        middle = len(offsets) // 2
        if middle == 0:
            return None
        spans = drop_blank(text, offsets, [(0, middle), (middle, len(offsets))])
        halves = [
            self.piece(chunk.unit, chunk.position, chunk.number, text, offsets, span)
            for span in spans
        ]
        return [
            dataclasses.replace(h, start=chunk.start + h.start, end=chunk.start + h.end)
            for h in halves
        ]


class Intake:
    """Reads the inputs, makes chunks and sends packed requests (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        splitter: Splitter,
        dedup: Dedup,
        packer: Packer,
        stats: JobStats,
        *,
        requests: SendStream[list[Chunk]],
        rows: RowWriter,
    ) -> None:
        self.chunks_mode = settings.long_mode == "chunks"
        self.splitter = splitter
        self.dedup = dedup
        self.packer = packer
        self.stats = stats
        self._requests = requests
        self._rows = rows

    async def run(self, inputs: Iterable[Input] | AsyncIterable[Input]) -> None:
        """Read every input into requests; the request stream and the row writer are closed
        however this ends, which ends dispatch once it has sent what is buffered."""
        try:
            with self._requests, self._rows:
                async with asyncio.TaskGroup() as group:
                    await self._read(inputs, group)
                    # The last request goes now, not after the long records still counting.
                    await self._send(list(self.packer.flush()))
                await self._send(list(self.packer.flush()))  # what those records left open
        except BaseExceptionGroup as group:  # a long record's task failed: its error, unwrapped
            raise group.exceptions[0] from None

    async def _read(self, inputs: Iterable[Input] | AsyncIterable[Input], group: TaskGroup) -> None:
        position = 0
        async for block in _blocks(inputs, itertools.chain(_FIRST_BLOCKS, itertools.repeat(BLOCK))):
            texts, tokens, doubtful = await self.splitter.measure(block)
            if self.chunks_mode:
                exact = await self._exact(texts, doubtful)
                await self._chunk_rows(position, block, texts, tokens, exact)
            else:
                await self._record_rows(position, block, texts, tokens, doubtful, group)
            position += len(block)
            self.stats.records += len(block)
            if position <= sum(_FIRST_BLOCKS):
                for _ in range(_FIRST_TURNS):
                    await asyncio.sleep(0)

    async def _exact(self, texts: Sequence[str], doubtful: list[int]) -> dict[int, int]:
        if not doubtful:
            return {}
        counts = await self.splitter.exact_counts([texts[i] for i in doubtful])
        return dict(zip(doubtful, counts, strict=True))

    async def _record_rows(
        self,
        first: int,
        block: Sequence[Input],
        texts: Sequence[str],
        tokens: Sequence[int],
        doubtful: list[int],
        group: TaskGroup,
    ) -> None:
        """One row per record (``pool``, ``truncate``): the block's rows are reserved at once and
        its chunks built without an await per record, the hot path. Records to count exactly
        are left to a task of their own, so that they hold up nothing but their own rows."""
        unit = await self._reserve(len(block))
        if not doubtful and _whole_texts(block):  # the usual block: columns, no call per record
            await self._whole_rows(unit, first, block, tokens)
        else:
            await self._pack(self._some_rows(unit, first, block, texts, tokens, set(doubtful)))
        if doubtful:
            long = _Long(unit, first, [block[i] for i in doubtful], doubtful)
            group.create_task(self._long_rows(long, [texts[i] for i in doubtful], tokens))

    async def _whole_rows(
        self, unit: int, first: int, block: Sequence[str], tokens: Sequence[int]
    ) -> None:
        """Chunks of a block of texts that all go whole, made column by column (each with its
        cache key when the job keys texts up front), and packed."""
        size = len(block)
        limit = self.splitter.limit
        most = max(tokens)
        charged = tokens if most <= limit else [min(n, limit) for n in tokens]
        sent = normalise_all(block)
        keys = self.dedup.keys(sent)
        zero = itertools.repeat(0)  # endless, so one serves every column of zeros
        chunks = list(
            map(
                Chunk,
                range(unit, unit + size),
                range(first, first + size),
                zero,
                sent,
                charged,
                zero,
                map(len, block),
                zero,
                itertools.repeat(None) if keys is None else keys,
            )
        )
        most = min(most, limit)  # the packer's bound of tokens (no weight: none was counted)
        if keys is None:
            admitted = await self.dedup.admit(chunks, self._rows)
        else:
            admitted = await self.dedup.admit_keyed(chunks, keys, self._rows)
        await self._send(list(self.packer.add(admitted, most=most)))

    def _some_rows(
        self,
        unit: int,
        first: int,
        block: Sequence[Input],
        texts: Sequence[str],
        tokens: Sequence[int],
        later: set[int],
    ) -> list[Chunk]:
        """The chunks of a block's records that go whole, but those ``later`` counts exactly;
        an unusable record's row fails at once."""
        limit = self.splitter.limit
        chunks: list[Chunk] = []
        for i, (item, text) in enumerate(zip(block, texts, strict=True)):
            if i in later:
                continue
            if type(item) is str and item and not item.isspace():  # a text that goes whole
                sent = normalise(item)
                chunks.append(
                    Chunk(unit + i, first + i, 0, sent, min(tokens[i], limit), 0, len(item))
                )
            else:
                chunks.extend(self._record(unit + i, first + i, item, text, tokens[i], None) or [])
        return chunks

    async def _long_rows(self, long: _Long, texts: list[str], tokens: Sequence[int]) -> None:
        """The records of a block that may be over the limit: counted exactly, then sent whole
        or cut into pieces pooled back into their row."""
        counts = await self.splitter.exact_counts(texts)
        chunks: list[Chunk] = []
        for i, item, text, count in zip(long.indices, long.items, texts, counts, strict=True):
            unit, position = long.unit + i, long.first + i
            record = self._record(unit, position, item, text, tokens[i], count)
            if record is None:  # over the limit: pieces pooled back into the one row
                offsets, spans = await self.splitter.cuts(text)
                self._rows.expect_parts(unit, len(spans) - 1)
                record = [
                    self.splitter.piece(unit, position, number, text, offsets, span)
                    for number, span in enumerate(spans)
                ]
            chunks.extend(record)
        await self._pack(chunks)

    async def _chunk_rows(
        self,
        first: int,
        block: Sequence[Input],
        texts: Sequence[str],
        tokens: Sequence[int],
        exact: dict[int, int],
    ) -> None:
        """One row per chunk: each record reserves its rows as it goes, so that a record of more
        chunks than the ring holds still streams through it."""
        for i, (item, text) in enumerate(zip(block, texts, strict=True)):
            if self.splitter.fits(_problem(item, text), exact.get(i)):
                unit = await self._reserve(1)
                _describe(self._rows, unit, first + i, 0, (0, len(text)))
                record = self._record(unit, first + i, item, text, tokens[i], exact.get(i))
                await self._pack(record or [])
                continue
            offsets, spans = await self.splitter.cuts(text)
            for number, span in enumerate(spans):
                unit = await self._reserve(1)
                piece = self.splitter.piece(unit, first + i, number, text, offsets, span)
                _describe(self._rows, unit, first + i, number, (piece.start, piece.end))
                await self._pack([piece])

    def _record(
        self,
        unit: int,
        position: int,
        item: Input,
        text: str,
        tokens: int,
        exact: int | None,
    ) -> list[Chunk] | None:
        """The chunk of one record that goes whole, in row ``unit`` (none if it is unusable: its
        row fails), or None if it must be cut."""
        problem = _problem(item, text)
        if not self.splitter.fits(problem, exact):
            return None
        sendable = "" if isinstance(item, Unusable) else _sent(item)  # an Unusable never is
        tokens = min(tokens, self.splitter.limit)
        chunk = Chunk(unit, position, 0, sendable, tokens, 0, len(text), exact or 0)
        if problem is not None:
            self._rows.fail(chunk, problem)
            return []
        return [chunk]

    async def _reserve(self, units: int) -> int:
        # Send the open request before waiting for room: the oldest unfinished row may be in it.
        if not self._rows.has_room(units):
            await self._send(list(self.packer.flush()))
        return await self._rows.reserve(units)

    async def _pack(self, chunks: list[Chunk]) -> None:
        """Pack the chunks the dedup stage lets through; send the requests they fill. Packing
        is done before the first await, as long records' tasks pack too."""
        admitted = await self.dedup.admit(chunks, self._rows)
        await self._send(list(self.packer.add(admitted)))

    async def _send(self, packed: Iterable[list[Chunk]]) -> None:
        for request in packed:
            self.stats.chunks += len(request)
            await self._requests.send(request)


@dataclasses.dataclass(frozen=True, slots=True)
class _Long:
    """The records of a block left to count exactly: row of the block's first record, its
    position, the records and their indices in the block."""

    unit: int
    first: int
    items: list[Input]
    indices: list[int]


def _describe(rows: RowWriter, unit: int, position: int, number: int, span: Span) -> None:
    meta = np.array([[position, number, span[0], span[1]]], dtype=np.int64)
    rows.describe(np.array([unit], dtype=np.int64), meta)


async def _blocks(
    inputs: Iterable[Input] | AsyncIterable[Input], sizes: Iterator[int]
) -> AsyncIterator[list[Input]]:
    """Lists of inputs, each of up to the next of ``sizes``; a sync source is sliced without a
    per-item await."""
    if isinstance(inputs, AsyncIterable):
        block: list[Input] = []
        size = next(sizes)
        async for item in inputs:
            block.append(item)
            if len(block) == size:
                yield block
                block, size = [], next(sizes)
        if block:
            yield block
        return
    iterator = iter(inputs)
    while block := list(islice(iterator, next(sizes))):
        yield block
        await asyncio.sleep(0)  # let dispatch run between blocks of a fast sync source


def _text_of(item: object) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return str(item["text"])
    return ""


def _whole_texts(block: Sequence[Input]) -> TypeGuard[Sequence[str]]:
    """True when every input of ``block`` is a text that is not blank (the usual case)."""
    if set(map(type, block)) != {str}:
        return False
    texts = cast(Sequence[str], block)
    return all(texts) and not any(map(str.isspace, texts))


def _sent(item: str | dict[str, str]) -> str | dict[str, str]:
    """What is sent for an input: a text normalised (see ``_cache``), anything else as it is.

    Always, with a cache or without: a text's vector is then a function of the key the cache
    files it under, so the cache never changes a job's output."""
    return normalise(item) if isinstance(item, str) else item


def _encodable(text: str) -> bool:
    """True unless ``text`` holds a lone surrogate, which UTF-8 (and so every tokenizer and the
    JSON of a request) cannot carry."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_image(item: object) -> bool:
    return isinstance(item, dict) and "image" in item


def _problem(item: object, text: str) -> str | None:
    """Why an input cannot be sent at all, or None."""
    if type(item) is str:  # the usual case first; isspace, unlike strip, copies nothing
        return None if item and not item.isspace() else "empty text"
    if isinstance(item, Unusable):
        return item.reason
    if isinstance(item, str):
        return None if item and not item.isspace() else "empty text"
    if _is_image(item) or (isinstance(item, dict) and text):
        return None
    return f"unsupported input of type {type(item).__name__}"
