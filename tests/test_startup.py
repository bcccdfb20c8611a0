"""Nothing slow before it is needed: importing sfembed, asking for --help and starting a job load
only what they use, and the progress bar's total is counted beside the job, not before it.

Each import check runs in a fresh interpreter, as a user's process starts."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sfembed import JobStats
from sfembed._progress import TqdmProgress

OPTIONAL = {"lancedb", "pyarrow", "zstandard", "redis", "ray", "matplotlib"}


# Code for a fresh interpreter: ``by`` maps the modules named to the thread that imported them.
# ``collecting`` whether the collector was on as the job's modules loaded. (A finder first in
# line sees every import, whichever way it is made, and finds nothing.)
_IMPORTED_BY = (
    "import gc\n"
    "by, collecting = {}, []\n"
    "class _Seen:\n"
    "    @staticmethod\n"
    "    def find_spec(name, path=None, target=None):\n"
    "        if name in ('aiohttp', 'sfembed._job'):\n"
    "            by.setdefault(name, threading.current_thread().name)\n"
    "        if name == 'sfembed._job':\n"
    "            collecting.append(gc.isenabled())\n"
    "sys.meta_path.insert(0, _Seen)\n"
)


def _python(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    """What a fresh interpreter running ``code`` in ``tmp_path`` prints; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    """The modules a fresh interpreter holds once ``code`` has run (in ``tmp_path``)."""
    listing = "import sys, json\nprint(json.dumps(sorted(sys.modules)))"
    return set(json.loads(_python(f"{code}\n{listing}", tmp_path).splitlines()[-1]))


def test_importing_sfembed_loads_no_stage_until_a_name_is_used(tmp_path: Path) -> None:
    modules = _modules_after("import sfembed", tmp_path)
    assert "sfembed._exceptions" in modules  # the check sees what is imported
    unwanted = {"sfembed._cache", "sfembed._client", "sfembed._engine", "aiohttp", "numpy"}
    assert not modules & (unwanted | OPTIONAL)
    modules = _modules_after("from sfembed import EmbeddingCache", tmp_path)
    assert "sfembed._cache" in modules


@pytest.mark.parametrize(
    ("argv", "code"), [(["--help"], 0), (["embed", "--help"], 0), (["embed", "--bogus"], 2)]
)
def test_help_and_a_usage_error_load_no_numpy_event_loop_client_or_optional_library(
    tmp_path: Path, argv: list[str], code: int
) -> None:
    # The parser needs the settings' defaults only: numpy, asyncio and the job's modules would
    # double what --help costs.
    run = (
        "import io, sys\n"
        "from sfembed._cli import main\n"
        "sys.stdout = sys.stderr = io.StringIO()\n"
        f"assert main({argv!r}) == {code}\n"
        "sys.stdout = sys.__stdout__"
    )
    modules = _modules_after(run, tmp_path)
    assert {"sfembed._options", "sfembed._config", "argparse"} <= modules
    unwanted = {
        "sfembed._cache",
        "sfembed._client",
        "sfembed._commands",
        "sfembed.testing",
        "sfembed._testing",
        "sfembed._job",
        "sfembed._sources",
        "sfembed._types",
        "sfembed._writers",
    }
    libraries = {"numpy", "asyncio", "aiohttp", "orjson", "tqdm", "tokenizers", "logging"}
    assert not modules & (unwanted | libraries | OPTIONAL)


@pytest.mark.parametrize(("chosen", "kept"), [(None, "1"), ("3", "3")])
def test_before_numpy_loads_the_command_line_sets_one_blas_thread_and_a_rarer_collector(
    tmp_path: Path, chosen: str | None, kept: str
) -> None:
    # OpenBLAS keeps to one thread unless the user chose; the young collection runs every
    # 10,000 allocations, not 700, from before the imports.
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if chosen is not None:
        env["OPENBLAS_NUM_THREADS"] = chosen
    # A job's, as --help loads no numpy.
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "a short text"}\n')
    code = (
        "import contextlib, gc, io, os, sys\n"
        "seen = []\n"
        "class _Seen:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name == 'numpy':\n"
        "            seen.append((os.environ.get('OPENBLAS_NUM_THREADS'), gc.get_threshold()[0]))\n"
        "sys.meta_path.insert(0, _Seen)\n"
        "from sfembed._cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['embed', '--local', 'in.jsonl', '--out', 'out.npy', '--no-cache',\n"
        "                 '--no-progress']) == 0\n"
        "print(*seen[0])"
    )
    assert _python(code, tmp_path, env).split() == [kept, "10000"]


# After the command line's start (``sfembed embed --help``), four threads each keep 2,000 small
# allocations (over obmalloc's 512 bytes: they go to malloc), then glibc lists its arenas.
_ARENAS_AFTER_THREADS = (
    "import contextlib, ctypes, io, threading\n"
    "from sfembed._cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    assert main(['embed', '--help']) == 0\n"
    "kept, ready = [], threading.Barrier(4)\n"
    "def allocate():\n"
    "    kept.append([bytes(1000 + i) for i in range(2000)])\n"
    "    ready.wait()\n"
    "threads = [threading.Thread(target=allocate) for _ in range(4)]\n"
    "for thread in threads: thread.start()\n"
    "for thread in threads: thread.join()\n"
    "ctypes.CDLL(None).malloc_stats()\n"
)


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="malloc arenas are glibc's")
@pytest.mark.parametrize(("chosen", "one"), [(None, True), ("4", False)])
def test_the_command_line_keeps_malloc_to_one_arena_unless_the_user_chose(
    tmp_path: Path, chosen: str | None, one: bool
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if chosen is not None:
        env["MALLOC_ARENA_MAX"] = chosen
    done = subprocess.run(
        [sys.executable, "-c", _ARENAS_AFTER_THREADS],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    arenas = [line for line in done.stderr.splitlines() if line.startswith("Arena ")]
    assert arenas, done.stderr
    assert (len(arenas) == 1) is one, arenas


def test_a_job_of_short_texts_loads_no_tokenizer_bar_or_optional_library(tmp_path: Path) -> None:
    lines = (json.dumps({"id": str(i), "text": f"text number {i}"}) for i in range(50))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    code = (
        "import contextlib, io, sys, threading\n"
        f"{_IMPORTED_BY}"
        "from sfembed._cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['embed', '--local', 'in.jsonl', '--out', 'out.npy', '--no-cache',\n"
        "                 '--no-progress', '--model', 'BAAI/bge-m3']) == 0\n"
        "assert by['sfembed._job'] == 'MainThread', by\n"
        "assert by['aiohttp'] != 'MainThread', by\n"
        "assert collecting == [False] and gc.isenabled()  # off while they load, then on"
    )
    modules = _modules_after(code, tmp_path)
    assert {"sfembed._job", "sfembed._testing.server"} <= modules
    assert (tmp_path / "out.npy").exists()
    # The local server's parts only: not the corpus generator or the Redis server beside it.
    unwanted = {
        "tqdm",
        "tokenizers",
        "sfembed._estimate",
        "multiprocessing",
        "sfembed._corpus",
        "sfembed._testing.redis_server",
        "importlib.resources",  # only to load a bundled tokenizer
    }
    assert not modules & (unwanted | OPTIONAL)


async def test_a_job_against_a_server_loads_no_local_server_tokenizer_or_optional_library(
    tmp_path: Path,
) -> None:
    from sfembed.testing import LocalServer

    lines = (json.dumps({"id": str(i), "text": f"text number {i}"}) for i in range(50))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    async with LocalServer() as server:
        code = (
            "import contextlib, io, sys, json, threading\n"
            f"{_IMPORTED_BY}"
            "from sfembed._cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    code = main(['embed', 'in.jsonl', '--out', 'out.npy', '--base-url', "
            f"'{server.url}', '--model', 'BAAI/bge-m3'])\n"
            "print(code, json.dumps([sorted(sys.modules), by]))"
        )
        job = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            cwd=tmp_path,
            env={**os.environ, "SILICONFLOW_API_KEY": "sk-local-test"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await job.communicate()
    code, listed = out.decode().splitlines()[-1].split(" ", 1)
    assert code == "0", err.decode()
    names, by = json.loads(listed)
    modules = set(names)
    # aiohttp loads on a thread of its own while the job's modules load on the main thread
    assert by["sfembed._job"] == "MainThread"
    assert by["aiohttp"] != "MainThread"
    assert "sfembed._cache" in modules  # the default job: cache on, progress bar on
    unwanted = {
        "sfembed.testing",
        "sfembed._testing",
        "aiohttp.web",
        "tokenizers",
        "multiprocessing",
        "tomllib",  # no config or models file named
        "tenacity",  # loaded at a first retry: this job has none
        "sfembed._quota",  # a shared quota's: none named
        # Loaded where used: a report, a failure or a resume; LanceDB output; a text that may be
        # over the limit; a proxy's HTML error page; a glob or a .gz input.
        "sfembed._report",
        "sfembed._lance",
        "sfembed._tokenizer_process",
        "html",
        "glob",
        "gzip",
    }
    assert not modules & (unwanted | OPTIONAL)


async def test_the_bar_counts_its_total_beside_the_job_and_stops_counting_when_it_ends() -> None:
    counting, finished = threading.Event(), threading.Event()
    stopped: list[bool] = []

    def count(stop: threading.Event) -> int | None:
        counting.set()
        stopped.append(stop.wait(timeout=30))  # a count still going when the job ends
        finished.set()
        return None

    out = io.StringIO()
    async with TqdmProgress(count=count, file=out, show_after_s=3600) as bar:
        assert await asyncio.to_thread(counting.wait, 30)
        bar.update(JobStats(rows=3))
        assert not stopped
    assert await asyncio.to_thread(finished.wait, 30)
    assert stopped == [True]
    assert "3rec" in out.getvalue()


async def test_the_bar_draws_itself_unasked() -> None:
    out = io.StringIO()
    async with TqdmProgress(count=lambda stop: 40, file=out, show_after_s=0):
        await asyncio.sleep(0.05)  # the bar is due at once; no update comes
    assert "0/40" in out.getvalue()  # drawn before its total was known, or after


async def test_the_bar_shows_the_total_counted_beside_the_job() -> None:
    out = io.StringIO()
    async with TqdmProgress(count=lambda stop: 40, file=out, show_after_s=3600) as bar:
        bar.update(JobStats(rows=10))
        bar.last = JobStats(rows=40)
    assert "40/40" in out.getvalue()


async def test_a_job_that_ends_before_its_first_row_draws_no_bar() -> None:
    out = io.StringIO()
    async with TqdmProgress(count=lambda stop: 10, file=out, show_after_s=3600):
        pass
    assert out.getvalue() == ""


async def test_a_fresh_job_sends_while_its_input_is_hashed_and_records_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hash is held until the server has seen a request: a job that hashed its input before
    # sending would hold it until the deadline, and this fails.
    from sfembed import EmbeddingClient, RateLimits, _manifest, load_settings
    from sfembed._job import run_job
    from sfembed.testing import LocalServer

    source = tmp_path / "in.jsonl"
    lines = (json.dumps({"id": str(i), "text": f"text number {i}"}) for i in range(300))
    source.write_text("\n".join(lines) + "\n")
    real = _manifest._identify
    server = LocalServer()
    seen_by_hash: list[int] = []

    def held(path: Path) -> _manifest.InputIdentity:
        deadline = time.monotonic() + 20
        while server.stats.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_by_hash.append(server.stats.requests)
        return real(path)

    monkeypatch.setattr(_manifest, "_identify", held)
    settings = load_settings(rate=RateLimits(rpm=10**6, tpm=10**9))
    settings = replace(settings, io=replace(settings.io, cache=False, checkpoint_rows=64))
    async with server, EmbeddingClient(api_key="sk-local-test", base_url=server.url) as client:
        out = tmp_path / "out.npy"
        summary = await run_job(source, out, replace(settings, base_url=server.url), client=client)
        assert summary.rows == 300
        assert seen_by_hash[0] >= 1
        manifest = _manifest.load_manifest(_manifest.manifest_path_for(out))
        assert manifest is not None
        assert manifest.complete
        assert manifest.input[0].sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        requests = server.stats.requests
        again = await run_job(
            source, out, replace(settings, base_url=server.url), client=client, resume=True
        )
        assert again.rows == 300
        assert server.stats.requests == requests  # complete already: nothing sent


async def test_the_first_request_waits_for_its_own_records_not_a_whole_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sfembed import EmbeddingClient, RateLimits, embed, load_settings
    from sfembed._intake import BLOCK
    from sfembed.testing import LocalServer

    consumed: list[int] = []
    read_at_first_send: list[int] = []
    real = EmbeddingClient.embed_within  # what the sending stage calls

    async def noting(self: EmbeddingClient, *args: Any, **kwargs: Any) -> Any:
        if not read_at_first_send:
            read_at_first_send.append(len(consumed))
        return await real(self, *args, **kwargs)

    def texts() -> Iterator[str]:
        for i in range(2 * BLOCK):
            consumed.append(i)
            yield f"text number {i}"

    monkeypatch.setattr(EmbeddingClient, "embed_within", noting)
    async with LocalServer() as server:
        settings = load_settings(base_url=server.url, rate=RateLimits(rpm=10**6, tpm=10**9))
        async with EmbeddingClient(api_key="sk-local-test", base_url=server.url) as client:
            rows = await embed(texts(), model="BAAI/bge-m3", settings=settings, client=client)
    assert len(rows) == 2 * BLOCK
    assert 0 < read_at_first_send[0] < BLOCK


async def test_the_first_request_reaches_a_server_in_this_process_before_the_third_block() -> None:
    # The intake gives the event loop turns after its first blocks: a connection and a server
    # in this process need several turns to carry the first request, and one turn between two
    # blocks let the intake read the whole input first.
    from sfembed import EmbeddingClient, RateLimits, embed, load_settings
    from sfembed._intake import _FIRST_BLOCKS, BLOCK
    from sfembed.testing import LocalServer

    read_when_it_arrived: list[int] = []
    async with LocalServer() as server:

        def texts() -> Iterator[str]:
            for i in range(4 * BLOCK):
                if not read_when_it_arrived and server.stats.first_request_at is not None:
                    read_when_it_arrived.append(i)
                yield f"text number {i}"

        settings = load_settings(base_url=server.url, rate=RateLimits(rpm=10**6, tpm=10**9))
        async with EmbeddingClient(api_key="sk-local-test", base_url=server.url) as client:
            rows = await embed(texts(), model="BAAI/bge-m3", settings=settings, client=client)
    assert len(rows) == 4 * BLOCK
    assert read_when_it_arrived
    assert read_when_it_arrived[0] <= _FIRST_BLOCKS[0] + _FIRST_BLOCKS[1]


def test_a_new_npy_output_is_not_synced_before_the_first_request_its_first_commit_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job opens its output before its first request: nothing vouches for the empty file
    # yet, and an fsync there waited for the disk. The first commit (a checkpoint) syncs.
    import numpy as np

    from sfembed._types import EmbeddedBatch
    from sfembed._writers import NpyWriter

    synced: list[int] = []
    real = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(descriptor)
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = NpyWriter(tmp_path / "out.npy", dims=4, fsync=True)
    try:
        assert synced == []
        assert np.load(tmp_path / "out.npy").shape == (0, 4)  # a valid file all the same
        writer.write(["a"], EmbeddedBatch(np.arange(1), np.ones((1, 4), np.float32)))
        writer.commit()
        assert len(synced) >= 2  # the data and the sidecar
    finally:
        writer.close()
    assert np.load(tmp_path / "out.npy").shape == (1, 4)


def test_a_local_server_starts_without_its_token_class_table_and_fills_what_texts_bring(
    tmp_path: Path,
) -> None:
    # The whole table took 27 ms of the demo's start, before its first request.
    code = (
        "import asyncio\n"
        "from sfembed._testing import tokenizer\n"
        "from sfembed.testing import LocalServer\n"
        "async def start() -> None:\n"
        "    async with LocalServer():\n"
        "        pass\n"
        "asyncio.run(start())\n"
        "print(int((tokenizer._bmp_classes.table != tokenizer._bmp_classes.UNKNOWN).sum()))\n"
        "print(tokenizer.text_tokens(['abc 12', 'xyz']))\n"
        "print(int((tokenizer._bmp_classes.table != tokenizer._bmp_classes.UNKNOWN).sum()))"
    )
    printed = _python(code, tmp_path).split("\n")[:3]
    assert printed == ["0", "[2, 1]", "10"]  # "\n" joins: a, b, c, 1, 2, ...
