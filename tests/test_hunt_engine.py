"""The engine's contracts as a library user relies on them: the error each failed row carries,
what a stopped job leaves behind, and what a job run again finds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hostile import assert_clean, docs, embed_args, sfembed, snapshot, write_lines

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
from sfembed._lance import LanceWriter
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


async def test_a_table_refused_after_answers_says_the_cache_keeps_them_and_a_rerun_uses_them(
    server: LocalServer, tmp_path: Path
) -> None:
    # The table is opened beside the first requests: by the time its shape is refused, answers
    # have come. The one file the job leaves is the cache that holds them, and the error says
    # so; a run into another table of the same folder sends none of those texts again.
    out = tmp_path / "db" / "vectors.lance"
    with LanceWriter(out, dims=4) as writer:
        writer.write(["a"], EmbeddedBatch(np.arange(1), np.ones((1, 4), np.float32)))
    source = write_lines(tmp_path / "in.jsonl", docs(120))
    before = snapshot(out.parent)

    refused = await sfembed(*embed_args(server.url, source, out, "--model", M3))

    assert refused.code == 2, refused.err
    assert "has columns id, vector, error with vectors of 4 dims" in refused.err
    assert_clean(refused)
    after = snapshot(out.parent)
    cache = out.parent / "sfembed-cache.sqlite"
    assert set(after) - set(before) == {cache.name, cache.name + "-vectors"}
    assert {name: after[name] for name in before} == before
    kept = re.search(
        r"The (\d+) vectors received meanwhile are kept in the cache '(.+?)'", refused.err
    )
    assert kept is not None, refused.err
    assert kept[2] == str(cache)
    sent = server.stats.requests
    assert 0 < int(kept[1]) <= 120

    done = await sfembed(*embed_args(server.url, source, out.parent / "m3.lance", "--model", M3))
    assert done.code == 0, done.err
    again = server.stats.requests - sent
    assert again < sent  # the kept vectors were not paid for twice


async def test_a_job_that_ends_before_any_answer_leaves_nothing_it_made(
    server: LocalServer, tmp_path: Path
) -> None:
    # A wrong key, a refused option: the job ends as it starts. The database folder, the empty
    # table and the empty cache it made are gone with it; a folder it did not make stays.
    source = write_lines(tmp_path / "in.jsonl", docs(40))
    place = tmp_path / "place"
    place.mkdir()
    table = place / "db" / "vectors.lance"

    wrong = await sfembed(*embed_args(server.url, source, table, "--model", M3), key="sk-wrong")
    chunks = await sfembed(
        *embed_args(server.url, source, table, "--model", M3, "--long", "chunks")
    )
    array = await sfembed(*embed_args(server.url, source, place / "out.npy"), key="sk-wrong")

    assert (wrong.code, chunks.code, array.code) == (1, 2, 1), wrong.err + chunks.err + array.err
    assert "Invalid token" in wrong.err
    assert "one row per record" in chunks.err
    for done in (wrong, chunks, array):
        assert_clean(done)
    assert sorted(path.name for path in place.rglob("*")) == []

    (place / "db").mkdir()
    again = await sfembed(*embed_args(server.url, source, table, "--model", M3), key="sk-wrong")
    assert again.code == 1, again.err
    assert list(place.rglob("*")) == [place / "db"]  # the user's folder is kept

    done = await sfembed(*embed_args(server.url, source, table, "--model", M3))
    assert done.code == 0, done.err
    assert {"vectors.lance", "sfembed-cache.sqlite"} <= {p.name for p in (place / "db").iterdir()}
