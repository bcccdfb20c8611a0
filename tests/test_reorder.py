"""The reorder ring: rows leave in order whatever order requests finish in; memory is bounded."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sfembed._reorder import ReorderBuffer
from sfembed._types import Chunk


def _rows(units: list[int], dims: int = 3) -> np.ndarray:
    return np.array([[u, u, u] for u in units], dtype=np.float32)[:, :dims]


def _chunks(units: list[int], tokens: int = 1) -> list[Chunk]:
    return [Chunk(u, u, 0, "x", tokens) for u in units]


async def test_rows_leave_in_order_once_contiguous() -> None:
    ring = ReorderBuffer(dims=3, capacity=8)
    assert await ring.reserve(6) == 0
    ring.put(_chunks([3, 4, 5]), _rows([3, 4, 5]))
    assert ring.take() == (None, [])
    ring.put(_chunks([1, 0]), _rows([1, 0]))
    batch, failures = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == [0, 1]
    assert batch.embeddings[:, 0].tolist() == [0, 1]
    ring.put(_chunks([2]), _rows([2]))
    batch, _ = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == [2, 3, 4, 5]
    assert failures == []


async def test_failed_unit_keeps_its_place_as_nan() -> None:
    ring = ReorderBuffer(dims=3, capacity=4)
    await ring.reserve(3)
    ring.put(_chunks([0, 2]), _rows([0, 2]))
    ring.fail(Chunk(1, 1, 0, "x", 1), "refused")
    batch, failures = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == [0, 1, 2]
    assert np.isnan(batch.embeddings[1]).all()
    assert [(f.position, f.reason) for f in failures] == [(1, "refused")]


async def test_parts_are_pooled_and_late_parts_of_failed_units_dropped() -> None:
    ring = ReorderBuffer(dims=2, capacity=4)
    unit = await ring.reserve(1)
    ring.expect_parts(unit, 1)
    ring.put([Chunk(unit, 0, 0, "a", 3)], np.array([[1, 0]], dtype=np.float32))
    assert ring.take()[0] is None
    ring.put([Chunk(unit, 0, 1, "b", 1)], np.array([[0, 1]], dtype=np.float32))
    batch, _ = ring.take()
    assert batch is not None
    np.testing.assert_allclose(batch.embeddings[0], np.array([3, 1]) / np.sqrt(10), rtol=1e-6)
    failed = await ring.reserve(1)
    ring.expect_parts(failed, 1)
    ring.fail(Chunk(failed, 1, 0, "c", 1), "bad")
    ring.put([Chunk(failed, 1, 1, "d", 1)], np.ones((1, 2), dtype=np.float32))
    batch, _ = ring.take()
    assert batch is not None
    assert np.isnan(batch.embeddings).all()


async def test_reserve_waits_for_room_and_wakes_on_take() -> None:
    ring = ReorderBuffer(dims=1, capacity=2)
    await ring.reserve(2)
    waiter = asyncio.create_task(ring.reserve(1))
    await asyncio.sleep(0)
    assert not waiter.done()
    ring.put(_chunks([0]), np.zeros((1, 1), dtype=np.float32))
    ring.take()
    await ring.notify_room()
    assert await waiter == 2
    with pytest.raises(ValueError, match="exceed"):
        await ring.reserve(3)


async def test_cancelled_reserve_takes_nothing() -> None:
    ring = ReorderBuffer(dims=1, capacity=1)
    await ring.reserve(1)
    waiter = asyncio.create_task(ring.reserve(1))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert ring.created == 1


def test_embed_rows_fill_one_array_and_fall_back_when_rows_outnumber_inputs() -> None:
    from sfembed._engine import _Rows

    def batch(start: int, count: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.float32).repeat(2).reshape(count, 2)

    known = _Rows(5)
    known.add(batch(0, 3))
    known.add(batch(3, 2))
    assert known.result()[:, 0].tolist() == [0, 1, 2, 3, 4]
    chunks = _Rows(3)  # chunks mode: more rows than inputs
    chunks.add(batch(0, 2))
    chunks.add(batch(2, 3))
    assert chunks.result()[:, 0].tolist() == [0, 1, 2, 3, 4]
    unsized = _Rows(None)
    unsized.add(batch(0, 1))
    assert unsized.result()[:, 0].tolist() == [0]
    assert _Rows(None).result().shape == (0, 0)


async def test_more_parts_for_a_failed_unit_leave_nothing_pending() -> None:
    ring = ReorderBuffer(dims=1, capacity=4)
    unit = await ring.reserve(1)
    ring.fail(Chunk(unit, 0, 0, "x", 1), "bad")
    ring.expect_parts(unit, 1)
    ring.take()
    ring.expect_parts(unit, 1)  # after it left the ring, too
    assert ring._pending == {}


async def test_the_ring_holds_what_is_in_flight_not_its_capacity() -> None:
    ring = ReorderBuffer(dims=1024, capacity=4 * 5000 * 64)  # concurrency 5,000: 5 GB up front
    assert ring._rows.nbytes <= 1 << 20
    first = await ring.reserve(100)
    ring.put(_chunks(list(range(first, first + 100))), np.ones((100, 1024), dtype=np.float32))
    batch, _ = ring.take()
    assert batch is not None
    assert len(batch) == 100
    assert ring._rows.nbytes <= 1 << 20


def _describe(ring: ReorderBuffer, first: int, end: int) -> None:
    units = np.arange(first, end, dtype=np.int64)
    ring.describe(units, np.stack([units, units * 0, units, units + 1], axis=1))


async def test_rows_and_chunk_details_survive_the_ring_growing_around_its_end() -> None:
    ring = ReorderBuffer(dims=3, capacity=10_000, with_chunks=True)
    await ring.reserve(200)
    ring.put(_chunks(list(range(150))), _rows(list(range(150))))
    batch, _ = ring.take()
    assert batch is not None
    assert len(batch) == 150
    assert await ring.reserve(100) == 200  # 150 in flight; units from 256 wrap to the start
    _describe(ring, 150, 300)
    ring.put(_chunks(list(range(160, 300))), _rows(list(range(160, 300))))
    assert await ring.reserve(200) == 300  # 350 in flight: more than the first arrays hold
    _describe(ring, 300, 500)
    ring.put(_chunks(list(range(300, 500))), _rows(list(range(300, 500))))
    assert ring.take() == (None, [])  # 150..159 are not answered yet
    ring.put(_chunks(list(range(150, 160))), _rows(list(range(150, 160))))
    batch, _ = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == list(range(150, 500))
    assert batch.embeddings[:, 0].tolist() == list(range(150, 500))
    assert batch.spans is not None
    assert batch.spans[:, 0].tolist() == list(range(150, 500))


async def test_a_failed_unit_is_nan_in_a_slot_an_earlier_row_used() -> None:
    ring = ReorderBuffer(dims=3, capacity=4)
    assert await ring.reserve(4) == 0
    ring.put(_chunks([0, 1, 2, 3]), _rows([10, 11, 12, 13]))
    batch, _ = ring.take()
    assert batch is not None
    await ring.notify_room()
    assert await ring.reserve(4) == 4  # the same slots again
    ring.put(_chunks([4, 6, 7]), _rows([14, 16, 17]))
    ring.fail(Chunk(5, 5, 0, "x", 1), "refused")
    batch, failures = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == [4, 5, 6, 7]
    assert np.isnan(batch.embeddings[1]).all()  # not unit 1's row, left in its slot
    assert batch.embeddings[[0, 2, 3], 0].tolist() == [14, 16, 17]
    assert [failure.position for failure in failures] == [5]


async def test_rows_reserved_ahead_take_no_room_until_answered() -> None:
    ring = ReorderBuffer(dims=1024, capacity=4096)
    await ring.reserve(3000)  # intake runs ahead of the requests sent
    ring.put(_chunks(list(range(64, 128))), _rows(list(range(64, 128)), dims=1).repeat(1024, 1))
    assert ring._rows.nbytes <= 1 << 20  # 3,000 rows reserved, 128 answered: 256 rows held
    ring.put(_chunks([2999]), np.full((1, 1024), 2999, dtype=np.float32))  # far ahead: grows
    assert ring._rows.shape[0] == 4096
    ring.put(_chunks(list(range(64))), _rows(list(range(64)), dims=1).repeat(1024, 1))
    batch, _ = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == list(range(128))  # the rows before the growth kept
    assert batch.embeddings[:, 0].tolist() == list(range(128))
    ring.put(_chunks(list(range(128, 2999))), _rows(list(range(128, 2999)), dims=1).repeat(1024, 1))
    batch, _ = ring.take()
    assert batch is not None
    assert batch.embeddings[:, 0].tolist() == list(range(128, 3000))


async def test_a_unit_failed_far_ahead_of_the_window_keeps_its_place() -> None:
    ring = ReorderBuffer(dims=2, capacity=2048)
    await ring.reserve(1000)
    ring.fail(Chunk(900, 900, 0, "x", 1), "refused")  # beyond the first arrays' 256 rows
    ring.put(_chunks(list(range(900))), _rows(list(range(900)), dims=2))
    ring.put(_chunks(list(range(901, 1000))), _rows(list(range(901, 1000)), dims=2))
    batch, failures = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == list(range(1000))
    assert np.isnan(batch.embeddings[900]).all()
    assert batch.embeddings[:900, 0].tolist() == list(range(900))
    assert batch.embeddings[901:, 0].tolist() == list(range(901, 1000))
    assert [failure.position for failure in failures] == [900]


async def test_a_run_of_units_leaves_as_the_array_put_or_joined_by_one_copy() -> None:
    ring = ReorderBuffer(dims=3, capacity=16)
    await ring.reserve(10)
    whole = _rows([0, 1, 2])
    ring.put(_chunks([0, 1, 2]), whole)
    batch, _ = ring.take()
    assert batch is not None
    assert batch.embeddings is whole  # kept as put: not copied in and out again
    ring.put(_chunks([5, 6]), _rows([5, 6]))  # a run ahead of the oldest unfinished unit
    ring.put(_chunks([4, 3]), _rows([4, 3]))  # out of order: placed in the ring's arrays
    ring.put(_chunks([7, 8, 9]), _rows([7, 8, 9]))
    batch, _ = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == list(range(3, 10))
    assert batch.embeddings[:, 0].tolist() == list(range(3, 10))


async def test_a_unit_of_a_run_kept_whole_settled_again_takes_the_later_row() -> None:
    ring = ReorderBuffer(dims=3, capacity=8)
    await ring.reserve(4)
    ring.put(_chunks([1, 2]), _rows([1, 2]))
    ring.fail(Chunk(2, 2, 0, "x", 1), "refused")  # as any row settled twice: the later wins
    ring.put(_chunks([0]), _rows([0]))
    ring.put(_chunks([3]), _rows([3]))
    batch, failures = ring.take()
    assert batch is not None
    assert batch.embeddings[[0, 1, 3], 0].tolist() == [0, 1, 3]
    assert np.isnan(batch.embeddings[2]).all()
    assert [failure.position for failure in failures] == [2]


async def test_take_each_hands_runs_kept_whole_apart_from_the_rows_between() -> None:
    ring = ReorderBuffer(dims=3, capacity=16, with_chunks=True)
    await ring.reserve(7)
    _describe(ring, 0, 7)
    first, last = _rows([0, 1]), _rows([5, 6])
    ring.put(_chunks([0, 1]), first)
    ring.put(_chunks([3, 2, 4]), _rows([3, 2, 4]))  # out of order: into the ring's arrays
    ring.put(_chunks([5, 6]), last)
    ring.fail(Chunk(4, 4, 0, "x", 1), "refused")
    taken = ring.take_each()
    assert [batch.positions.tolist() for batch, _ in taken] == [[0, 1], [2, 3, 4], [5, 6]]
    assert taken[0][0].embeddings is first
    assert taken[2][0].embeddings is last
    assert taken[1][0].embeddings[:2, 0].tolist() == [2, 3]
    assert np.isnan(taken[1][0].embeddings[2]).all()
    assert [[failure.position for failure in failures] for _, failures in taken] == [[], [4], []]
    assert [batch.spans[:, 0].tolist() for batch, _ in taken if batch.spans is not None] == [
        [0, 1],
        [2, 3, 4],
        [5, 6],
    ]
    assert ring.take_each() == []


async def test_runs_and_gaps_across_the_end_of_the_ring_leave_in_order() -> None:
    ring = ReorderBuffer(dims=3, capacity=8)  # arrays of 8 rows: unit u in slot u % 8
    await ring.reserve(6)
    ring.put(_chunks([0, 1, 2, 3, 4, 5]), _rows([0, 1, 2, 3, 4, 5]))
    assert ring.take()[0] is not None
    assert await ring.reserve(6) == 6  # slots 6, 7, then 0 to 3
    ring.put(_chunks([6, 7, 8]), _rows([6, 7, 8]))  # a run across the end
    ring.put(_chunks([10, 11]), _rows([10, 11]))
    batch, _ = ring.take()  # 9, in the slot after the end, is not answered yet
    assert batch is not None
    assert batch.positions.tolist() == [6, 7, 8]
    ring.put(_chunks([9]), _rows([9]))
    batch, _ = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == [9, 10, 11]
    assert batch.embeddings[:, 0].tolist() == [9, 10, 11]
    assert await ring.reserve(6) == 12  # slots 4 to 7, then 0 and 1, done before: not now
    ring.put(_chunks([12, 13, 14, 15]), _rows([12, 13, 14, 15]))
    batch, _ = ring.take()
    assert batch is not None
    assert batch.positions.tolist() == [12, 13, 14, 15]
    assert ring.take() == (None, [])
