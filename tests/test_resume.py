"""Resuming a job stopped at any moment: `sfembed embed --resume` against a real LocalServer.

The CLI runs as a child process, so that it can be killed or signalled for real, while the server
runs in the test's event loop and counts what it is sent. A job is stopped once its manifest shows
a checkpoint with rows; the resumed run must leave the output, the id sidecar and the errors file
byte-identical to an uninterrupted run's, without sending the records done again. A refused
resume names what differs and changes no file. Uninterrupted reference runs, and the jobs
cancelled mid-run, go through ``run_job`` in this process: the same code writes the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pickle
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from sfembed import (
    DEFAULT_CATALOG,
    BatchLimits,
    ConfigError,
    EmbeddedBatch,
    EmbeddingClient,
    IOSettings,
    RateLimits,
    Settings,
    load_settings,
)
from sfembed import _job as job_module
from sfembed._diskthread import DiskThread
from sfembed._job import JobSummary, run_job
from sfembed._jobfiles import staged_path
from sfembed._manifest import Manifest, load_manifest, manifest_path_for
from sfembed._writers import Committed, NpyWriter, ids_path_for, open_writer
from sfembed.testing import Faults, LocalServer, count_tokens, synthetic_corpus

#: The ``make_server`` fixture of conftest: ``await make_server(**ServerConfig fields)``.
MakeServer = Callable[..., Awaitable[LocalServer]]

KEY = "sk-local-test"
KEY_ENV = "SFEMBED_RESUME_TEST_KEY"
EN = "BAAI/bge-large-en-v1.5"  # 512 tokens: most synthetic documents are cut into chunks
M3 = "BAAI/bge-m3"  # 8,192 tokens: short documents go whole (and its tokenizer is never loaded)
UNLIMITED = RateLimits(rpm=10**7, tpm=10**10)
FAST = Faults()
#: A job of a few hundred records then lasts a few seconds at concurrency 2.
SLOW = Faults(latency_s=0.05)
#: Every request from now on is answered only after the test is over.
HANG = Faults(latency_s=60.0)
#: The knobs of every run, as CLI flags (``cli_args``) and as Settings (``settings_for``).
CONCURRENCY, BATCH, CHECKPOINT_ROWS = 2, 8, 50
LONG_CHARS = 12_000  # every ``long_every``-th document: thousands of tokens
POLL_S = 0.005
WAIT_S = 50.0  # bound on any wait (pytest's own timeout is 60 s per test)


# --- corpora -------------------------------------------------------------------------------------


def corpus(count: int, *, seed: int, long_every: int = 0, bad: bool = True) -> list[bytes]:
    """JSONL lines of unique documents, every ``long_every``-th one over-long; with ``bad``, three
    unusable lines (so an errors file), the first of them in the first checkpoint."""
    texts = synthetic_corpus(count, seed=seed, long_every=long_every, long_chars=LONG_CHARS)
    lines = [orjson.dumps({"id": f"doc-{n}", "text": f"{n}. {t}"}) for n, t in enumerate(texts)]
    if bad:
        lines[2] = b'{"id": "doc-2", "text": '  # malformed JSON
        lines[count // 3] = orjson.dumps({"id": f"doc-{count // 3}", "text": "  "})
        lines[2 * count // 3] = orjson.dumps({"id": f"doc-{2 * count // 3}", "body": "x"})
    return lines


def write_lines(path: Path, lines: Sequence[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def texts_of(lines: Sequence[bytes]) -> list[str]:
    """The texts of ``lines`` that a job sends (the unusable ones it does not)."""
    texts = []
    for line in lines:
        with contextlib.suppress(orjson.JSONDecodeError):
            text = orjson.loads(line).get("text", "")
            if text.strip():
                texts.append(text)
    return texts


# --- files ---------------------------------------------------------------------------------------


def errors_path_for(out: Path) -> Path:
    return Path(f"{out}.errors.jsonl")


def paths_of(out: Path) -> dict[str, Path]:
    """A job's files by their manifest role: output, id sidecar (``.npy``), errors file."""
    paths = {"output": out, "errors": errors_path_for(out)}
    if out.suffix == ".npy":
        paths["ids"] = ids_path_for(out)
    return paths


def outputs(out: Path) -> dict[str, bytes | None]:
    """The bytes of each of a job's files; None when absent."""
    return {role: p.read_bytes() if p.exists() else None for role, p in paths_of(out).items()}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder``, the manifest and any temporary file included."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def manifest_of(out: Path) -> Manifest:
    manifest = load_manifest(manifest_path_for(out))
    assert manifest is not None
    return manifest


def checkpoint_with_rows(out: Path) -> Manifest | None:
    """The manifest if its checkpoint holds rows, else None.

    Whether a kill then leaves bytes past the checkpoint is left to chance: the ``.npy`` rows are
    staged in memory and reach the file only at a checkpoint or a full stage, so the output is
    longer than its manifest says only for a moment. The torn-writes test writes such bytes
    itself."""
    path = manifest_path_for(out)
    manifest = load_manifest(path) if path.exists() else None  # replaced atomically
    if manifest is None or manifest.checkpoint.rows == 0:
        return None
    return manifest


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


# --- in-process runs -----------------------------------------------------------------------------


def settings_for(server: LocalServer, model: str = EN, **options: Any) -> Settings:
    """The settings of the CLI runs (``cli_args``), for ``run_job`` in this process."""
    return load_settings(
        model=model,
        base_url=server.url,
        rate=UNLIMITED,
        concurrency=CONCURRENCY,
        batch=BatchLimits(max_items=BATCH),
        io=IOSettings(cache=False, checkpoint_rows=CHECKPOINT_ROWS),
        **options,
    )


async def job(
    server: LocalServer, source: Path, out: Path, settings: Settings, **options: Any
) -> JobSummary:
    out.parent.mkdir(parents=True, exist_ok=True)
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        return await run_job(source, out, settings, client=client, **options)


async def reference(
    server: LocalServer, source: Path, out: Path, settings: Settings
) -> dict[str, bytes | None]:
    """The files of an uninterrupted run."""
    await job(server, source, out, settings)
    assert manifest_of(out).complete
    return outputs(out)


def job_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the pipeline's stages still alive."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and task.get_name().startswith("sfembed:")
    ]


async def cancelled(server: LocalServer, source: Path, out: Path, settings: Settings) -> Manifest:
    """A ``run_job`` task cancelled on a slow server once a checkpoint holds rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    server.set_faults(SLOW)
    try:
        async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
            task = asyncio.create_task(run_job(source, out, settings, client=client))
            for _ in range(int(WAIT_S / POLL_S)):
                assert not task.done(), "the job ended before it could be cancelled"
                if checkpoint_with_rows(out) is not None:
                    break
                await asyncio.sleep(POLL_S)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert job_tasks() == []
    finally:
        server.set_faults(FAST)
    manifest = manifest_of(out)
    assert not manifest.complete
    assert manifest.checkpoint.records > 0
    return manifest


# --- child processes -----------------------------------------------------------------------------


@dataclass(slots=True)
class Done:
    code: int
    out: str
    err: str


@dataclass(slots=True)
class Child:
    """``sfembed embed`` running in a child process; its output is read as it comes."""

    process: asyncio.subprocess.Process
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _CHILDREN.append(self)
        for stream, into in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            assert stream is not None
            self.readers.append(asyncio.create_task(_read(stream, into)))

    async def done(self) -> Done:
        await asyncio.wait_for(asyncio.gather(self.process.wait(), *self.readers), WAIT_S)
        assert self.process.returncode is not None
        return Done(self.process.returncode, self.stdout.decode(), self.stderr.decode())

    async def kill(self) -> Done:
        self.process.kill()  # SIGKILL: no cleanup of any kind
        return await self.done()

    async def says(self, text: str) -> None:
        """Wait until the child has written ``text`` to stderr."""
        for _ in range(int(WAIT_S / POLL_S)):
            if text.encode() in self.stderr:
                return
            assert self.process.returncode is None, self.stderr.decode()
            await asyncio.sleep(POLL_S)
        raise AssertionError(f"never said {text!r}")

    async def checkpointed(self, out: Path) -> Manifest:
        """The manifest once it holds rows (see ``checkpoint_with_rows``); the child must still
        be running then."""
        for _ in range(int(WAIT_S / POLL_S)):
            if self.process.returncode is not None:
                raise AssertionError(
                    f"the job ended before it could be stopped: {await self.done()}"
                )
            manifest = checkpoint_with_rows(out)
            if manifest is not None:
                return manifest
            await asyncio.sleep(POLL_S)
        raise AssertionError("no checkpoint with rows")


async def _read(stream: asyncio.StreamReader, into: bytearray) -> None:
    while piece := await stream.read(1 << 16):
        into += piece


_CHILDREN: list[Child] = []


@pytest.fixture(autouse=True)
async def _no_child_left_behind() -> AsyncIterator[None]:
    """A test that fails half way still ends its children, and reads them to the end."""
    yield
    while _CHILDREN:
        child = _CHILDREN.pop()
        if child.process.returncode is None:
            child.process.kill()
        await child.done()


def cli_args(server: LocalServer, source: Path, out: Path, model: str) -> list[str]:
    return [
        *(str(source), "--out", str(out), "--base-url", server.url, "--api-key-env", KEY_ENV),
        *("--model", model, "--no-progress", "--no-cache"),
        *("--rpm", str(UNLIMITED.rpm), "--tpm", str(UNLIMITED.tpm)),
        *("--concurrency", str(CONCURRENCY), "--batch-size", str(BATCH)),
        *("--checkpoint-rows", str(CHECKPOINT_ROWS)),
    ]


async def start(
    server: LocalServer, source: Path, out: Path, *extra: str, key: str = KEY, model: str = EN
) -> Child:
    """``sfembed embed`` in a child process, every warning an error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, KEY_ENV: key, "PYTHONWARNINGS": "error"}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-W", "error", "-m", "sfembed", "embed"),
        *cli_args(server, source, out, model),
        *extra,
        env=env,
        cwd=out.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Child(process)


async def cli(server: LocalServer, source: Path, out: Path, *extra: str, **options: Any) -> Done:
    done = await (await start(server, source, out, *extra, **options)).done()
    assert_clean(done)
    return done


def assert_clean(done: Done) -> None:
    """Nothing left behind: no unclosed session or file, no task destroyed while pending."""
    for sign in ("nclosed", "Task was destroyed", "Traceback", "Exception ignored", "Warning"):
        assert sign not in done.err, done.err


async def killed(server: LocalServer, source: Path, out: Path) -> Manifest:
    """A CLI job SIGKILLed on a slow server past a checkpoint with rows; its manifest."""
    server.set_faults(SLOW)
    try:
        child = await start(server, source, out)
        await child.checkpointed(out)
        done = await child.kill()
    finally:
        server.set_faults(FAST)
    assert done.code == -signal.SIGKILL
    manifest = manifest_of(out)
    assert not manifest.complete
    assert manifest.checkpoint.records > 0
    return manifest


# --- 1. SIGKILL, then --resume -------------------------------------------------------------------


async def test_a_killed_job_resumes_byte_identical_without_resending_done_records(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server, resumed_on, tail_on = [await make_server() for _ in range(3)]
    lines = corpus(600, seed=11, long_every=50)
    source = write_lines(tmp_path / "in.jsonl", lines)
    settings = settings_for(server)
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings)
    everything = server.stats.tokens_accepted
    assert expected["errors"] is not None  # the bad lines
    out = tmp_path / "job" / "out.npy"

    manifest = await killed(server, source, out)
    # Requests of the killed child may still reach ``server``: the resumed run has its own.
    resumed = await cli(resumed_on, source, out, "--resume")

    assert resumed.code == 1, resumed.err  # the bad lines failed
    assert f"{'resumed after':<16}{manifest.checkpoint.records:,} records" in resumed.out
    assert outputs(out) == expected
    assert np.load(out).shape == (len(lines), 1024)
    assert manifest_of(out).complete
    # The records after the checkpoint were sent, and no others. The server charges a record the
    # same tokens wherever it stands in the input (split by the same cuts, refused and halved
    # alike), so an uninterrupted run over just those records is charged exactly as much.
    tail = write_lines(tmp_path / "tail" / "in.jsonl", lines[manifest.checkpoint.records :])
    await reference(tail_on, tail, tmp_path / "tail" / "out.npy", settings)
    assert resumed_on.stats.tokens_accepted == tail_on.stats.tokens_accepted
    assert 0 < resumed_on.stats.tokens_accepted < everything


# --- 2. torn writes ------------------------------------------------------------------------------


async def test_torn_writes_past_the_checkpoint_are_discarded(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", corpus(500, seed=12, long_every=40))
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings_for(server))
    out = tmp_path / "job" / "out.npy"
    manifest = await killed(server, source, out)
    assert manifest.checkpoint.lengths["errors"] > 0  # the bad line 3 is in the first checkpoint
    # What a crash mid-write leaves: part of a row, part of a sidecar line, part of an errors
    # entry, and a manifest half written to its temporary file.
    append(out, np.array([1.5, np.nan, 7.0], np.float32).tobytes() + b"\x00\xff")
    append(ids_path_for(out), b'{"row": 999999, "id": "torn')
    append(errors_path_for(out), b'{"id": "doc-999999", "line": 1000000, "reason": "to')
    temporary = out.parent / f".{manifest_path_for(out).name}.tmp"
    temporary.write_bytes(b'{"format": "sfembed-manifest", "version": 1, "complete": tr')

    resumed = await cli(server, source, out, "--resume")

    assert resumed.code == 1, resumed.err
    assert outputs(out) == expected
    assert not temporary.exists()
    assert manifest_of(out).complete


async def test_a_file_cut_shorter_than_its_checkpoint_is_refused_naming_it(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", corpus(500, seed=13, long_every=40))
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings_for(server))
    out = tmp_path / "job" / "out.npy"
    lengths = (await killed(server, source, out)).checkpoint.lengths
    for role, path in paths_of(out).items():
        whole = path.read_bytes()
        path.write_bytes(whole[: lengths[role] - 1])
        before = snapshot(out.parent)
        before.pop(".out.npy.lock", None)  # the killed job's: the next job removes it as it ends

        refused = await cli(server, source, out, "--resume")

        assert refused.code == 2, refused.err
        assert f"cannot resume: {str(path)!r} holds {lengths[role] - 1} bytes" in refused.err
        assert snapshot(out.parent) == before  # nothing cut, nothing written
        path.write_bytes(whole)  # mended, the job resumes as if nothing had happened

    resumed = await cli(server, source, out, "--resume")
    assert resumed.code == 1, resumed.err
    assert outputs(out) == expected


@pytest.mark.parametrize("damage", ["output", "ids", "errors", "foreign"])
async def test_a_refused_resume_changes_no_file(
    server: LocalServer, tmp_path: Path, damage: str
) -> None:
    """In process, each file in turn cut short (or the output replaced by another .npy) among
    files holding torn writes: the refusal names it and cuts none of them back."""
    source = write_lines(tmp_path / "in.jsonl", corpus(300, seed=14, long_every=30))
    out = tmp_path / "job" / "out.npy"
    settings = settings_for(server)
    manifest = await cancelled(server, source, out, settings)
    lengths = manifest.checkpoint.lengths
    assert lengths["errors"] > 0
    paths = paths_of(out)
    for path in paths.values():
        append(path, b"torn")
    if damage == "foreign":
        damaged = out  # longer than the checkpoint says, but not this job's
        np.save(out, np.ones((manifest.checkpoint.rows * 1000, 7), np.float32))
    else:
        damaged = paths[damage]
        damaged.write_bytes(damaged.read_bytes()[: lengths[damage] - 1])
    before = snapshot(out.parent)

    with pytest.raises(ConfigError, match="cannot resume") as refused:
        await job(server, source, out, settings, resume=True)

    assert str(damaged) in str(refused.value)
    assert snapshot(out.parent) == before


@pytest.mark.parametrize("damage", ["ids", "foreign"])
def test_the_npy_writer_checks_both_files_before_cutting_either(
    tmp_path: Path, damage: str
) -> None:
    out = tmp_path / "out.npy"

    def rows(first: int, count: int) -> EmbeddedBatch:
        return EmbeddedBatch(np.arange(first, first + count), np.ones((count, 4), np.float32))

    with open_writer(out, dims=4) as writer:
        writer.write(["a", "b"], rows(0, 2))
        committed = writer.commit()
        writer.write(["c"], rows(2, 1))  # past the commit: a torn write, to be cut on resume
    if damage == "ids":
        ids_path_for(out).write_bytes(
            ids_path_for(out).read_bytes()[: committed.lengths["ids"] - 1]
        )
    else:
        np.save(out, np.zeros((1000, 7), np.float32))
    before = snapshot(tmp_path)

    with pytest.raises(ConfigError, match="cannot resume"):
        open_writer(out, dims=4, resume=committed)

    assert snapshot(tmp_path) == before


# --- 3. refusals naming what differs -------------------------------------------------------------


async def test_a_resume_with_other_settings_or_input_is_refused_naming_the_difference(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", corpus(300, seed=15, long_every=30))
    settings = settings_for(server)
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings)
    out = tmp_path / "job" / "out.npy"
    await cancelled(server, source, out, settings)
    append(ids_path_for(out), b'{"row": 1')  # a torn write: a refusal leaves even that alone
    before = snapshot(out.parent)
    shorter = tmp_path / "shorter.toml"  # the model offers 256 here: only the setting differs
    shorter.write_text(f'[models."{EN}"]\naccepts_dimensions = true\ndimensions = [256, 1024]\n')
    changed = {
        "dimensions": ["--config", str(shorter), "--dimensions", "256"],
        "model": ["--model", M3],
        "long_mode": ["--long", "chunks"],
        "io.text_field": ["--text-field", "body"],
        "errors file": ["--errors", str(tmp_path / "elsewhere.jsonl")],
    }
    # One after the other: a second job on the same output at once is refused (it is locked).
    refusals = [await cli(server, source, out, "--resume", *flags) for flags in changed.values()]
    for key, refused in zip(changed, refusals, strict=True):
        assert refused.code == 2, (key, refused.err)
        assert f"cannot resume: setting {key} was " in refused.err, refused.err
    assert snapshot(out.parent) == before

    original, status = source.read_bytes(), source.stat()

    def rewrite(content: bytes) -> None:
        source.write_bytes(content)
        os.utime(source, ns=(status.st_atime_ns, status.st_mtime_ns))  # the same mtime

    appended = original + orjson.dumps({"id": "late", "text": "one more"}) + b"\n"
    altered = original.replace(b"doc-7", b"doc-8", 1)  # the same size, other bytes
    assert len(altered) == len(original)
    for content, differs in ((appended, "size"), (altered, "sha256")):
        rewrite(content)
        refused = await cli(server, source, out, "--resume")
        assert refused.code == 2, refused.err
        assert f"cannot resume: the input's {differs} was " in refused.err, refused.err
        assert snapshot(out.parent) == before

    rewrite(original)  # the input as it was: the job resumes
    resumed = await cli(server, source, out, "--resume")
    assert resumed.code == 1, resumed.err
    assert outputs(out) == expected


# --- 4. no manifest; a complete job --------------------------------------------------------------


async def test_resume_without_a_manifest_starts_over_and_a_complete_job_sends_nothing(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", corpus(200, seed=16))
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings_for(server))
    out = tmp_path / "job" / "out.npy"
    out.parent.mkdir()
    # Left by a run killed before its first checkpoint; no manifest: not a job to continue.
    staged_path(out).write_bytes(b"left over from some other run")
    staged_path(ids_path_for(out)).write_bytes(b'{"row": 0, "id": "stale"}\n')

    first = await cli(server, source, out, "--resume")

    assert first.code == 1, first.err
    assert "resumed after" not in first.out
    assert outputs(out) == expected
    assert manifest_of(out).complete
    before = snapshot(out.parent)
    requests = server.stats.requests

    again = await cli(server, source, out, "--resume")

    assert again.code == 1, again.err
    assert "resumed after" in again.out
    assert server.stats.requests == requests
    assert snapshot(out.parent) == before


# --- 5. in process: .jsonl output, chunks mode, Parquet ------------------------------------------


async def test_a_cancelled_jsonl_job_resumes_byte_identical_sending_each_record_once(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server, resumed_on = await make_server(), await make_server()
    lines = corpus(400, seed=17)  # all short for bge-m3: each record is one item
    source = write_lines(tmp_path / "in.jsonl", lines)
    settings = settings_for(server, model=M3)
    expected = await reference(server, source, tmp_path / "ref" / "out.jsonl", settings)
    assert expected["errors"] is not None
    out = tmp_path / "job" / "out.jsonl"
    done = (await cancelled(server, source, out, settings)).checkpoint.records
    append(out, b'{"id": "doc-torn", "embedding": [0.12')

    summary = await job(resumed_on, source, out, settings, resume=True)

    assert outputs(out) == expected
    assert summary.resumed_records == done
    assert (summary.records, summary.rows, summary.failed) == (len(lines), len(lines), 3)
    # Each record after the checkpoint was sent once, whole: exactly their tokens were charged.
    spec = DEFAULT_CATALOG[M3]
    resent = sum(count_tokens(text, spec) for text in texts_of(lines[done:]))
    assert resumed_on.stats.tokens_accepted == resent
    assert 0 < resent < server.stats.tokens_accepted


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
async def test_a_cancelled_chunks_job_resumes_byte_identical(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    straddled = 0

    class Carry(job_module._Carry):  # counts records whose rows came in more than one batch
        def whole(self, batch: EmbeddedBatch) -> EmbeddedBatch | None:
            nonlocal straddled
            held = self.held
            straddled += held is not None and held.positions[-1] == batch.positions[0]
            return super().whole(batch)

    monkeypatch.setattr(job_module, "_Carry", Carry)
    lines = corpus(300, seed=18, long_every=25)
    source = write_lines(tmp_path / "in.jsonl", lines)
    settings = settings_for(server, long_mode="chunks")
    expected = await reference(server, source, tmp_path / "ref" / f"out{suffix}", settings)
    out = tmp_path / "job" / f"out{suffix}"
    manifest = await cancelled(server, source, out, settings)
    assert manifest.checkpoint.rows > manifest.checkpoint.records  # records of several chunks
    straddled = 0

    summary = await job(server, source, out, settings, resume=True)

    assert straddled > 0
    assert outputs(out) == expected
    assert summary.resumed_records == manifest.checkpoint.records
    assert summary.records == len(lines)


async def test_parquet_output_cannot_be_resumed(server: LocalServer, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", corpus(20, seed=19))
    out = tmp_path / "out.parquet"
    with pytest.raises(ConfigError, match="Parquet file cannot be resumed"):
        await job(server, source, out, settings_for(server, model=M3), resume=True)
    refused = await cli(server, source, out, "--resume", model=M3)
    assert refused.code == 2
    assert "Parquet file cannot be resumed" in refused.err
    assert not out.exists()
    assert server.stats.requests == 0


# --- 6. signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_signal_stops_the_job_after_a_checkpoint_with_75(
    server: LocalServer, tmp_path: Path, number: signal.Signals
) -> None:
    lines = corpus(500, seed=20, long_every=40)
    source = write_lines(tmp_path / "in.jsonl", lines)
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings_for(server))
    out = tmp_path / "job" / "out.npy"
    server.set_faults(SLOW)
    try:
        child = await start(server, source, out)
        await child.checkpointed(out)
        child.process.send_signal(number)
        stopped = await child.done()
    finally:
        server.set_faults(FAST)

    assert stopped.code == 75, stopped
    assert_clean(stopped)
    assert "sfembed: stopping" in stopped.err
    manifest = manifest_of(out)
    assert not manifest.complete
    assert manifest.checkpoint.records < len(lines)
    # The last checkpoint is where the job says it stopped, and says how to go on.
    stopped_after = (
        f"stopped after {manifest.checkpoint.records:,} records; run again with --resume"
    )
    assert stopped_after in stopped.err
    resumed = await cli(server, source, out, "--resume")
    assert resumed.code == 1, resumed.err
    assert outputs(out) == expected


async def hung_job(server: LocalServer, source: Path, out: Path, *extra: str) -> Child:
    """A CLI job past a checkpoint with rows, whose every request in flight now hangs."""
    server.set_faults(SLOW)
    child = await start(server, source, out, *extra)
    await child.checkpointed(out)
    server.set_faults(HANG)
    sent = server.stats.requests
    for _ in range(int(WAIT_S / POLL_S)):  # as many requests as senders, none to be answered
        if server.stats.requests >= sent + CONCURRENCY:
            return child
        await asyncio.sleep(POLL_S)
    raise AssertionError("no request hangs")


async def test_a_second_sigint_exits_at_once_with_130_still_resumable(
    server: LocalServer, tmp_path: Path
) -> None:
    lines = corpus(500, seed=21, long_every=40)
    source = write_lines(tmp_path / "in.jsonl", lines)
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings_for(server))
    out = tmp_path / "job" / "out.npy"
    try:
        child = await hung_job(server, source, out)
        child.process.send_signal(signal.SIGINT)
        await child.says("sfembed: stopping")  # now waiting for requests that never end
        child.process.send_signal(signal.SIGINT)
        stopped = await child.done()
    finally:
        server.set_faults(FAST)

    assert stopped.code == 130, stopped
    assert_clean(stopped)
    assert "exited at once; run again with --resume" in stopped.err
    manifest = manifest_of(out)
    assert not manifest.complete
    assert 0 < manifest.checkpoint.records < len(lines)
    resumed = await cli(server, source, out, "--resume")
    assert resumed.code == 1, resumed.err
    assert outputs(out) == expected


async def test_a_stop_whose_grace_period_runs_out_still_ends_with_75(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", corpus(500, seed=23, long_every=40))
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings_for(server))
    out = tmp_path / "job" / "out.npy"
    try:
        child = await hung_job(server, source, out, "--grace-s", "0.5")
        child.process.send_signal(signal.SIGINT)  # once: the requests in flight never end
        stopped = await child.done()
    finally:
        server.set_faults(FAST)

    assert_clean(stopped)
    manifest = manifest_of(out)
    assert not manifest.complete
    resumed = await cli(server, source, out, "--resume")
    assert resumed.code == 1, resumed.err
    assert outputs(out) == expected
    # One signal, a checkpoint, resumable: as the README says, 75, and not "exited at once".
    assert stopped.code == 75, stopped
    assert f"stopped after {manifest.checkpoint.records:,} records" in stopped.err


# --- 7. the key ----------------------------------------------------------------------------------


async def test_no_manifest_holds_the_api_key(make_server: MakeServer, tmp_path: Path) -> None:
    secret = "sk-resume-secret-7f3a9c0e2b5d4186"
    server = await make_server(api_key=secret)
    source = write_lines(tmp_path / "in.jsonl", corpus(300, seed=22, long_every=30))
    out = tmp_path / "job" / "out.npy"
    written = []
    server.set_faults(SLOW)
    try:
        child = await start(server, source, out, key=secret)
        await child.checkpointed(out)
        written.append(manifest_path_for(out).read_bytes())
        await child.kill()
    finally:
        server.set_faults(FAST)
    written.append(manifest_path_for(out).read_bytes())
    resumed = await cli(server, source, out, "--resume", key=secret)
    assert resumed.code == 1, resumed.err
    assert manifest_of(out).complete
    written.extend(snapshot(out.parent).values())
    for data in written:
        assert secret.encode() not in data
        assert secret[3:].encode() not in data


# --- known gaps (see the reasons) -----------------------------------------------------------------


async def test_resuming_a_complete_job_whose_output_was_cut_short_is_refused(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", corpus(100, seed=22))
    settings = settings_for(server, model=M3)
    out = tmp_path / "job" / "out.npy"
    await reference(server, source, out, settings)
    assert manifest_of(out).complete
    with out.open("r+b") as file:
        file.truncate(out.stat().st_size - 4096)  # the last row lost
    requests = server.stats.requests

    with pytest.raises(ConfigError, match="cannot resume") as refused:
        await job(server, source, out, settings, resume=True)

    assert str(out) in str(refused.value)
    assert server.stats.requests == requests


class _Killed(BaseException):
    """The process dying, as far as the code running in it can tell."""


async def test_a_run_from_scratch_killed_before_its_first_checkpoint_does_not_pass_for_done(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_lines(tmp_path / "in.jsonl", corpus(100, seed=23))
    settings = settings_for(server, model=M3)
    out = tmp_path / "job" / "out.npy"
    expected = await reference(server, source, out, settings)  # complete
    assert manifest_of(out).complete

    def killed(path: Path, manifest: Manifest) -> None:
        raise _Killed  # at the run's first manifest: its files are open, and truncated

    monkeypatch.setattr(job_module, "save_manifest", killed)
    monkeypatch.setattr("sfembed._jobfiles.save_manifest", killed)  # a fresh run's first
    with pytest.raises(_Killed):
        await job(server, source, out, settings)  # started over (say, after a refusal)
    monkeypatch.undo()

    try:
        await job(server, source, out, settings, resume=True)
    except ConfigError:
        return  # refused: fine, nothing is lost
    assert outputs(out) == expected  # or really done


async def test_an_errors_file_no_manifest_names_is_refused_and_left_alone(
    server: LocalServer, tmp_path: Path
) -> None:
    """Only an errors file that the earlier run of this output wrote may be replaced."""
    source = write_lines(tmp_path / "in.jsonl", corpus(100, seed=24, bad=False))
    settings = settings_for(server, model=M3)
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings)
    assert expected["errors"] is None
    out = tmp_path / "job" / "out.npy"
    out.parent.mkdir()
    stale = b'{"id": "old", "line": 1, "reason": "from another run"}\n'
    errors_path_for(out).write_bytes(stale)

    for resume in (True, False):
        with pytest.raises(ConfigError, match="no earlier run of this output wrote it"):
            await job(server, source, out, settings, resume=resume)
        assert errors_path_for(out).read_bytes() == stale

    errors_path_for(out).unlink()
    summary = await job(server, source, out, settings, resume=True)
    assert summary.failed == 0
    assert outputs(out) == expected


async def test_a_job_that_fails_while_writing_leaves_a_checkpoint_a_resume_can_trust(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = corpus(300, seed=31)  # bad lines among them: the errors file is written mid-batch
    source = write_lines(tmp_path / "in.jsonl", lines)
    settings = settings_for(server, model=M3)
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings)
    out = tmp_path / "job" / "out.npy"

    def full_disk(self: Any) -> Any:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("sfembed._errorlog.ErrorLog._out", full_disk)
        with pytest.raises(OSError, match="No space"):
            await job(server, source, out, settings)
    # The checkpoint taken as the job unwound counts only whole batches: had it counted the
    # rows of the batch that failed midway, a resume would write them a second time. (A run
    # that failed before its first checkpoint leaves no manifest: a resume starts over.)
    manifest = load_manifest(manifest_path_for(out))
    if manifest is not None:
        checkpoint = manifest.checkpoint
        assert checkpoint.rows == checkpoint.records < len(lines)
    await job(server, source, out, settings, resume=True)
    assert outputs(out) == expected


async def test_the_output_is_written_and_synced_off_the_event_loop(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every batch and every checkpoint before the last reach the disk on the disk thread: the
    event loop goes on sending and reading meanwhile. The last, as the job ends, on the loop."""
    source = write_lines(tmp_path / "in.jsonl", corpus(300, seed=32))
    writes: list[str] = []
    commits: list[str] = []
    real_write, real_commit = NpyWriter.write, NpyWriter.commit

    def write(self: NpyWriter, *args: Any, **kwargs: Any) -> None:
        writes.append(threading.current_thread().name)
        real_write(self, *args, **kwargs)

    def commit(self: NpyWriter) -> Committed:
        commits.append(threading.current_thread().name)
        return real_commit(self)

    monkeypatch.setattr(NpyWriter, "write", write)
    monkeypatch.setattr(NpyWriter, "commit", commit)
    await job(server, source, tmp_path / "out.npy", settings_for(server, model=M3))
    here = threading.current_thread().name
    assert len(writes) > 1  # batches of several requests, as they come in order
    assert all(name.startswith("sfembed-disk") for name in writes), set(writes)
    assert len(commits) >= 3  # a checkpoint every 50 rows or so, and the last
    assert all(name.startswith("sfembed-disk") for name in commits[:-1]), commits
    assert commits[-1] == here
    assert not [t for t in threading.enumerate() if t.name.startswith("sfembed-disk")]


async def test_a_disk_error_on_the_disk_thread_fails_the_job_naming_the_file(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output's disk fills up midway (direct writes of the rows refused): the job fails with
    the disk's error naming the output, no checkpoint vouches for a row not written, and a
    resume ends as an uninterrupted run."""
    lines = corpus(300, seed=33)
    source = write_lines(tmp_path / "in.jsonl", lines)
    settings = settings_for(server, model=M3)
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings)
    out = tmp_path / "job" / "out.npy"
    real_pwrite, calls = os.pwrite, [0]

    def fills_up(fd: int, data: Any, offset: int) -> int:
        calls[0] += 1
        if calls[0] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", fills_up)
        with pytest.raises(OSError, match="No space") as raised:
            await job(server, source, out, settings)
    assert Path(raised.value.filename).name.startswith((".out.npy", "out.npy"))
    manifest = load_manifest(manifest_path_for(out))
    if manifest is not None:
        checkpoint = manifest.checkpoint
        assert checkpoint.rows == checkpoint.records < len(lines)
        assert out.stat().st_size >= checkpoint.lengths["output"]
    await job(server, source, out, settings, resume=True)
    assert outputs(out) == expected


async def test_a_job_cancelled_while_its_disk_thread_writes_resumes_byte_identical(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel comes while the disk thread is in the middle of a batch: the job waits for
    what it handed over, saves a checkpoint of it, joins the thread, and a resume ends as an
    uninterrupted run."""
    lines = corpus(300, seed=34)
    source = write_lines(tmp_path / "in.jsonl", lines)
    settings = settings_for(server, model=M3)
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings)
    out = tmp_path / "job" / "out.npy"
    out.parent.mkdir()
    inside, gate = threading.Event(), threading.Event()
    real_write = NpyWriter.write

    def held(self: NpyWriter, *args: Any, **kwargs: Any) -> None:
        # Held once the files are in place: later checkpoints then wait for nothing.
        if not inside.is_set() and manifest_path_for(out).exists():
            inside.set()
            assert gate.wait(WAIT_S)
        real_write(self, *args, **kwargs)

    real_put, handed, started = DiskThread.put, [0], [0]

    def put(self: DiskThread, work: Callable[[], None]) -> None:
        def counted() -> None:
            started[0] += 1
            work()

        real_put(self, counted)
        handed[0] += 1

    monkeypatch.setattr(NpyWriter, "write", held)
    monkeypatch.setattr(DiskThread, "put", put)
    server.set_faults(SLOW)
    try:
        async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
            task = asyncio.create_task(run_job(source, out, settings, client=client))
            # Until the held batch has others waiting behind it.
            for _ in range(int(WAIT_S / POLL_S)):
                if inside.is_set() and handed[0] >= started[0] + 2:
                    break
                await asyncio.sleep(POLL_S)
            assert not task.done()
            task.cancel()
            gate.set()  # before the cancel reaches the job, whose cleanup waits for the thread
            with pytest.raises(asyncio.CancelledError):
                await task
            assert job_tasks() == []
    finally:
        gate.set()
        server.set_faults(FAST)
    assert not [t for t in threading.enumerate() if t.name.startswith("sfembed-disk")]
    checkpoint = manifest_of(out).checkpoint
    assert not manifest_of(out).complete
    assert checkpoint.rows == checkpoint.records < len(lines)
    await job(server, source, out, settings, resume=True)
    assert outputs(out) == expected


# --- a fresh run killed while it moves its files over the earlier run's --------------------------

#: A fresh ``run_job`` in a child process, SIGKILLed right after the N-th rename or removal of
#: its move into place (the first writes its staged manifest), or (0) as the move begins.
_KILLED_IN_SWAP = r"""
import asyncio, os, pickle, signal, sys
from pathlib import Path

from sfembed import EmbeddingClient
from sfembed._job import run_job
from sfembed._jobfiles import JobFiles

url, key, source, out, settings_path, kill_after = sys.argv[1:]
steps, swapping = 0, False
real_replace, real_unlink, real_swap_in = os.replace, Path.unlink, JobFiles.swap_in


def step():
    global steps
    if swapping:
        steps += 1
        if steps == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)


def replace(*args, **kwargs):
    real_replace(*args, **kwargs)
    step()


def unlink(self, *args, **kwargs):
    real_unlink(self, *args, **kwargs)
    step()


def swap_in(self, *args, **kwargs):
    global swapping
    if int(kill_after) == 0:  # before the first step: the staged files written, nothing moved
        os.kill(os.getpid(), signal.SIGKILL)
    swapping = True
    try:
        real_swap_in(self, *args, **kwargs)
    finally:
        swapping = False


os.replace, Path.unlink, JobFiles.swap_in = replace, unlink, swap_in


async def main():
    settings = pickle.loads(Path(settings_path).read_bytes())
    async with EmbeddingClient(api_key=key, base_url=url) as client:
        await run_job(source, out, settings, client=client)


asyncio.run(main())
"""


@pytest.mark.parametrize("new_errors", [True, False], ids=["new-errors", "no-new-errors"])
@pytest.mark.parametrize("kill_after", [0, 1, 2, 3, 4, 5])
async def test_a_fresh_run_killed_at_any_step_of_its_swap_leaves_files_the_next_run_takes(
    server: LocalServer, tmp_path: Path, kill_after: int, new_errors: bool
) -> None:
    """The steps: the staged manifest written; the errors file moved over the earlier one (or,
    when the new run wrote none, the earlier one removed); the output and its id sidecar moved;
    the manifest moved over the earlier one. After a kill at any of them, the nightly command
    (resume, else restart) goes on without a hand's help and ends as an uninterrupted run."""
    settings = settings_for(server, model=M3)
    earlier = write_lines(tmp_path / "earlier.jsonl", corpus(100, seed=51))  # an errors file
    source = write_lines(tmp_path / "in.jsonl", corpus(100, seed=52, bad=new_errors))
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings)
    out = tmp_path / "job" / "out.npy"
    await reference(server, earlier, out, settings)
    assert errors_path_for(out).exists()

    pickled = tmp_path / "settings.pickle"
    pickled.write_bytes(pickle.dumps(settings))
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-W", "error", "-c", _KILLED_IN_SWAP, server.url, KEY),
        *(str(source), str(out), str(pickled), str(kill_after)),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode == -signal.SIGKILL, err.decode()  # killed in the swap, not before

    summary = await job(server, source, out, settings, resume=True, restart=True)
    assert outputs(out) == expected
    assert summary.failed == (3 if new_errors else 0)
    assert manifest_of(out).complete
    assert not [path.name for path in out.parent.iterdir() if "sfembed-new" in path.name]


async def test_a_file_job_resolves_its_model_once(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job and every stage of its engine share one spec of the model."""
    import sfembed._config
    import sfembed._engine

    resolved: list[str] = []

    def counted(settings: Settings, *args: Any) -> Any:
        resolved.append(settings.model)
        return sfembed._config.model_spec(settings, *args)

    monkeypatch.setattr(job_module, "model_spec", counted)
    monkeypatch.setattr(sfembed._engine, "model_spec", counted)
    source = write_lines(tmp_path / "in.jsonl", corpus(20, seed=53))
    await job(server, source, tmp_path / "out.npy", settings_for(server, model=M3))
    assert resolved == [M3]


async def test_a_disk_error_in_the_middle_of_the_swap_leaves_it_for_the_next_run_to_finish(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move into place fails after its errors file has moved (the output's rename is
    refused): the job fails, its cleanup keeps the staged files the staged manifest describes,
    and the next run finishes the move and goes on from its checkpoint."""
    settings = settings_for(server, model=M3)
    source = write_lines(tmp_path / "in.jsonl", corpus(100, seed=54))
    expected = await reference(server, source, tmp_path / "ref" / "out.npy", settings)
    out = tmp_path / "job" / "out.npy"
    await reference(
        server, write_lines(tmp_path / "earlier.jsonl", corpus(100, seed=55)), out, settings
    )
    real_replace = os.replace

    def refused_for_the_output(source: Any, destination: Any) -> None:
        if Path(destination) == out:
            raise OSError(5, "Input/output error")
        real_replace(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refused_for_the_output)
        with pytest.raises(OSError, match="Input/output error"):
            await job(server, source, out, settings)
    assert [p.name for p in out.parent.iterdir() if p.name.endswith("manifest.json.sfembed-new")]

    await job(server, source, out, settings, resume=True, restart=True)
    assert outputs(out) == expected
    assert not [path.name for path in out.parent.iterdir() if "sfembed-new" in path.name]
