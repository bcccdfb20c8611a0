"""Paths and clashes: a job never writes over its input, never replaces or removes a file it did
not create, never destroys an earlier run's output by starting and stopping at once, and never
shares its output with a second job running at the same time."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
from hostile import (
    MakeServer,
    assert_clean,
    docs,
    embed_args,
    sfembed,
    snapshot,
    start,
    write_lines,
)

from sfembed.testing import Faults, LocalServer


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "in.jsonl", docs(20))


def _clash_cases(tmp_path: Path, source: Path) -> dict[str, tuple[Path, Path, list[str]]]:
    """Each way of naming one file twice: (input, output, more arguments)."""
    out = tmp_path / "out.npy"
    link = tmp_path / "hard.npy"
    os.link(source, link)  # the input under another name
    symlink = tmp_path / "sym.jsonl"
    symlink.symlink_to(source)
    sidecar_in = write_lines(tmp_path / "side.ids.jsonl", docs(5))
    return {
        "out is the input": (source, source, []),
        "out is a hard link to the input": (source, link, []),
        "the sidecar is the input": (sidecar_in, tmp_path / "side.npy", []),
        "errors is the input": (source, out, ["--errors", str(source)]),
        "errors is a symlink to the input": (source, out, ["--errors", str(symlink)]),
        "errors is the output": (source, out, ["--errors", str(out)]),
        "errors is the manifest": (source, out, ["--errors", f"{out}.manifest.json"]),
        "cache is the input": (source, out, ["--cache", str(source)]),
        "cache is the output": (source, out, ["--cache", str(out)]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "out is the input",
        "out is a hard link to the input",
        "the sidecar is the input",
        "errors is the input",
        "errors is a symlink to the input",
        "errors is the output",
        "errors is the manifest",
        "cache is the input",
        "cache is the output",
    ],
)
async def test_a_clash_between_the_jobs_files_is_refused_and_changes_nothing(
    server: LocalServer, tmp_path: Path, source: Path, case: str
) -> None:
    given, out, extra = _clash_cases(tmp_path, source)[case]
    before = snapshot(tmp_path)

    done = await sfembed(*embed_args(server.url, given, out, *extra))

    assert done.code == 2, done.err
    assert "one file" in done.err or "is also the job's" in done.err, done.err
    assert_clean(done)
    assert snapshot(tmp_path) == before
    assert server.stats.requests == 0


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
async def test_an_errors_path_that_is_not_a_regular_file_is_refused_and_kept(
    server: LocalServer, tmp_path: Path, source: Path, kind: str
) -> None:
    if kind == "fifo":
        errors = tmp_path / "errors.fifo"
        os.mkfifo(errors)
    elif kind == "folder":
        errors = tmp_path / "errors.d"
        errors.mkdir()
    else:  # a null device of its own: code that removes what it is given harms no system file
        errors = tmp_path / "null"
        try:
            os.mknod(errors, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:  # not root: a socket is not a regular file either
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(errors))
            listener.close()
    mode = errors.stat().st_mode

    done = await sfembed(
        *embed_args(server.url, source, tmp_path / "o.npy", "--errors", str(errors))
    )

    assert done.code == 2, done.err
    assert "not a regular file" in done.err
    assert_clean(done)
    assert errors.stat().st_mode == mode
    assert stat.S_ISREG(mode) is False
    assert not (tmp_path / "o.npy").exists()


async def test_an_errors_file_the_job_did_not_write_is_never_removed(
    server: LocalServer, tmp_path: Path, source: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"the user's own notes\n")

    done = await sfembed(
        *embed_args(server.url, source, tmp_path / "o.npy", "--errors", str(notes))
    )

    assert done.code == 2, done.err
    assert "no earlier run of this output wrote it" in done.err
    assert notes.read_bytes() == b"the user's own notes\n"
    assert server.stats.requests == 0


def _earlier_files(folder: Path) -> dict[str, bytes]:
    return snapshot(folder)  # a refused job leaves no lock file either


@pytest.mark.parametrize(
    "mistake",
    ["a mistyped option", "a wrong key", "a refused dimension", "a mistyped model"],
)
async def test_a_rerun_that_stops_at_once_leaves_the_earlier_output_as_it_was(
    server: LocalServer, tmp_path: Path, mistake: str
) -> None:
    lines = docs(30)
    lines[4] = b'{"id": "d4", "text": ""}'  # an errors file too
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "job" / "out.npy"
    out.parent.mkdir()
    first = await sfembed(*embed_args(server.url, source, out, "--model", "BAAI/bge-m3"))
    assert first.code == 1, first.err  # the empty text
    before = _earlier_files(out.parent)
    assert {"out.npy", "out.ids.jsonl", "out.npy.errors.jsonl", "out.npy.manifest.json"} <= set(
        before
    )
    assert not [name for name in before if name.endswith(".lock")]  # none left behind
    source.write_bytes(source.read_bytes() + b'{"id": "new", "text": "one more"}\n')
    extra, key = {
        "a mistyped option": (["--long", "chunk"], "sk-local-test"),
        "a wrong key": ([], "sk-wrong"),
        "a refused dimension": (["--model", "Qwen/Qwen3-Embedding-8B", "--dimensions", "3"], None),
        "a mistyped model": (["--model", "BAAI/bge-m4"], None),
    }[mistake]

    done = await sfembed(*embed_args(server.url, source, out, *extra), key=key or "sk-local-test")

    assert done.code in (1, 2), done.err
    assert_clean(done)
    assert _earlier_files(out.parent) == before
    assert np.load(out).shape == (30, 1024)


async def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(
    make_server: MakeServer, tmp_path: Path
) -> None:
    slow = await make_server(faults=Faults(latency_s=0.2))
    source = write_lines(tmp_path / "in.jsonl", docs(200))
    out = tmp_path / "out.npy"
    lock = tmp_path / ".out.npy.lock"
    first = await start(*embed_args(slow.url, source, out, "--concurrency", "1"))
    try:
        for _ in range(5000):  # until the first job holds its lock
            if lock.exists() and _held(lock):
                break
            assert first.returncode is None
            await asyncio.sleep(0.01)

        second = await sfembed(*embed_args(slow.url, source, out))

        assert second.code == 2, second.err
        assert "another sfembed job is using the output" in second.err
        assert_clean(second)
    finally:
        first.kill()
        await first.communicate()


def _held(lock: Path) -> bool:
    with lock.open("rb") as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        return False


async def test_a_damaged_cache_is_a_clear_error_and_is_kept(
    server: LocalServer, tmp_path: Path, source: Path
) -> None:
    cache = tmp_path / "sfembed-cache.sqlite"
    cache.write_bytes(b"not a database, " * 512)
    before = snapshot(tmp_path)

    done = await sfembed(*embed_args(server.url, source, tmp_path / "o.npy"))

    assert done.code == 2, done.err
    assert str(cache) in done.err
    assert "not a database" in done.err
    assert_clean(done)
    assert snapshot(tmp_path) == before  # no lock file left either


def test_a_lock_file_is_removed_by_its_holder_only_and_then_taken_anew(tmp_path: Path) -> None:
    from sfembed._exceptions import ConfigError
    from sfembed._jobfiles import _locked

    lock = tmp_path / ".out.npy.lock"
    with _locked(lock, "the output"):
        assert _held(lock)
        refused = pytest.raises(ConfigError, match="another sfembed job is using the output")
        with refused, _locked(lock, "the output"):
            pass
        assert lock.exists()  # the refused one removed nothing
        opened = lock.open("rb")  # as a job that opened it just before it was removed
    assert not lock.exists()
    with opened, _locked(lock, "the output"):
        fcntl.flock(opened.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed file: free
        assert _held(lock)  # but the path's new file is held: one holder at a time
    assert not lock.exists()
