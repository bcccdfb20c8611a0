"""The LanceDB sink, for real on a temporary folder (LanceDB is embedded: no server to start).

A job upserts by id: after two nightly runs over a folder of shards (the second with 2% of the
texts changed and one shard added) the table holds exactly one row per id, with the new texts'
vectors, and the second run sends only the changed and new texts (the cache has the rest).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from hostile import Done, assert_clean, embed_args, sfembed, snapshot, write_lines
from test_resume import KEY, M3, POLL_S, WAIT_S, MakeServer, job, job_tasks, settings_for
from test_shards import PER_SHARD, shard_lines, write_shard

from sfembed import ConfigError, EmbeddingClient, IOSettings
from sfembed._job import run_job
from sfembed._lance import LanceWriter
from sfembed._types import EmbeddedBatch, Failure
from sfembed.testing import LocalServer, expected_embedding

DIMS = 4


def batch(first: int, count: int, *, failed: tuple[int, ...] = ()) -> EmbeddedBatch:
    rows = np.arange(first * DIMS, (first + count) * DIMS, dtype=np.float32).reshape(count, DIMS)
    for position in failed:
        rows[position - first] = np.nan
    failures = tuple(Failure(position, f"refused {position}") for position in failed)
    return EmbeddedBatch(np.arange(first, first + count), rows, failures=failures)


def table_rows(folder: Path, name: str = "vectors") -> dict[str, dict[str, Any]]:
    rows = lancedb.connect(folder).open_table(name).to_arrow().to_pylist()
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "one row per id"
    return by_id


def test_rows_are_upserted_by_id_with_errors_and_kept_fields(tmp_path: Path) -> None:
    path = tmp_path / "vectors.lance"
    with LanceWriter(path, dims=DIMS, keep_fields=("title",), group_rows=2) as writer:
        ids = ["a", "b", "c", None]
        writer.write(ids, batch(0, 4, failed=(2,)), kept=[("A",), (7,), (None,), ("x",)])
        writer.write(["a"], batch(4, 1), kept=[("A again",)])  # a later row of an id wins
    rows = table_rows(tmp_path)
    assert sorted(rows) == ["a", "b", "c"]  # no row without an id
    assert rows["a"]["title"] == "A again"
    assert rows["a"]["vector"] == [16.0, 17.0, 18.0, 19.0]
    assert rows["b"]["title"] == "7"  # kept as text (its JSON)
    assert (rows["c"]["vector"], rows["c"]["error"]) == (None, "refused 2")
    assert rows["b"]["error"] is None

    with LanceWriter(path, dims=DIMS, keep_fields=("title",)) as writer:
        writer.write(["b", "d"], batch(10, 2), kept=[("B",), ("D",)])
    rows = table_rows(tmp_path)
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert (rows["b"]["title"], rows["b"]["vector"]) == ("B", [40.0, 41.0, 42.0, 43.0])


def test_a_failed_row_never_replaces_an_earlier_vector(tmp_path: Path) -> None:
    with LanceWriter(tmp_path / "vectors.lance", dims=DIMS) as writer:
        writer.write(["a", "b"], batch(0, 2, failed=(1,)))
    with LanceWriter(tmp_path / "vectors.lance", dims=DIMS) as writer:
        writer.write(["a", "b"], batch(5, 2, failed=(5,)))  # a fails now, b is embedded now
    rows = table_rows(tmp_path)
    assert (rows["a"]["vector"], rows["a"]["error"]) == ([0.0, 1.0, 2.0, 3.0], None)
    assert (rows["b"]["vector"], rows["b"]["error"]) == ([24.0, 25.0, 26.0, 27.0], None)


def test_a_table_of_another_shape_is_refused_and_left_alone(tmp_path: Path) -> None:
    with LanceWriter(tmp_path / "vectors.lance", dims=DIMS) as writer:
        writer.write(["a"], batch(0, 1))
    with pytest.raises(ConfigError, match=r"vectors of 4 dims; this job writes id, vector \(8"):
        LanceWriter(tmp_path / "vectors.lance", dims=8)
    with pytest.raises(ConfigError, match="has columns id, vector, error"):
        LanceWriter(tmp_path, table="vectors", dims=DIMS, keep_fields=("url",))
    with pytest.raises(ConfigError, match="cannot carry id"):
        LanceWriter(tmp_path / "other.lance", dims=DIMS, keep_fields=("id",))
    with pytest.raises(ConfigError, match=r"name a table as NAME\.lance"):
        LanceWriter(tmp_path / "vectors.npy", dims=DIMS)
    assert len(table_rows(tmp_path)) == 1


def test_a_table_without_a_vector_column_is_refused_saying_so(tmp_path: Path) -> None:
    lancedb.connect(tmp_path).create_table("mine", data=pa.table({"name": ["x"], "n": [1]}))
    with pytest.raises(ConfigError, match="has columns name, n with no vector column; this job"):
        LanceWriter(tmp_path / "mine.lance", dims=DIMS)
    assert lancedb.connect(tmp_path).open_table("mine").count_rows() == 1


async def nightly(server: LocalServer, folder: Path, out: Path, **io: Any) -> Any:
    settings = settings_for(server, M3)
    options = IOSettings(checkpoint_rows=50, keep_fields=("title",), **io)
    return await job(server, folder, out, dataclasses.replace(settings, io=options))


async def test_two_nightly_runs_keep_one_row_per_id_and_send_only_what_changed(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server, reference = await make_server(), await make_server()
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(4):
        write_shard(folder, shard, shard_lines(shard))
    out = tmp_path / "db" / "vectors.lance"
    await nightly(server, folder, out)
    first = table_rows(out.parent)
    assert len(first) == 4 * PER_SHARD - 1  # the malformed line of shard 2 has no id

    # The next night: 2% of the texts edited (one in 50) and a fifth shard.
    for shard in range(4):
        write_shard(folder, shard, shard_lines(shard, edit=50))
    write_shard(folder, 4, shard_lines(4))
    before = server.stats.tokens_accepted
    summary = await nightly(server, folder, out)
    assert summary.records == 5 * PER_SHARD
    rows = table_rows(out.parent)
    assert len(rows) == 5 * PER_SHARD - 1
    edited = "shard 1 document 0 about rivers and winter libraries (edited)"
    np.testing.assert_allclose(rows["s1-0"]["vector"], expected_embedding(M3, edited), atol=1e-6)
    assert rows["s4-3"]["title"] == "T3"

    # Sent: the edited texts and the new shard, nothing else (the same run without the cache
    # over just those texts is charged exactly as much).
    changed = tmp_path / "changed"
    changed.mkdir()
    lines = [line for shard in range(4) for line in shard_lines(shard, edit=50)[::50]]
    write_shard(changed, 0, [line for line in lines if b"(edited)" in line])
    write_shard(changed, 1, shard_lines(4))
    await job(reference, changed, tmp_path / "ref" / "out.npy", settings_for(reference, M3))
    assert server.stats.tokens_accepted - before == reference.stats.tokens_accepted > 0


async def test_a_folder_and_table_name_and_chunks_mode_refused(
    server: LocalServer, tmp_path: Path
) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder, 0, shard_lines(0, 5))
    await nightly(server, folder, tmp_path / "db", table="docs")
    assert len(table_rows(tmp_path / "db", "docs")) == 5
    assert (tmp_path / "db" / "docs.lance.manifest.json").exists()
    settings = dataclasses.replace(settings_for(server, M3), long_mode="chunks")
    with pytest.raises(ConfigError, match="one row per record"):
        await job(server, folder, tmp_path / "db" / "docs.lance", settings)


async def test_a_resume_with_other_kept_fields_is_refused_naming_both_and_touching_nothing(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", shard_lines(0, 20))
    out = tmp_path / "db" / "vectors.lance"

    async def embed(*extra: str) -> Done:
        return await sfembed(*embed_args(server.url, source, out, "--model", M3, *extra))

    first = await embed("--keep-fields", "title,id2")
    assert first.code == 0, first.err
    before = snapshot(out.parent)  # the table's files, its manifest and the cache
    changed = {
        "left out": (),
        "fewer": ("--keep-fields", "title"),
        "other": ("--keep-fields", "title,url"),
    }
    for case, flags in changed.items():
        refused = await embed("--resume", *flags)
        assert refused.code == 2, (case, refused.err)
        now = repr(sorted(flags[1].split(","))) if flags else "none"
        assert f"setting io.keep_fields was ['id2', 'title'], now {now};" in refused.err, case
        assert_clean(refused)
        assert snapshot(out.parent) == before, case

    again = await embed("--resume", "--keep-fields", "id2,title")  # the same columns
    assert again.code == 0, again.err
    assert table_rows(out.parent)["s0-3"]["title"] == "T3"


def test_a_table_opened_later_is_checked_before_any_row_reaches_it(tmp_path: Path) -> None:
    path = tmp_path / "vectors.lance"
    with LanceWriter(path, dims=DIMS) as writer:
        writer.write(["a"], batch(0, 1))
    later = LanceWriter(path, dims=2 * DIMS, open_now=False)  # neither opened nor checked yet
    rows = np.ones((1, 2 * DIMS), dtype=np.float32)
    later.write(["b"], EmbeddedBatch(np.arange(1), rows))  # pooled
    with pytest.raises(ConfigError, match=r"vectors of 4 dims; this job writes id, vector \(8"):
        later.commit()
    assert sorted(table_rows(tmp_path)) == ["a"]


@pytest.mark.parametrize("open_now", [True, False])
def test_a_missing_lancedb_is_refused_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, open_now: bool
) -> None:
    monkeypatch.setitem(sys.modules, "lancedb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"needs lancedb: pip install 'sfembed\[lance\]'"):
        LanceWriter(tmp_path / "vectors.lance", dims=DIMS, open_now=open_now)
    assert list(tmp_path.iterdir()) == []


async def test_a_new_job_on_a_table_of_another_shape_stops_before_writing_a_row(
    server: LocalServer, tmp_path: Path
) -> None:
    # The job sends beside opening the table (lancedb's import alone takes seconds); the check
    # still ends it before any row reaches the table, and nothing of the earlier run moves.
    out = tmp_path / "db" / "vectors.lance"
    with LanceWriter(out, dims=DIMS, keep_fields=("title",)) as writer:
        writer.write(["s0-1"], batch(0, 1), kept=[("mine",)])
    source = write_lines(tmp_path / "in.jsonl", shard_lines(0, 200))
    before = snapshot(out.parent)

    refused = await sfembed(*embed_args(server.url, source, out, "--model", M3))

    assert refused.code == 2, refused.err
    assert "LanceDB table 'vectors'" in refused.err
    assert "has columns id, vector, error, title with vectors of 4 dims" in refused.err
    assert "half written" not in refused.err  # nothing was: the check came first
    assert_clean(refused)
    after = snapshot(out.parent)
    # The job's cache may hold the vectors it was sent meanwhile (a later run uses them); no
    # manifest, errors file or lock file is left, and the table is as it was.
    cache = {name for name in after if name.startswith("sfembed-cache")}
    assert {name: data for name, data in after.items() if name not in cache} == before
    assert table_rows(out.parent)["s0-1"]["title"] == "mine"


async def test_a_new_job_cancelled_as_it_starts_leaves_nothing_running_and_reruns_whole(
    server: LocalServer, tmp_path: Path
) -> None:
    # Cancelled at its first request: its table may still be opening on the disk thread.
    source = write_lines(tmp_path / "in.jsonl", shard_lines(0, 200))
    out = tmp_path / "db" / "vectors.lance"
    out.parent.mkdir()
    settings = dataclasses.replace(
        settings_for(server, M3), io=IOSettings(cache=False, checkpoint_rows=50)
    )
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        task = asyncio.create_task(run_job(source, out, settings, client=client))
        for _ in range(int(WAIT_S / POLL_S)):
            if server.stats.first_request_at is not None or task.done():
                break
            await asyncio.sleep(POLL_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not job_tasks()

    summary = await job(server, source, out, settings, resume=True)
    assert summary.records == 200
    rows = table_rows(out.parent)
    assert len(rows) == 200
    assert rows["s0-7"]["vector"] is not None
