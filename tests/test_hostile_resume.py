"""Resume and reruns: the nightly command works every night, a resumed job names its failed
records by their real lines, and a full disk ends a job with one clear line, the earlier
output kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from pathlib import Path

import numpy as np
import orjson
from hostile import (
    KEY,
    MakeServer,
    assert_clean,
    docs,
    embed_args,
    nothing_listening,
    sfembed,
    snapshot,
    write_lines,
)

from sfembed import BatchLimits, EmbeddingClient, IOSettings, load_settings
from sfembed._job import run_job
from sfembed._manifest import load_manifest, manifest_path_for
from sfembed.testing import Faults, LocalServer

NIGHTLY = ("--resume-or-restart", "--model", "BAAI/bge-m3")


async def test_one_nightly_command_works_every_night(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server = await make_server()
    source = write_lines(tmp_path / "in.jsonl", docs(60))
    out = tmp_path / "out" / "vectors.npy"
    out.parent.mkdir()

    first = await sfembed(*embed_args(server.url, source, out, *NIGHTLY))
    assert first.code == 0, first.err
    sent = server.stats.tokens_accepted

    unchanged = await sfembed(*embed_args(server.url, source, out, *NIGHTLY))
    assert unchanged.code == 0, unchanged.err
    assert server.stats.tokens_accepted == sent  # complete and unchanged: nothing to do

    lines = docs(60)
    lines[10] = orjson.dumps({"id": "d10", "text": "an edited text"})
    lines.append(orjson.dumps({"id": "d60", "text": "a new text"}))
    write_lines(source, lines)
    changed = await sfembed(*embed_args(server.url, source, out, *NIGHTLY))

    assert changed.code == 0, changed.err
    assert_clean(changed)
    assert np.load(out).shape == (61, 1024)
    manifest = load_manifest(manifest_path_for(out))
    assert manifest is not None
    assert manifest.complete
    assert manifest.checkpoint.records == 61
    # Only the two changed texts were sent: the cache held the rest.
    alone = await make_server()
    only = write_lines(tmp_path / "only.jsonl", [lines[10], lines[60]])
    reference = await sfembed(*embed_args(alone.url, only, tmp_path / "only.npy", *NIGHTLY))
    assert reference.code == 0, reference.err
    assert server.stats.tokens_accepted - sent == alone.stats.tokens_accepted


async def test_a_resumed_job_names_failed_records_by_their_real_lines(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server = await make_server(faults=Faults(latency_s=0.05))
    lines = docs(400)
    lines[350] = orjson.dumps({"id": "d350", "text": ""})  # fails after the resume
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.npy"
    settings = load_settings(
        base_url=server.url,
        concurrency=2,
        batch=BatchLimits(max_items=8),
        io=IOSettings(cache=False, checkpoint_rows=40),
    )
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        task = asyncio.create_task(run_job(source, out, settings, client=client))
        for _ in range(5000):
            manifest = (
                load_manifest(manifest_path_for(out)) if manifest_path_for(out).exists() else None
            )
            if manifest is not None and manifest.checkpoint.records > 0:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    done_before = load_manifest(manifest_path_for(out))
    assert done_before is not None
    assert 0 < done_before.checkpoint.records < 350
    server.set_faults(Faults())

    resumed = await sfembed(
        *embed_args(server.url, source, out, "--resume", "--no-cache", "--checkpoint-rows", "40")
    )

    assert resumed.code == 1, resumed.err  # the empty text
    assert "record 'd350' (line 351) failed: empty text" in resumed.err
    restarted_at = 350 - done_before.checkpoint.records
    assert f"input {restarted_at} " not in resumed.err


def _small_files() -> None:
    """In the child: files may not grow past 64 KiB, and a write past it fails (EFBIG)
    instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


async def _a_first_run(server: LocalServer, tmp_path: Path) -> tuple[Path, Path]:
    """The input and the output of a finished job of 10 records, the earlier output of a rerun."""
    source = write_lines(tmp_path / "in.jsonl", docs(10))
    out = tmp_path / "out.npy"
    first = await sfembed(*embed_args(server.url, source, out, "--no-cache"))
    assert first.code == 0, first.err
    return source, out


async def test_a_full_disk_ends_the_job_with_one_clear_line_and_keeps_the_earlier_output(
    server: LocalServer, tmp_path: Path
) -> None:
    source, out = await _a_first_run(server, tmp_path)
    before = snapshot(tmp_path)
    write_lines(source, docs(200))  # 200 rows of 4 KiB: past what the disk will take
    before["in.jsonl"] = source.read_bytes()

    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-W", "error", "-m", "sfembed"),
        *embed_args(server.url, source, out, "--no-cache"),
        env={**os.environ, "SFEMBED_HOSTILE_KEY": KEY, "PYTHONWARNINGS": "error"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_small_files,
    )
    _, err = await asyncio.wait_for(child.communicate(), 50)

    assert child.returncode == 1, err
    text = err.decode()
    assert "File too large" in text
    assert "Traceback" not in text
    assert snapshot(tmp_path) == before  # the earlier output as it was, nothing left behind


async def test_a_small_rerun_against_a_server_that_is_down_keeps_the_earlier_output(
    server: LocalServer, tmp_path: Path
) -> None:
    source, out = await _a_first_run(server, tmp_path)
    config = tmp_path / "job.toml"
    config.write_text("[retry]\nmax_attempts = 2\ninitial_backoff_s = 0.01\n")
    before = snapshot(tmp_path)
    down = nothing_listening()

    again = await sfembed(*embed_args(down, source, out, "--no-cache", "--config", str(config)))

    assert again.code == 1, again.err
    assert "none succeeded" in again.err
    assert_clean(again, KEY)
    assert snapshot(tmp_path) == before  # two requests, both given up: the good rows stay
