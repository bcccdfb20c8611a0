"""Packing: caps on items and tokens, order kept, halving, bisection."""

from __future__ import annotations

import random

from sfembed._packer import Packer, bisect
from sfembed._types import Chunk


def _chunks(tokens: list[int]) -> list[Chunk]:
    return [Chunk(i, i, 0, f"t{i}", n) for i, n in enumerate(tokens)]


def test_requests_respect_both_caps_and_keep_order() -> None:
    packer = Packer(max_items=3, max_tokens=100)
    chunks = _chunks([10, 10, 10, 10, 60, 50, 5, 5, 5, 5])
    requests = [*packer.add(chunks), *packer.flush()]
    assert [c.unit for r in requests for c in r] == list(range(10))
    assert all(len(r) <= 3 and sum(c.tokens for c in r) <= 100 for r in requests)
    assert [len(r) for r in requests] == [3, 2, 3, 2]


def test_oversize_chunk_travels_alone() -> None:
    packer = Packer(max_items=64, max_tokens=50)
    requests = [*packer.add(_chunks([10, 80, 10])), *packer.flush()]
    assert [[c.tokens for c in r] for r in requests] == [[10], [80], [10]]


def test_full_request_is_closed_without_waiting_for_more() -> None:
    packer = Packer(max_items=2, max_tokens=1000)
    assert [len(r) for r in packer.add(_chunks([1, 1]))] == [2]
    assert list(packer.flush()) == []


def test_halve_and_bisect() -> None:
    packer = Packer(max_items=64, max_tokens=1000)
    packer.halve()
    assert packer.max_items == 32
    for _ in range(10):
        packer.halve()
    assert packer.max_items == 1
    left, right = bisect(_chunks([1] * 5))
    assert [c.unit for c in left] == [0, 1]
    assert [c.unit for c in right] == [2, 3, 4]


def test_near_limit_chunks_travel_alone_by_their_exact_count() -> None:
    packer = Packer(max_items=64, max_tokens=10_000, alone_over=500)
    chunks = _chunks([10, 600, 10, 10, 400, 10])
    chunks[4].weight = 510  # the estimate says 400; the exact count says over half the limit
    requests = [*packer.add(chunks), *packer.flush()]
    assert [[c.unit for c in r] for r in requests] == [[0], [1], [2, 3], [4], [5]]


def _greedy(packer: Packer, chunks: list[Chunk], state: list[Chunk]) -> list[list[Chunk]]:
    """The packing rule chunk by chunk, as the reference: ``state`` is the open request."""
    requests: list[list[Chunk]] = []
    for chunk in chunks:
        if packer.alone_over is not None and (chunk.weight or chunk.tokens) > packer.alone_over:
            if state:
                requests.append(state[:])
                state.clear()
            requests.append([chunk])
            continue
        tokens = sum(c.tokens for c in state)
        if state and (len(state) >= packer.max_items or tokens + chunk.tokens > packer.max_tokens):
            requests.append(state[:])
            state.clear()
        state.append(chunk)
    if len(state) >= packer.max_items:
        requests.append(state[:])
        state.clear()
    return requests


def test_packing_a_block_at_once_gives_the_requests_of_the_rule_chunk_by_chunk() -> None:
    rng = random.Random(3)
    for _ in range(300):
        alone = rng.choice([None, 40, 300])
        packer = Packer(
            max_items=rng.choice([1, 2, 5, 64]),
            max_tokens=rng.choice([1, 30, 100]),
            alone_over=alone,
        )
        state: list[Chunk] = []
        unit = 0
        for _ in range(rng.randint(1, 6)):
            tokens = [
                rng.choice([0, 1, 3, 10, 29, 31, 50, 120, 400]) for _ in range(rng.randint(0, 40))
            ]
            chunks = [Chunk(unit + i, unit + i, 0, "t", n) for i, n in enumerate(tokens)]
            for chunk in chunks:
                if rng.random() < 0.1:
                    chunk.weight = rng.choice([5, 350])
            unit += len(chunks)
            expected = _greedy(packer, chunks, state)
            # A bound given by the caller (at least every chunk's tokens and weight) packs
            # the same requests, whether it proves none travels alone or not.
            most = None
            if chunks and rng.random() < 0.5:
                most = max(max(c.tokens, c.weight) for c in chunks) + rng.choice([0, 1, 500])
            assert [[c.unit for c in r] for r in packer.add(chunks, most=most)] == [
                [c.unit for c in r] for r in expected
            ]
            if rng.random() < 0.2:
                packer.halve()
        assert [[c.unit for c in r] for r in packer.flush()] == (
            [[c.unit for c in state]] if state else []
        )


def test_calibrate_makes_the_token_cap_the_windows_share_in_the_servers_tokens() -> None:
    packer = Packer(max_items=64, max_tokens=100, share_tokens=100, most_tokens=150)
    packer.calibrate(2.3)  # the server counts 2.3 tokens per one of ours
    assert packer.max_tokens == 50  # 1.15 times the share, as the server counts it
    requests = [*packer.add(_chunks([10] * 12)), *packer.flush()]
    assert [sum(chunk.tokens for chunk in request) for request in requests] == [50, 50, 20]
    packer.calibrate(1.1)  # within the estimate's error: the cap a dry run counts with
    assert packer.max_tokens == 100
    packer.calibrate(0.5)  # the server counts fewer: requests no larger than the share
    assert packer.max_tokens == 100
    capped = Packer(max_items=64, max_tokens=100, share_tokens=400, most_tokens=100)
    capped.calibrate(2.0)
    assert capped.max_tokens == 100  # no more than the user's cap
    plain = Packer(max_items=64, max_tokens=100)
    plain.calibrate(2.0)  # no share given: the cap stays
    assert plain.max_tokens == 100
