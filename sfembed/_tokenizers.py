"""Exact token counts: the model's own tokenizer, bundled or a user's, loaded lean; off the loop.

* :class:`ExactCounter` runs the model's own tokenizer (bundled, xz-compressed, under
  ``sfembed/data/tokenizers``; see NOTICE.md there) or a user's ``tokenizer.json``.
* :func:`counter_for` picks it for a model (the estimator of ``_estimator`` when the
  ``tokenizers`` package is missing or the model names no tokenizer).
* :func:`count_async` counts in batches on executor threads, so the event loop never blocks.

Every count includes ``ModelSpec.special_tokens``, as the server's ``usage`` does. Loading XLM-R's
tokenizer costs about 300 MB: the engine loads one only when a text can really be over the
model's limit (``_bounds``, ``_intake``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import lzma
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson

from ._estimator import CharClassEstimator
from ._exceptions import ConfigError
from ._models import ModelSpec
from ._types import Span

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "FAMILIES",
    "PACKING_KEY",
    "ExactCounter",
    "TokenCounter",
    "bundled_tokenizer",
    "count_async",
    "counter_for",
    "file_tokenizer",
    "tokenizer_from_json",
    "unpack_tokenizer_json",
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

#: A text longer than this many characters is tokenized in segments: one tokenizer call holds
#: some 200 bytes of working memory per character, so a 10 MB text took 2.2 GB whole.
_SEGMENT_CHARS = 1 << 16


def segments(text: str) -> list[Span]:
    """``text`` cut into (start, end) ranges of at most ``_SEGMENT_CHARS`` characters, each cut
    placed before a run of white space where one lies in the second half of the range.

    The tokenizers split words at white space, and a word's leading space stays with it, so a
    cut there gives the tokens of the whole text; a cut inside a run of letters (a long text
    without spaces) may differ by a token near the cut, which is the same in every run."""
    bounds: list[Span] = []
    start, size = 0, len(text)
    while size - start > _SEGMENT_CHARS:
        low, high = start + _SEGMENT_CHARS // 2, start + _SEGMENT_CHARS
        cut = max(text.rfind(" ", low, high), text.rfind("\n", low, high))
        while cut > low and text[cut - 1].isspace():
            cut -= 1
        cut = cut if cut > low else high
        bounds.append((start, cut))
        start = cut
    bounds.append((start, size))
    return bounds


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
        if all(len(text) <= _SEGMENT_CHARS for text in texts):
            encodings = self._encode_batch(list(texts), add_special_tokens=False)
            return [len(encoding) + self.special_tokens for encoding in encodings]
        return [self._count_long(text) + self.special_tokens for text in texts]

    def _count_long(self, text: str) -> int:
        pieces = [text[start:end] for start, end in segments(text)]
        return sum(len(e) for e in self._encode_batch(pieces, add_special_tokens=False))

    def spans(self, text: str) -> list[Span]:
        """Character offsets of each token of ``text`` (no special tokens)."""
        parts = [
            np.array(
                self.tokenizer.encode(text[start:end], add_special_tokens=False).offsets
            ).reshape(-1, 2)
            + start
            for start, end in segments(text)
        ]
        offsets = np.concatenate(parts) if len(parts) > 1 else parts[0]
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
    decompressed once per process (0.1-1.5 s)."""
    from importlib import resources  # 2-3 ms to import: only a job that loads a tokenizer pays

    folder = resources.files("sfembed").joinpath(_DATA)
    if packed_name.startswith("bert-"):
        vocab = lzma.decompress(folder.joinpath(f"{packed_name}.vocab.txt.xz").read_bytes())
        return _wordpiece(vocab.decode("utf-8"))
    packed = orjson.loads(lzma.decompress(folder.joinpath(f"{packed_name}.json.xz").read_bytes()))
    blobs = {
        name: lzma.decompress(folder.joinpath(name).read_bytes())
        for name in _blob_names(packed.get(PACKING_KEY, {}))
    }
    if packed.get(PACKING_KEY, {}).get("vocab") == "pieces+scores":
        return _unigram(packed, blobs)
    return tokenizer_from_json(unpack_tokenizer_json(packed, blobs))


def _unigram(packed: dict[str, Any], blobs: Mapping[str, bytes]) -> Tokenizer:
    """A packed Unigram tokenizer (XLM-R) built lean: the model straight from its pieces and
    scores, and the rest from a small tokenizer.json without them. Rebuilding the whole JSON
    held it three times over (the object, its text, Rust's parse): 4 s and 440 MB at peak,
    against 1.3 s and 360 MB (the model itself holds some 270 MB)."""
    from tokenizers import AddedToken
    from tokenizers.models import Unigram

    packing = packed.pop(PACKING_KEY)
    model = packed["model"]
    deltas = np.frombuffer(blobs[packing["scores"]], dtype="<i8")
    scores = np.cumsum(deltas, dtype=np.int64).view("<f8").tolist()
    vocab = list(zip(model.pop("vocab"), scores, strict=True))
    del scores
    unigram = Unigram(vocab, model["unk_id"], model.get("byte_fallback", False))
    del vocab
    added = packed.pop("added_tokens", [])
    model["vocab"], model["unk_id"] = [["<unk>", 0.0]], 0  # a stand-in, replaced below
    tokenizer = tokenizer_from_json(packed)
    tokenizer.model = unigram
    tokenizer.add_special_tokens(
        [
            AddedToken(
                token["content"],
                single_word=token["single_word"],
                lstrip=token["lstrip"],
                rstrip=token["rstrip"],
                normalized=token["normalized"],
                special=token.get("special", True),
            )
            for token in added
        ]
    )
    return tokenizer


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
