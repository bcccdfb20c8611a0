"""The streams between stages: bounded, ordered, ended by closing, safe to cancel around."""

from __future__ import annotations

import asyncio

import pytest

from sfembed._streams import (
    BrokenResourceError,
    ClosedResourceError,
    EndOfStream,
    ReceiveStream,
    SendStream,
    open_stream,
)


async def spin(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def pair(capacity: int) -> tuple[SendStream[int], ReceiveStream[int]]:
    return open_stream(capacity)


async def test_items_arrive_in_order_and_closing_the_sender_ends_the_receiver() -> None:
    send, receive = pair(4)
    for n in range(3):
        await send.send(n)
    send.close()
    assert [n async for n in receive] == [0, 1, 2]
    with pytest.raises(EndOfStream):
        await receive.receive()


async def test_a_full_buffer_holds_the_sender_until_an_item_is_taken() -> None:
    send, receive = pair(2)
    await send.send(1)
    await send.send(2)
    third = asyncio.create_task(send.send(3))
    await spin()
    assert not third.done()
    assert await receive.receive() == 1
    await spin()
    assert third.done()
    assert [await receive.receive(), await receive.receive()] == [2, 3]


async def test_the_stream_ends_only_when_every_clone_of_the_sender_is_closed() -> None:
    send, receive = pair(4)
    other = send.clone()
    send.close()
    send.close()  # idempotent: does not close the clone's share
    waiting = asyncio.create_task(receive.receive())
    await spin()
    assert not waiting.done()
    await other.send(7)
    assert await waiting == 7
    other.close()
    with pytest.raises(EndOfStream):
        await receive.receive()


async def test_closing_every_receiver_breaks_a_waiting_sender_and_a_closed_side_refuses_use() -> (
    None
):
    send, receive = pair(1)
    await send.send(1)
    blocked = asyncio.create_task(send.send(2))
    await spin()
    clone = receive.clone()
    receive.close()
    await spin()
    assert not blocked.done()  # a clone still reads
    clone.close()
    with pytest.raises(BrokenResourceError):
        await blocked
    with pytest.raises(ClosedResourceError):
        await receive.receive()
    send.close()
    with pytest.raises(ClosedResourceError):
        await send.send(3)


async def test_a_receiver_cancelled_after_being_woken_hands_the_item_on() -> None:
    send, receive = pair(1)
    first = asyncio.create_task(receive.receive())
    second = asyncio.create_task(receive.receive())
    await spin()
    await send.send(5)  # wakes the first receiver ...
    first.cancel()  # ... which leaves before it runs
    assert await second == 5
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_sender_cancelled_while_waiting_adds_nothing() -> None:
    send, receive = pair(1)
    await send.send(1)
    blocked = asyncio.create_task(send.send(2))
    await spin()
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    send.close()
    assert [n async for n in receive] == [1]


def test_a_stream_needs_room_for_one_item() -> None:
    with pytest.raises(ValueError, match="at least one"):
        open_stream(0)
