"""The local server's own tokenizer: deterministic, numpy over a whole batch, and independent
of the engine's counters."""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from .._codepoints import CodePointTable

# Every character falls in a class; a run of one class costs ceil(run / width) tokens. This mimics
# subword tokenizers (about 5 letters or 3 digits a token, one per CJK char or symbol) closely
# enough that a client counting with a real tokenizer is tested against a plausible server count.

_SPACE, _LETTER, _DIGIT, _SINGLE = 0, 1, 2, 3
_WIDTH = np.array([1, 5, 3, 1], dtype=np.int64)  # chars per token by class (spaces cost none)
_CJK = (
    (0x1100, 0x11FF),  # hangul jamo
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3040, 0x30FF),  # kana
    (0x3100, 0x318F),  # bopomofo, hangul compatibility jamo
    (0x31F0, 0x31FF),  # katakana extension
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7AF),  # hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # halfwidth katakana
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)


def _classify(code: int) -> int:
    if any(low <= code <= high for low, high in _CJK):
        return _SINGLE  # ideographs are letters to Unicode, but one token each to tokenizers
    char = chr(code)
    if char.isspace():
        return _SPACE
    category = unicodedata.category(char)
    if category == "Nd":
        return _DIGIT
    # Marks join their letters: Indic vowel signs and decomposed accents do not split words.
    return _LETTER if category[0] in "LM" else _SINGLE


def _classified(codes: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
    """``_classify`` of each of ``codes`` (at least one), in numpy: one point at a time took
    four times as long, a pause a server on the loop of a client with a short read timeout must
    not make inside a request."""
    chars = list(map(chr, codes.tolist()))
    categories = np.array(list(map(unicodedata.category, chars)))
    classes = np.full(codes.size, _SINGLE, dtype=np.uint8)
    classes[np.isin(categories.astype("<U1"), ("L", "M"))] = _LETTER
    classes[categories == "Nd"] = _DIGIT
    classes[np.fromiter(map(str.isspace, chars), dtype=bool, count=codes.size)] = _SPACE
    for low, high in _CJK:
        classes[(codes >= low) & (codes <= high)] = _SINGLE
    return classes


#: The server's class of each BMP code point, as texts bring them (the whole table took 27 ms of
#: a local server's start, before a demo's first request).
_bmp_classes = CodePointTable(_classified)


_classify_astral = lru_cache(maxsize=4096)(_classify)


def _classes(text: str) -> npt.NDArray[np.uint8]:
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    classes = _bmp_classes(np.minimum(codes, 0xFFFF))
    astral = np.flatnonzero(codes > 0xFFFF)
    if astral.size:  # emoji and rare scripts: few enough to classify one by one
        classes[astral] = [_classify_astral(int(code)) for code in codes[astral]]
    return classes


def _runs(classes: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], ...]:
    """(start, length, class) of each run of equal classes."""
    edges = np.flatnonzero(classes[1:] != classes[:-1]) + 1
    starts = np.concatenate(([0], edges)) if classes.size else edges
    lengths = np.diff(np.append(starts, classes.size))
    return starts, lengths, classes[starts].astype(np.int64)


def _run_tokens(lengths: npt.NDArray[np.int64], kinds: npt.NDArray[np.int64]) -> Any:
    return np.where(kinds == _SPACE, 0, -(-lengths // _WIDTH[kinds]))


def text_tokens(texts: list[str]) -> list[int]:
    """Tokens of each text (no special tokens), counted in one pass over the joined texts."""
    sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    firsts = np.concatenate(([0], np.cumsum(sizes[:-1] + 1)))  # "\n" joins: runs never span texts
    starts, lengths, kinds = _runs(_classes("\n".join(texts)))
    owner = np.searchsorted(firsts, starts, side="right") - 1
    counts = np.bincount(owner, weights=_run_tokens(lengths, kinds), minlength=len(texts))
    return [int(count) for count in counts]


def pieces(text: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(start, end) character offsets of each token of ``text``, for truncation."""
    starts, lengths, kinds = _runs(_classes(text))
    words = kinds != _SPACE
    starts, lengths, width = starts[words], lengths[words], _WIDTH[kinds[words]]
    per_run = -(-lengths // width)
    rank = np.arange(per_run.sum()) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    begin = np.repeat(starts, per_run) + rank * np.repeat(width, per_run)
    end = np.minimum(begin + np.repeat(width, per_run), np.repeat(starts + lengths, per_run))
    return begin, end
