"""Token counts as the server counts them, offline: exact tokenizers, an estimator, an upper bound.

* :class:`ExactCounter` runs the model's own tokenizer (bundled, xz-compressed, under
  ``sfembed/data/tokenizers``; see NOTICE.md there) or a user's ``tokenizer.json``.
* :class:`CharClassEstimator` needs nothing but numpy: it prices runs of character classes and
  over-counts rather than under-counts (at most 5% under on natural text, for every family).
* :func:`upper_bound` is a strict bound from the text's length (characters, or UTF-8 bytes for
  byte-level tokenizers): a text whose bound fits a limit needs no counting at all.
* :class:`Calibration` turns the server's ``usage`` into the factor by which local counts are
  scaled before the rate limiter is charged.

Every count includes ``ModelSpec.special_tokens``, as the server's ``usage`` does.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import lzma
import math
import unicodedata
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from ._exceptions import ConfigError, InputError
from ._models import ModelSpec
from ._types import IntArray, Span

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "Calibration",
    "CharClassEstimator",
    "ExactCounter",
    "TokenCounter",
    "count_async",
    "counter_for",
    "upper_bound",
]

#: Bundled tokenizer families -> the packed file they load (the VL model shares Qwen3's vocab).
FAMILIES: Mapping[str, str] = {
    "qwen3": "qwen3",
    "qwen3-vl": "qwen3",
    "bert-en": "bert-en",
    "bert-zh": "bert-zh",
    "xlmr": "xlmr",
}
PACKING_KEY = "sfembed_packing"  # marks a tokenizer.json packed by benchmarks/vendor_tokenizers.py
_DATA = "data/tokenizers"
# count_async cuts its work into jobs of at most this many characters (~20-100 ms of tokenizer
# work) or texts, so that a block of records keeps every executor thread busy.
_BATCH_CHARS = 1 << 18
_BATCH_TEXTS = 256

#: Token costs of character runs, in float64 (sums of many small costs).
CostArray = npt.NDArray[np.float64]


class TokenCounter(Protocol):
    """Counts tokens as the server does. ``exact`` is false for estimates."""

    exact: bool

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, special tokens included."""
        ...

    def spans(self, text: str) -> list[Span]:
        """(start, end) character offsets of each token of ``text``, special tokens excluded;
        starts and ends never decrease, so a cut between two tokens is a cut in the text."""
        ...


# --- exact counting ------------------------------------------------------------------------------


class ExactCounter:
    """Counts with a ``tokenizers.Tokenizer``; batches run in Rust without the GIL."""

    exact = True

    def __init__(self, tokenizer: Tokenizer, special_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens
        # encode_batch_fast (tokenizers >= 0.20) skips offset tracking, which counting never needs.
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, ``special_tokens`` included."""
        encodings = self._encode_batch(list(texts), add_special_tokens=False)
        return [len(encoding) + self.special_tokens for encoding in encodings]

    def spans(self, text: str) -> list[Span]:
        """Character offsets of each token of ``text`` (no special tokens)."""
        offsets = np.array(self.tokenizer.encode(text, add_special_tokens=False).offsets)
        if not offsets.size:
            return []
        # Tokens of one character (byte-level pieces of an emoji, NFKC expansions) share its
        # offsets; running maxima keep starts and ends in order without moving any token.
        starts = np.maximum.accumulate(offsets[:, 0])
        ends = np.maximum.accumulate(np.maximum(offsets[:, 1], starts))
        return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _import_tokenizers() -> ModuleType | None:
    """The ``tokenizers`` package, or None when it cannot be imported (then we estimate)."""
    try:
        return importlib.import_module("tokenizers")
    except ImportError:
        return None


def counter_for(spec: ModelSpec) -> TokenCounter:
    """The best counter for ``spec``: exact from its bundled family or its ``tokenizer.json``
    path, else (no ``tokenizers`` package, or ``spec.tokenizer`` is None) the estimator.

    Special tokens always come from ``spec.special_tokens``; a user file's post-processor is
    not applied. Raises ConfigError when ``spec.tokenizer`` is neither a known family nor a
    readable file.
    """
    name = spec.tokenizer
    path = None if name is None or name in FAMILIES else _tokenizer_path(name)
    if name is not None and name not in FAMILIES and path is None:
        raise ConfigError(
            f"model {spec.name!r}: tokenizer {name!r} is neither one of {sorted(FAMILIES)} "
            "nor a path to a tokenizer.json"
        )
    if name is None or _import_tokenizers() is None:
        return CharClassEstimator(spec.special_tokens, family=name)
    tokenizer = file_tokenizer(str(path)) if path else bundled_tokenizer(FAMILIES[name])
    return ExactCounter(tokenizer, spec.special_tokens)


def _tokenizer_path(name: str) -> Path | None:
    """``name`` as a tokenizer.json file (a folder holding one also does), or None."""
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    return path.resolve() if path.is_file() else None


@functools.cache
def bundled_tokenizer(packed_name: str) -> Tokenizer:
    """The bundled tokenizer stored as ``packed_name`` (a value of :data:`FAMILIES`), loaded and
    decompressed once per process (0.1-1 s)."""
    folder = resources.files("sfembed").joinpath(_DATA)
    if packed_name.startswith("bert-"):
        vocab = lzma.decompress(folder.joinpath(f"{packed_name}.vocab.txt.xz").read_bytes())
        return _wordpiece(vocab.decode("utf-8"))
    packed = orjson.loads(lzma.decompress(folder.joinpath(f"{packed_name}.json.xz").read_bytes()))
    blobs = {
        name: lzma.decompress(folder.joinpath(name).read_bytes())
        for name in _blob_names(packed.get(PACKING_KEY, {}))
    }
    return tokenizer_from_json(unpack_tokenizer_json(packed, blobs))


@functools.lru_cache(maxsize=8)
def file_tokenizer(path: str) -> Tokenizer:
    """A user's ``tokenizer.json`` at ``path``, loaded once per process."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    _no_limits(tokenizer)
    return tokenizer


def _blob_names(packing: Mapping[str, Any]) -> list[str]:
    return [packing["scores"]] if "scores" in packing else []


def unpack_tokenizer_json(packed: dict[str, Any], blobs: Mapping[str, bytes]) -> dict[str, Any]:
    """The original tokenizer.json object from a packed one (see vendor_tokenizers.py); ``blobs``
    maps side files to their decompressed bytes. An unpacked object is returned as it is."""
    packing = packed.pop(PACKING_KEY, None)
    if packing is None:
        return packed
    model = packed["model"]
    if packing["vocab"] == "alphabet+merges":
        # A byte-level BPE vocabulary: the byte alphabet, then each merge's result in merge order.
        vocab = {symbol: index for index, symbol in enumerate(packing["alphabet"])}
        base = len(vocab)
        for rank, merge in enumerate(model["merges"]):
            vocab[merge.replace(" ", "", 1)] = base + rank
        model["vocab"] = vocab
    elif packing["vocab"] == "pieces+scores":
        # Scores travel as deltas of their float64 bit patterns; the running sum restores them.
        deltas = np.frombuffer(blobs[packing["scores"]], dtype="<i8")
        scores = np.cumsum(deltas, dtype=np.int64).view("<f8").tolist()
        model["vocab"] = [
            [piece, score] for piece, score in zip(model["vocab"], scores, strict=True)
        ]
    else:
        raise ConfigError(f"unknown tokenizer packing {packing['vocab']!r}")
    return packed


def tokenizer_from_json(obj: dict[str, Any]) -> Tokenizer:
    """A Tokenizer from a tokenizer.json object, with truncation and padding off."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(orjson.dumps(obj).decode())
    _no_limits(tokenizer)
    return tokenizer


def _no_limits(tokenizer: Tokenizer) -> None:
    # Files from model hubs often truncate at 512 tokens: a count must see the whole text.
    tokenizer.no_truncation()
    tokenizer.no_padding()


def _wordpiece(vocab_txt: str) -> Tokenizer:
    """The BERT uncased WordPiece tokenizer over a vocab.txt (one token a line, id = line)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    lines = vocab_txt.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        vocab.setdefault(token.rstrip("\r"), index)
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


# --- the estimator -------------------------------------------------------------------------------

# Character classes of the estimator; _SEP marks the joints between texts counted together.
_CLASSES = (
    "sep",
    "space",
    "letter",
    "digit",
    "punct",
    "cjk",
    "kana",
    "hangul",
    "european",
    "other",
    "symbol",
    "astral",
    "control",
)
(
    _SEP,
    _SPACE,
    _LETTER,
    _DIGIT,
    _PUNCT,
    _CJK,
    _KANA,
    _HANGUL,
    _EUROPEAN,
    _OTHER,
    _SYMBOL,
    _ASTRAL,
    _CONTROL,
) = range(len(_CLASSES))

_APART = np.array([_DIGIT, _CJK, _KANA, _HANGUL, _SYMBOL, _ASTRAL])  # classes a space won't join


@dataclass(frozen=True, slots=True)
class _Prices:
    """What text costs, linearly: ``base`` per run plus ``rate`` per character of each class;
    ``upper`` per ASCII capital (cased words split into more pieces); ``gap`` per whitespace
    run before a digit, CJK, kana, hangul or symbol run (Qwen and XLM-R keep such a space as a
    token of its own; before a word it joins the word's token, so a lone " " is otherwise free);
    ``hump`` per capital after a small letter (camelCase and base64 split there); ``joint``
    per letter run touching a digit run (hashes, ids and base64 split at each one);
    ``text`` once per non-empty text. A text costs the ceiling of its sum."""

    base: tuple[float, ...]
    rate: tuple[float, ...]
    upper: float = 0.0
    hump: float = 0.0
    gap: float = 0.0
    joint: float = 0.0
    text: float = 0.0

    @classmethod
    def of(cls, **prices: Any) -> _Prices:
        """From ``class_name=(base, rate)`` pairs and the scalars; unnamed classes cost nothing."""
        pairs = [prices.pop(name, (0.0, 0.0)) for name in _CLASSES]
        return cls(tuple(b for b, _ in pairs), tuple(r for _, r in pairs), **prices)

    def cost(self, runs: _Runs) -> CostArray:
        """Fractional tokens of each run."""
        kinds = runs.kinds
        price = np.take(self.base, kinds) + runs.lengths * np.take(self.rate, kinds)
        price += runs.uppers * self.upper + runs.humps * self.hump
        price = np.where(runs.lone_space | (kinds == _SEP), 0.0, price)
        price += runs.gap * self.gap + runs.joint * self.joint
        return price.astype(np.float64)


# Fitted against each family's exact tokenizer on English, Chinese (common and rare words),
# Python code, CSV, numbers, ids and logs, mixed and emoji text: the prices that minimise the
# mean over-count while every document of the fit is counted at least 1.06 times its exact
# count (a linear programme). Refitted on any two thirds of that corpus, they counted the
# worst document of the other third at 0.949 of its exact count (XLM-R, rare-word Chinese).
_PRICES: dict[str, _Prices] = {
    "qwen3": _Prices.of(
        space=(0.0, 0.219),
        letter=(0.748, 0.101),
        digit=(0.671, 0.909),
        punct=(0.206, 0.716),
        cjk=(0.262, 0.543),
        kana=(0.0, 0.502),
        hangul=(0.0, 0.502),
        european=(0.925, 0.827),
        other=(1.504, 0.897),
        symbol=(1.032, 0.941),
        astral=(0.0, 1.003),
        control=(0.255, 0.255),
        upper=0.255,
        hump=1.504,
        gap=1.504,
        joint=0.029,
        text=1.003,
    ),
    "xlmr": _Prices.of(
        space=(0.0, 0.046),
        letter=(0.375, 0.227),
        digit=(0.0, 0.292),
        punct=(0.0, 1.304),
        cjk=(0.0, 0.904),
        kana=(0.0, 0.502),
        hangul=(0.0, 0.502),
        european=(1.115, 0.151),
        other=(0.494, 0.151),
        symbol=(0.717, 0.502),
        astral=(0.17, 1.004),
        upper=0.159,
        hump=1.475,
        gap=1.402,
        joint=0.722,
        text=1.004,
    ),
    "bert-en": _Prices.of(
        space=(0.0, 0.109),
        letter=(0.0, 0.334),
        digit=(0.329, 0.48),
        punct=(0.0, 1.052),
        cjk=(0.098, 1.064),
        kana=(0.372, 0.822),
        hangul=(0.0, 2.306),
        european=(1.207, 0.806),
        other=(0.0, 0.985),
        symbol=(0.0, 0.973),
        astral=(1.004, 0.0),
        gap=0.791,
        joint=1.506,
        text=1.004,
    ),
    "bert-zh": _Prices.of(
        space=(0.0, 0.022),
        letter=(0.131, 0.447),
        digit=(0.47, 0.37),
        punct=(0.0, 1.101),
        cjk=(0.007, 1.063),
        kana=(0.0, 0.838),
        hangul=(0.0, 2.324),
        european=(1.504, 0.833),
        other=(0.0, 0.333),
        symbol=(0.0, 1.049),
        astral=(1.003, 0.0),
        gap=0.696,
        joint=1.027,
        text=1.003,
    ),
}

_ANY_FAMILY = tuple(_PRICES.values())  # an unknown tokenizer: the largest of their estimates
_PRICES["qwen3-vl"] = _PRICES["qwen3"]


@functools.lru_cache(maxsize=1)
def _bmp_classes() -> npt.NDArray[np.uint8]:
    """The class of every BMP code point, built once (~50 ms) from unicodedata."""
    return np.array([_classify(code) for code in range(0x10000)], dtype=np.uint8)


def _classify(code: int) -> int:
    char = chr(code)
    if char.isspace():
        return _SPACE
    if 0x30 <= code <= 0x39:
        return _DIGIT
    if code < 0x80:
        return _LETTER if char.isalpha() else _CONTROL if code < 0x20 or code == 0x7F else _PUNCT
    category = unicodedata.category(char)
    if 0x3400 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF:
        return _CJK if category == "Lo" else _SYMBOL
    if 0x3040 <= code <= 0x30FF:
        return _KANA
    if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return _HANGUL
    if category[0] == "C" or 0xFE00 <= code <= 0xFE0F:  # with emoji variation selectors
        return _CONTROL
    if category[0] in "LM" or category == "Nd":
        # Accented Latin, Greek, Cyrillic, Vietnamese: far fewer tokens per letter than the rest.
        return _EUROPEAN if code <= 0x052F or 0x1E00 <= code <= 0x1FFF else _OTHER
    return _SYMBOL


@dataclass(frozen=True, slots=True)
class _Runs:
    """Maximal runs of one class: first character, length, class, ASCII capitals, and whether
    the run is a lone " "."""

    starts: IntArray
    lengths: IntArray
    kinds: IntArray
    uppers: IntArray
    humps: IntArray
    lone_space: npt.NDArray[np.bool_]
    gap: npt.NDArray[np.bool_]
    joint: npt.NDArray[np.bool_]


def _runs(text: str, separators: IntArray | None = None) -> _Runs:
    """The runs of ``text``; characters at ``separators`` are joints, in runs of their own."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    classes = _bmp_classes()[np.minimum(codes, 0xFFFF)]
    classes[codes > 0xFFFF] = _ASTRAL  # emoji, rare CJK, historic scripts
    if separators is not None:
        classes[separators] = _SEP
    edges = np.flatnonzero(classes[1:] != classes[:-1]) + 1
    starts = np.concatenate(([0], edges)).astype(np.int64) if codes.size else edges
    lengths = np.diff(np.append(starts, codes.size)).astype(np.int64)
    kinds = classes[starts].astype(np.int64)
    capital = (codes >= 0x41) & (codes <= 0x5A)
    hump = np.append(False, capital[1:] & (codes[:-1] >= 0x61) & (codes[:-1] <= 0x7A))
    uppers, humps = (_per_run(flags, starts, lengths) for flags in (capital, hump))
    lone_space = (lengths == 1) & (codes[starts] == 0x20)
    following = np.append(kinds[1:], _SEP)
    gap = (kinds == _SPACE) & np.isin(following, _APART)
    joint = ((kinds == _LETTER) & (following == _DIGIT)) | (
        (kinds == _DIGIT) & (following == _LETTER)
    )
    return _Runs(starts, lengths, kinds, uppers, humps, lone_space, gap, joint)


def _per_run(flags: npt.NDArray[np.bool_], starts: IntArray, lengths: IntArray) -> IntArray:
    """How many ``flags`` are set within each run."""
    total: IntArray = np.concatenate(([0], np.cumsum(flags, dtype=np.int64)))
    counts: IntArray = total[starts + lengths] - total[starts]
    return counts


class CharClassEstimator:
    """A tokenizer-free estimate that over-counts rather than under-counts.

    Runs of letters, digits, punctuation, CJK and other classes are priced per family (see
    ``_PRICES``, fitted against the exact tokenizers); for an unknown tokenizer a text costs
    the most any family's prices give. Measured on English, Chinese, code, CSV, mixed and
    emoji text, it is at most 5% under the exact count of its family and below 2x over.
    """

    exact = False

    def __init__(self, special_tokens: int = 0, *, family: str | None = None) -> None:
        self.special_tokens = special_tokens
        self.prices = (_PRICES[family],) if family in _PRICES else _ANY_FAMILY

    def count(self, texts: Sequence[str]) -> list[int]:
        """Estimated tokens of each text, ``special_tokens`` included; one numpy pass."""
        if not texts:
            return []
        sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        firsts = np.concatenate(([0], np.cumsum(sizes[:-1] + 1)))  # texts joined by one char
        runs = _runs("\0".join(texts), separators=firsts[1:] - 1)
        owner = np.searchsorted(firsts, runs.starts, side="right") - 1
        sums = [
            np.bincount(owner, weights=prices.cost(runs), minlength=len(texts))
            + prices.text * (sizes > 0)  # an empty text is empty for every tokenizer
            for prices in self.prices
        ]
        return [int(count) + self.special_tokens for count in _ceil(np.max(sums, axis=0))]

    def spans(self, text: str) -> list[Span]:
        """Approximate token offsets, as many as :meth:`count` gives (without specials). Each
        run gets the whole tokens its cost completes, cut into equal pieces; the spans tile the
        text from the first priced character, so a cut between any two loses no character."""
        runs = _runs(text)
        if not runs.starts.size:
            return []
        totals = [prices.text + np.cumsum(prices.cost(runs)) for prices in self.prices]
        per_run = np.diff(_ceil(max(totals, key=lambda total: float(total[-1]))), prepend=0)
        keep = per_run > 0
        starts, lengths, per_run = runs.starts[keep], runs.lengths[keep], per_run[keep]
        rank = np.arange(per_run.sum()) - np.repeat(np.cumsum(per_run) - per_run, per_run)
        size, pieces = np.repeat(lengths, per_run), np.repeat(per_run, per_run)
        begin = np.repeat(starts, per_run) + rank * size // pieces
        end = np.append(begin[1:], starts[-1] + lengths[-1])
        return list(zip(begin.tolist(), end.tolist(), strict=True))


def _ceil(values: npt.ArrayLike) -> IntArray:
    # The tolerance keeps float sums such as 0.1 * 30 from rounding up to a phantom token.
    rounded: IntArray = np.ceil(np.asarray(values, dtype=np.float64) - 1e-9).astype(np.int64)
    return rounded


# --- the strict bound ----------------------------------------------------------------------------


def upper_bound(text: str, spec: ModelSpec) -> int:
    """A strict upper bound on the server's count of ``text`` (tokens), in O(len(text)).

    Why it is strict, per tokenizer family:

    * byte-level BPE (``qwen3``): the tokens partition the UTF-8 bytes of the NFC-normalised
      text and each holds at least one byte. NFC can lengthen text (composition exclusions
      such as U+0958 become two code points), so the bytes are counted after NFC.
    * WordPiece (``bert-*``): each token is at least one character of a word, or one [UNK] for
      a whole word; whitespace gives none. The normaliser (clean-up, NFD with accents removed,
      lower case) never yields more characters than the lower-cased NFD form has (Hangul
      syllables become 2-3 jamo, "İ" becomes two characters), so that length bounds it.
    * Unigram with a Metaspace prefix (``xlmr``): no byte fallback, so each token holds at least
      one code point of the text fully decomposed (a composed letter such as "ϊ" may come out
      as two tokens; a space becomes the "▁" of the next word), plus possibly one lone prefix
      "▁". NFKD can expand one character a lot (U+FDFA becomes 18), so the bound is the larger
      of the text's and its NFKD form's length, plus one.
    * unknown tokenizers (a user's file may be byte-level): the larger of the text's and its
      NFC and NFKC forms' UTF-8 length, plus one.

    Counting characters, not bytes, where the family allows it keeps the bound near the text's
    length for Chinese (3 UTF-8 bytes a character), so that most texts are proved short.
    """
    family = spec.tokenizer
    if text.isascii():  # NFC, NFD and NFKC leave ASCII as it is; lower case keeps its length
        prefix = 0 if family in ("qwen3", "qwen3-vl", "bert-en", "bert-zh") else 1
        return len(text) + prefix + spec.special_tokens
    if family in ("bert-en", "bert-zh"):
        return len(unicodedata.normalize("NFD", text).lower()) + spec.special_tokens
    if family == "xlmr":
        return max(len(text), len(unicodedata.normalize("NFKD", text))) + 1 + spec.special_tokens
    if family in ("qwen3", "qwen3-vl"):
        return _utf8_len(unicodedata.normalize("NFC", text)) + spec.special_tokens
    nfc, nfkc = (_utf8_len(unicodedata.normalize(form, text)) for form in ("NFC", "NFKC"))
    return max(_utf8_len(text), nfc, nfkc) + 1 + spec.special_tokens


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# --- off the event loop --------------------------------------------------------------------------


async def count_async(
    counter: TokenCounter, texts: Sequence[str], executor: Executor | None = None
) -> list[int]:
    """``counter.count(texts)`` in ``executor`` (default: the loop's), in batches of about
    ``_BATCH_CHARS`` characters that run concurrently, so the event loop never blocks on it."""
    if not texts:
        return []
    loop = asyncio.get_running_loop()
    jobs = [
        loop.run_in_executor(executor, counter.count, texts[start:end])
        for start, end in _batches(texts)
    ]
    return [count for batch in await asyncio.gather(*jobs) for count in batch]


def _batches(texts: Sequence[str]) -> list[Span]:
    """(start, end) index ranges of ``texts`` of at most _BATCH_TEXTS texts / ~_BATCH_CHARS."""
    ranges: list[Span] = []
    start, chars = 0, 0
    for index, text in enumerate(texts):
        chars += len(text)
        if chars >= _BATCH_CHARS or index + 1 - start >= _BATCH_TEXTS:
            ranges.append((start, index + 1))
            start, chars = index + 1, 0
    if start < len(texts):
        ranges.append((start, len(texts)))
    return ranges


# --- reconciliation with the server -------------------------------------------------------------


class Calibration:
    """The factor from local counts to the server's, learnt from each response's ``usage``.

    ``ratio`` (server tokens per local token) starts at ``prior``: 1.0 for an exact counter,
    and for the estimator a margin for its worst measured under-count. Observations are pooled
    until they hold at least ``min_sample`` local tokens, so that one short text cannot swing
    the factor; each pooled server/local ratio is kept for the last ``window`` samples. The
    ratio is then the largest of them: it rises with the first sample in which the server
    counts more than we charge, and falls only as far as the most demanding recent sample
    allows. Until ``min_samples`` samples are in, it never falls below the prior, whose caution
    is not yet disproved.
    """

    ESTIMATOR_PRIOR = 1.06  # covers the estimator's worst under-count (5%) with a little room

    def __init__(
        self,
        *,
        exact: bool,
        prior: float | None = None,
        window: int = 32,
        min_sample: int = 256,
        min_samples: int = 4,
    ) -> None:
        self.prior = prior if prior is not None else 1.0 if exact else self.ESTIMATOR_PRIOR
        if self.prior <= 0 or window <= 0 or min_sample <= 0 or min_samples <= 0:
            raise ConfigError("calibration: prior, window and sample sizes must be positive")
        self.min_samples = min_samples
        self._samples: deque[float] = deque(maxlen=window)
        self._min_sample = min_sample
        self._pool_local = self._pool_server = 0
        self.ratio = self.prior

    def charge(self, local_tokens: int) -> int:
        """Tokens to charge the limiter for a request we count at ``local_tokens``."""
        return math.ceil(local_tokens * self.ratio - 1e-9) if local_tokens > 0 else 0

    def observe(self, local_tokens: int, server_tokens: int) -> None:
        """Learn from one response: we counted ``local_tokens``, the server ``server_tokens``."""
        if local_tokens < 0 or server_tokens < 0:
            raise InputError(f"token counts cannot be negative ({local_tokens}, {server_tokens})")
        if local_tokens == 0:
            return  # images only: nothing to compare
        self._pool_local += local_tokens
        self._pool_server += server_tokens
        if self._pool_local < self._min_sample:
            return
        self._samples.append(self._pool_server / self._pool_local)
        self._pool_local = self._pool_server = 0
        evidence = max(self._samples)
        warm = len(self._samples) >= self.min_samples
        self.ratio = evidence if warm else max(evidence, self.prior)

    @property
    def samples(self) -> int:
        """Pooled observations currently in the window."""
        return len(self._samples)
