"""The engine's contracts as a library user relies on them: the error each failed row carries,
what a stopped job leaves behind, and what a job run again finds."""

from __future__ import annotations

import pytest

from sfembed import (
    EmbeddingClient,
    InputError,
    JobError,
    JobStats,
    OverloadedError,
    RateLimits,
    embed,
    load_settings,
)
from sfembed._delivery import Delivery
from sfembed._reorder import ReorderBuffer
from sfembed._streams import ReceiveStream, SendStream, open_stream
from sfembed._types import Chunk, EmbeddedBatch
from sfembed.testing import LocalServer

KEY = "sk-local-test"
M3 = "BAAI/bge-m3"
UNLIMITED = RateLimits(rpm=10**7, tpm=10**10)


async def test_a_row_failed_in_the_handler_of_another_error_carries_only_its_own() -> None:
    # A stage may fail a row of its own (an unusable record) while it handles some other error:
    # the row carries the error it was failed with, none (refused as it was read), not that one.
    stats = JobStats()
    streams: tuple[SendStream[EmbeddedBatch], ReceiveStream[EmbeddedBatch]] = open_stream(4)
    batches_out, batches_in = streams
    delivery = Delivery(ReorderBuffer(dims=2, capacity=4), stats, batches_out)
    writer = delivery.writer()
    first = await writer.reserve(2)
    try:
        raise OverloadedError("overloaded", status=503, code=50505)
    except OverloadedError:
        writer.fail(Chunk(first, 0, 0, "", 1), "the text is empty")
        writer.fail(Chunk(first + 1, 1, 0, "x", 1), "refused", InputError("bad", item=0))
    writer.close()
    await delivery.run()
    with batches_in:
        batch = await batches_in.receive()
    empty, refused = batch.failures
    assert (empty.position, empty.error, empty.retryable) == (0, None, False)
    assert isinstance(refused.error, InputError)
    assert [f.position for f in stats.failures] == [0, 1]


async def test_an_input_the_client_would_not_send_carries_its_input_error(
    server: LocalServer,
) -> None:
    texts = [f"text {n}" for n in range(6)]
    texts[3] = "broken \udc80 text"
    settings = load_settings(base_url=server.url, rate=UNLIMITED)
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        with pytest.raises(JobError) as raised:
            await embed(texts, model=M3, settings=settings, client=client)
    (failure,) = raised.value.failures
    assert failure.position == 3
    assert isinstance(failure.error, InputError)
    assert "not valid Unicode" in failure.error.reason
    assert failure.error.__traceback__ is None
    assert not failure.retryable
    assert not raised.value.retryable
