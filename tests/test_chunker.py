"""Splitting at token boundaries near natural ends, overlap, and pooling."""

from __future__ import annotations

import re
from itertools import pairwise

import numpy as np

from sfembed._chunker import char_range, pool, split_spans


def _offsets(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def test_short_record_is_one_chunk() -> None:
    text = "a b c"
    assert split_spans(text, _offsets(text), 10) == [(0, 3)]


def test_chunks_cover_every_token_within_the_limit() -> None:
    text = " ".join(f"w{i}" for i in range(1000))
    spans = split_spans(text, _offsets(text), 64)
    assert spans[0][0] == 0
    assert spans[-1][1] == 1000
    assert all(b - a <= 64 for a, b in spans)
    assert all(prev[1] == nxt[0] for prev, nxt in pairwise(spans))


def test_cut_prefers_a_paragraph_then_a_sentence_end() -> None:
    words = [f"w{i}" for i in range(100)]
    words[55] += "."
    text = " ".join(words[:58]) + "\n\n" + " ".join(words[58:])
    offsets = _offsets(text)
    assert split_spans(text, offsets, 60)[0] == (0, 58)  # the paragraph at 58 wins
    flat = text.replace("\n\n", " ")
    assert split_spans(flat, _offsets(flat), 60)[0] == (0, 56)  # then the sentence end at 55


def test_overlap_repeats_tokens_and_still_progresses() -> None:
    text = " ".join(f"w{i}" for i in range(300))
    spans = split_spans(text, _offsets(text), 50, overlap=10)
    assert all(nxt[0] == prev[1] - 10 for prev, nxt in pairwise(spans))
    assert spans[-1][1] == 300


def test_char_range_and_cjk_text() -> None:
    text = "你好世界。" * 40
    offsets = [(i, i + 1) for i in range(len(text))]
    spans = split_spans(text, offsets, 32)
    pieces = [text[slice(*char_range(offsets, s))] for s in spans]
    assert "".join(pieces) == text
    assert all(p.endswith("。") for p in pieces[:-1])  # cut after a CJK full stop


def test_pool_is_token_weighted_and_normalised() -> None:
    vectors = np.array([[1, 0], [0, 1]], dtype=np.float32)
    pooled = pool(vectors, [3, 1])
    expected = np.array([3, 1], dtype=np.float64) / np.sqrt(10)
    np.testing.assert_allclose(pooled, expected, rtol=1e-6)
    assert pooled.dtype == np.float32


def test_drop_blank_keeps_pieces_with_text_only() -> None:
    from sfembed._chunker import drop_blank

    text = "ab" + " " * 6 + "cd"
    offsets = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    spans = [(0, 1), (1, 3), (3, 5)]
    assert drop_blank(text, offsets, spans) == [(0, 1), (3, 5)]
    assert drop_blank("    ", [(0, 2), (2, 4)], [(0, 1), (1, 2)]) == [(0, 1)]
