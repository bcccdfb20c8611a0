"""Shared fixtures: local SiliconFlow-compatible servers on 127.0.0.1 (sfembed.testing)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from sfembed.testing import LocalServer, RedisServer, ServerConfig

#: ``await make_server(**ServerConfig fields)`` -> a started LocalServer, stopped at teardown.
MakeServer = Callable[..., Awaitable[LocalServer]]


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    """A started LocalServer with the default config (key ``sk-local-test``, no limits)."""
    async with LocalServer() as running:
        yield running


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    """A factory of started LocalServers taking ServerConfig keyword arguments."""
    started: list[LocalServer] = []

    async def make(**config: Any) -> LocalServer:
        running = LocalServer(ServerConfig(**config))
        await running.start()
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private Redis-compatible server on a free port (no persistence), stopped at teardown."""
    with RedisServer() as running:
        yield running
