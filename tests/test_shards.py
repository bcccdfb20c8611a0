"""Jobs over many inputs: a folder of compressed shards, a glob, standard input and FIFOs.

Against a real LocalServer: the CLI in a child process where a kill or a pipe must be real, and
``run_job`` in this process otherwise. Every record of every shard is a row (or an errors-file
entry naming its shard and line), in sorted path order; a SIGKILL mid-shard then ``--resume``
ends byte-identical to an uninterrupted run; a pipe is read once, and ``--resume`` on it refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import signal
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
import zstandard
from test_resume import (
    FAST,
    KEY,
    KEY_ENV,
    M3,
    SLOW,
    WAIT_S,
    MakeServer,
    assert_clean,
    cli,
    cli_args,
    job,
    manifest_of,
    outputs,
    settings_for,
    start,
)

from sfembed import ConfigError, IOSettings
from sfembed._manifest import load_manifest, manifest_path_for
from sfembed._writers import ids_path_for
from sfembed.testing import LocalServer, expected_embedding

SHARDS, PER_SHARD = 8, 60


def shard_lines(shard: int, count: int = PER_SHARD, *, edit: int = 0) -> list[bytes]:
    """JSONL lines of one shard; line 7 of shard 2 is malformed. ``edit`` changes every
    ``edit``-th text."""
    lines = []
    for n in range(count):
        text = f"shard {shard} document {n} about rivers and winter libraries"
        if edit and n % edit == 0:
            text += " (edited)"
        lines.append(orjson.dumps({"id": f"s{shard}-{n}", "text": text, "title": f"T{n}"}))
    if shard == 2:
        lines[6] = b'{"id": "s2-6", "text": '
    return lines


def write_shard(folder: Path, shard: int, lines: list[bytes]) -> Path:
    """Even shards gzip, odd ones zstd; named so that sorted order is shard order."""
    data = b"".join(line + b"\n" for line in lines)
    if shard % 2:
        path = folder / f"part-{shard:02d}.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path = folder / f"part-{shard:02d}.jsonl.gz"
        path.write_bytes(gzip.compress(data))
    return path


def shard_folder(tmp_path: Path, count: int = SHARDS) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in reversed(range(count)):  # created out of order: the reading order is sorted
        write_shard(folder, shard, shard_lines(shard))
    return folder


def errors_of(out: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in Path(f"{out}.errors.jsonl").read_bytes().splitlines()]


def sidecar(out: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in ids_path_for(out).read_bytes().splitlines()]


async def test_a_folder_of_compressed_shards_is_one_job_in_sorted_order(
    server: LocalServer, tmp_path: Path
) -> None:
    folder = shard_folder(tmp_path)
    out = tmp_path / "out" / "vectors.npy"
    summary = await job(server, folder, out, settings_for(server, M3))
    total = SHARDS * PER_SHARD
    assert summary.records == summary.rows == total
    rows = np.load(out)
    assert rows.shape == (total, 1024)
    ids = sidecar(out)
    assert [entry["id"] for entry in ids[:3]] == ["s0-0", "s0-1", "s0-2"]
    assert ids[PER_SHARD]["source"] == str(folder / "part-01.jsonl.zst")
    assert (ids[PER_SHARD]["line"], ids[-1]["line"]) == (1, PER_SHARD)
    for shard in range(SHARDS):
        row = shard * PER_SHARD + 3
        assert ids[row]["id"] == f"s{shard}-3"
        text = f"shard {shard} document 3 about rivers and winter libraries"
        np.testing.assert_allclose(rows[row], expected_embedding(M3, text), atol=1e-6)
    # Every record accounted for: the one bad line is an entry naming its shard and line.
    errors = errors_of(out)
    assert len(errors) == summary.failed == 1
    assert errors[0]["id"] is None
    assert (errors[0]["source"], errors[0]["line"]) == (str(folder / "part-02.jsonl.gz"), 7)
    assert int(np.isnan(rows).any(axis=1).sum()) == 1
    assert len(manifest_of(out).input) == SHARDS  # each shard's identity


async def test_a_job_killed_in_shard_5_resumes_byte_identical(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server, resumed_on = await make_server(), await make_server()
    folder = shard_folder(tmp_path)
    expected_out = tmp_path / "ref" / "out.npy"
    await job(server, folder, expected_out, settings_for(server, M3))
    expected = outputs(expected_out)
    out = tmp_path / "job" / "out.npy"
    server.set_faults(SLOW)
    try:
        child = await start(server, folder, out, model=M3)
        shard_5 = range(4 * PER_SHARD + 1, 5 * PER_SHARD)  # records done: inside shard 5
        for _ in range(int(WAIT_S / 0.005)):
            manifest = load_manifest(manifest_path_for(out)) if out.exists() else None
            if manifest is not None and manifest.checkpoint.records in shard_5:
                break
            assert child.process.returncode is None, (await child.done()).err
            await asyncio.sleep(0.005)
        done = await child.kill()
    finally:
        server.set_faults(FAST)
    assert done.code == -signal.SIGKILL
    assert manifest_of(out).checkpoint.records in shard_5

    resumed = await cli(resumed_on, folder, out, "--resume", model=M3)
    assert resumed.code == 1, resumed.err  # the bad line of shard 2
    assert outputs(out) == expected
    assert manifest_of(out).complete


async def test_adding_a_shard_resends_only_its_texts_with_the_cache(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server, alone = await make_server(), await make_server()  # the cache knows its endpoint
    folder = shard_folder(tmp_path, count=3)
    out = tmp_path / "out" / "vectors.npy"
    cached = dataclasses.replace(settings_for(server, M3), io=IOSettings(checkpoint_rows=50))
    await job(server, folder, out, cached)
    before = server.stats.tokens_accepted
    new = write_shard(folder, 3, shard_lines(3))
    summary = await job(server, folder, out, cached)
    assert summary.records == 4 * PER_SHARD
    assert summary.stats.cached == 3 * PER_SHARD - 1  # all but the bad line
    only_new = tmp_path / "alone" / "vectors.npy"
    await job(alone, new, only_new, settings_for(alone, M3))
    assert server.stats.tokens_accepted - before == alone.stats.tokens_accepted > 0


# --- pipes ------------------------------------------------------------------------------------


async def piped(server: LocalServer, data: bytes, out: Path, *extra: str) -> tuple[int, str]:
    """``sfembed embed - ...`` with ``data`` on its standard input: (exit code, stderr)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-W", "error", "-m", "sfembed", "embed", "-", "--out", str(out)),
        *("--base-url", server.url, "--api-key-env", KEY_ENV, "--model", M3),
        *("--no-progress", "--no-cache", *extra),
        env={**os.environ, KEY_ENV: KEY, "PYTHONWARNINGS": "error"},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(data), WAIT_S)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_standard_input_gives_every_record_and_refuses_resume(
    server: LocalServer, tmp_path: Path
) -> None:
    lines = shard_lines(0, 300)
    data = gzip.compress(b"".join(line + b"\n" for line in lines))
    out = tmp_path / "out" / "vectors.npy"
    code, err = await piped(server, data, out)
    assert code == 0, err
    assert np.load(out).shape == (300, 1024)
    assert [entry["id"] for entry in sidecar(out)] == [f"s0-{n}" for n in range(300)]
    before = outputs(out)
    code, err = await piped(server, data, out, "--resume")
    assert code == 2  # refused before anything is read, as a usage error
    assert "cannot resume: input '-' is read once as it streams" in err
    assert "Traceback" not in err
    assert outputs(out) == before  # nothing touched


async def test_a_fifo_is_read_once_and_its_job_completes(
    server: LocalServer, tmp_path: Path
) -> None:
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out" / "vectors.npy"
    child = await start(server, fifo, out, model=M3)
    lines = shard_lines(1, 200)
    await asyncio.to_thread(fifo.write_bytes, b"".join(line + b"\n" for line in lines))
    done = await child.done()
    assert_clean(done)
    assert done.code == 0, done.err
    assert np.load(out).shape == (200, 1024)


async def test_a_resume_names_the_shard_that_changed_or_the_one_added(
    server: LocalServer, tmp_path: Path
) -> None:
    folder = shard_folder(tmp_path, count=3)
    out = tmp_path / "out" / "vectors.npy"
    settings = settings_for(server, M3)
    await job(server, folder, out, settings)
    write_shard(folder, 1, shard_lines(1, edit=7))
    with pytest.raises(ConfigError, match=r"cannot resume: input '.*part-01.jsonl.zst''s size"):
        await job(server, folder, out, settings, resume=True)
    write_shard(folder, 1, shard_lines(1))
    write_shard(folder, 3, shard_lines(3))
    with pytest.raises(ConfigError, match=r"the job read 3 input\(s\), now 4"):
        await job(server, folder, out, settings, resume=True)


async def test_the_command_line_takes_several_paths_and_globs_in_sorted_order(
    server: LocalServer, tmp_path: Path
) -> None:
    folder = shard_folder(tmp_path, count=4)
    out = tmp_path / "out" / "vectors.npy"
    out.parent.mkdir()
    _, *options = cli_args(server, folder, out, M3)
    named = [str(folder / "part-03.jsonl.zst"), str(folder / "part-0[0-1].*")]  # not shard 2
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-W", "error", "-m", "sfembed", "embed", *named, *options),
        env={**os.environ, KEY_ENV: KEY, "PYTHONWARNINGS": "error"},
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    _, err = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode == 0, err.decode()
    ids = [entry["id"] for entry in sidecar(out)]
    assert ids == [f"s{shard}-{n}" for shard in (0, 1, 3) for n in range(PER_SHARD)]
