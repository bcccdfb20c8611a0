"""Bounded in-memory streams between the engine's stages, after anyio's memory object streams.

``open_stream(capacity)`` gives the two sides of one buffer of at most ``capacity`` items. A
sender waits while the buffer is full and a receiver while it is empty, so a fast stage never runs
more than ``capacity`` items ahead of a slow one. Each side can be cloned, one clone per task.
When every clone of the send side is closed, receivers get what is buffered and then the end of
the stream (``async for`` ends; :meth:`ReceiveStream.receive` raises :class:`EndOfStream`): the
end is the sender closing, never a sentinel item. When every receive side is closed, sending
raises :class:`BrokenResourceError`, as nobody would read the item.

Waiters are woken one at a time (a stream read by thousands of tasks does not wake them all for
each item), and a waiter cancelled just after being woken hands its turn to the next one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Generic, Self, TypeVar

__all__ = [
    "BrokenResourceError",
    "ClosedResourceError",
    "EndOfStream",
    "ReceiveStream",
    "SendStream",
    "open_stream",
]

T = TypeVar("T")


class EndOfStream(Exception):
    """Raised by ``receive`` when the stream is empty and every send side is closed."""


class ClosedResourceError(Exception):
    """Raised when a side is used after it was closed."""


class BrokenResourceError(Exception):
    """Raised by ``send`` when every receive side is closed."""


class _State(Generic[T]):
    __slots__ = ("buffer", "capacity", "receivers", "senders", "waiting_receive", "waiting_send")

    def __init__(self, capacity: int) -> None:
        self.buffer: deque[T] = deque()
        self.capacity = capacity
        self.senders = 0
        self.receivers = 0
        self.waiting_send: deque[asyncio.Future[None]] = deque()
        self.waiting_receive: deque[asyncio.Future[None]] = deque()


def open_stream(capacity: int) -> tuple[SendStream[T], ReceiveStream[T]]:
    """The send and receive sides of a new stream of at most ``capacity`` buffered items (at
    least 1); raises ValueError otherwise."""
    if capacity < 1:
        raise ValueError(f"a stream needs room for at least one item, not {capacity}")
    state: _State[T] = _State(capacity)
    return SendStream(state), ReceiveStream(state)


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


def _wake_all(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)


async def _wait(waiters: deque[asyncio.Future[None]]) -> None:
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():
            _wake_one(waiters)  # woken, but leaving: the turn goes to the next waiter
        raise


class _Side(Generic[T]):
    __slots__ = ("_closed", "_state")

    def __init__(self, state: _State[T]) -> None:
        self._state: _State[T] = state
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"this {type(self).__name__} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class SendStream(_Side[T]):
    """The send side of a stream (see the module docstring)."""

    __slots__ = ()

    def __init__(self, state: _State[T]) -> None:
        super().__init__(state)
        state.senders += 1

    async def send(self, item: T) -> None:
        """Add ``item``, waiting while the buffer is full. Raises ClosedResourceError if this side
        is closed and BrokenResourceError if no receiver is left."""
        state = self._state
        while True:
            self._check_open()
            if state.receivers == 0:
                raise BrokenResourceError("every receiver of this stream is closed")
            if len(state.buffer) < state.capacity:
                break
            await _wait(state.waiting_send)
        state.buffer.append(item)
        _wake_one(state.waiting_receive)

    def clone(self) -> SendStream[T]:
        """Another send side of the same stream, to be closed on its own."""
        self._check_open()
        return SendStream(self._state)

    def close(self) -> None:
        """Close this side (idempotent); the last one closed ends the stream for receivers."""
        if not self._closed:
            self._closed = True
            self._state.senders -= 1
            if self._state.senders == 0:
                _wake_all(self._state.waiting_receive)


class ReceiveStream(_Side[T]):
    """The receive side of a stream (see the module docstring)."""

    __slots__ = ()

    def __init__(self, state: _State[T]) -> None:
        super().__init__(state)
        state.receivers += 1

    async def receive(self) -> T:
        """The next item, waiting while the buffer is empty. Raises EndOfStream once it is empty
        and every send side is closed, and ClosedResourceError if this side is closed."""
        state = self._state
        while True:
            self._check_open()
            if state.buffer:
                item = state.buffer.popleft()
                _wake_one(state.waiting_send)
                return item
            if state.senders == 0:
                raise EndOfStream
            await _wait(state.waiting_receive)

    def clone(self) -> ReceiveStream[T]:
        """Another receive side of the same stream, to be closed on its own."""
        self._check_open()
        return ReceiveStream(self._state)

    def close(self) -> None:
        """Close this side (idempotent); once the last one is closed, sending fails."""
        if not self._closed:
            self._closed = True
            self._state.receivers -= 1
            if self._state.receivers == 0:
                self._state.buffer.clear()
                _wake_all(self._state.waiting_send)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except EndOfStream:
            raise StopAsyncIteration from None
