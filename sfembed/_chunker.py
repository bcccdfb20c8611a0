"""Over-long records -> chunks cut at token boundaries; chunk vectors -> one vector per record.

A cut lands near a paragraph or sentence end when one is close to the token limit, so chunks stay
readable; otherwise at the limit. Pooling is the token-weighted mean of the chunk vectors, L2
normalised, so a record split in two is embedded as the text it was.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from ._types import FloatArray, Span

# A chunk is a Span of token indices: (first token, end token), end exclusive.
__all__ = ["char_range", "drop_blank", "pool", "split_spans"]

# Latin and CJK sentence ends (full-width ! ? ; written as escapes), then closing quotes.
_SENTENCE_END = r"[.!?;。\uff01\uff1f\uff1b…]['\")\]」』]*$"
_LOOKBACK = 0.15  # fraction of a chunk searched backwards for a natural cut


def split_spans(
    text: str, offsets: Sequence[tuple[int, int]], limit: int, *, overlap: int = 0
) -> list[Span]:
    """Token ranges of at most ``limit`` tokens covering all ``offsets`` (char spans of tokens).

    Consecutive ranges share ``overlap`` tokens. A record that fits gives one range.
    """
    count = len(offsets)
    if count <= limit:
        return [(0, count)]
    overlap = max(0, min(overlap, limit // 2))
    spans: list[Span] = []
    start = 0
    while start < count:
        end = min(start + limit, count)
        if end < count:
            end = _natural_cut(text, offsets, start, end)
        spans.append((start, end))
        if end == count:
            break
        start = max(end - overlap, start + 1)
    return spans


def drop_blank(text: str, offsets: Sequence[tuple[int, int]], spans: list[Span]) -> list[Span]:
    """``spans`` without those covering whitespace alone.

    A long whitespace run (byte-level BPE gives a token per few blanks) can fill whole pieces.
    Such a piece is sent stripped, as the empty string no server embeds, and it carries none of
    the record's meaning: it is dropped, and the record is the pool of its other pieces."""
    kept = [span for span in spans if not _blank(text, char_range(offsets, span))]
    return kept or spans[:1]  # a text of blanks alone is refused before it is ever cut


def _blank(text: str, chars: tuple[int, int]) -> bool:
    start, end = chars
    return end <= start or text[start:end].isspace()


def _natural_cut(text: str, offsets: Sequence[tuple[int, int]], start: int, end: int) -> int:
    """The best cut in (end - lookback, end]: after a paragraph, else after a sentence, else end."""
    floor = max(start + 1, end - int((end - start) * _LOOKBACK))
    sentence = 0
    for cut in range(end, floor - 1, -1):
        gap = text[offsets[cut - 1][1] : offsets[cut][0]] if cut < len(offsets) else ""
        if "\n\n" in gap:
            return cut
        if not sentence and ("\n" in gap or _ends_sentence(text, offsets[cut - 1])):
            sentence = cut
    return sentence or end


@functools.cache
def _sentence_end() -> re.Pattern[str]:
    """Compiled at the first cut, not at import: 3.7 M instructions a job of short texts, which
    loads this module before its first request, does without."""
    return re.compile(_SENTENCE_END)


def _ends_sentence(text: str, token: tuple[int, int]) -> bool:
    return bool(_sentence_end().search(text[token[0] : token[1]]))


def char_range(offsets: Sequence[tuple[int, int]], span: Span) -> tuple[int, int]:
    """The characters a token range covers: (start, end), end exclusive."""
    return offsets[span[0]][0], offsets[span[1] - 1][1]


def pool(vectors: FloatArray, weights: Sequence[float]) -> FloatArray:
    """The token-weighted mean of ``vectors`` (rows), L2-normalised, as float32."""
    mean = np.average(vectors.astype(np.float64), axis=0, weights=np.asarray(weights, np.float64))
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)
