"""Synthetic corpora: mixed English and Chinese documents of varied lengths, some over-long.

Deterministic for a seed, so tests, benchmarks and the demo see the same documents everywhere,
with no download. Public through :mod:`sfembed.testing`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["synthetic_corpus"]

_WORD_LIST = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "data model vector search index query token window request limit batch order record nightly "
    "embedding corpus document server client retry quota minute second latency stream output "
    "river mountain winter library harbour engine garden market signal theory history village"
)
_WORDS = _WORD_LIST.split()
_HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
    "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体"
    "制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内"
)


def synthetic_corpus(
    count: int, *, seed: int = 0, long_every: int = 50, long_chars: int = 40_000
) -> Iterator[str]:
    """Yield ``count`` documents: about 70% English, 30% Chinese, lengths from a few words to a
    few thousand characters, and every ``long_every``-th one ``long_chars`` characters long
    (over the 8,192-token limit of bge-m3 when English), so that splitting is exercised."""
    rng = random.Random(seed)
    for number in range(count):
        long = long_every > 0 and number % long_every == long_every - 1
        size = long_chars if long else int(min(6000, rng.lognormvariate(5.0, 1.1))) + 8
        yield _chinese(rng, size) if rng.random() < 0.3 else _english(rng, size)


def _english(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    length = 0
    while length < chars:
        sentence = " ".join(rng.choices(_WORDS, k=rng.randint(5, 18))).capitalize() + "."
        if rng.random() < 0.1:
            sentence += "\n\n"
        parts.append(sentence)
        length += len(sentence) + 1
    return " ".join(parts)[:chars].strip() or "empty"


def _chinese(rng: random.Random, chars: int) -> str:
    chars = max(4, chars // 3)  # a hanzi carries about three letters' worth of tokens
    parts: list[str] = []
    length = 0
    while length < chars:
        sentence = "".join(rng.choices(_HANZI, k=rng.randint(6, 30))) + "。"
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)[:chars]
