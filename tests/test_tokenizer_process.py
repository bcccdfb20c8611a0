"""The exact tokenizer in its own process: the same counts and cuts as in this one, never built
here, one per model for the whole process, whole answers even to a cancelled request, gone when
the process ends, and replaced by counting here if it dies."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sfembed import DEFAULT_CATALOG, _tokenizer_process, _tokenizers
from sfembed._exceptions import ConfigError
from sfembed._models import ModelSpec
from sfembed._tokenizer_process import ExactCounting, close_children
from sfembed._tokenizers import counter_for

BERT = DEFAULT_CATALOG["BAAI/bge-large-en-v1.5"]  # a small tokenizer: quick to load
M3 = DEFAULT_CATALOG["BAAI/bge-m3"]
TEXTS = [
    "Embedding models map sentences to vectors.",
    "嵌入模型把句子映射为向量。 Café naïve 12345 😀!",
    "",
    "river mountain winter library " * 5000,  # 150,000 characters: tokenized in segments
]


def child_of(spec: ModelSpec) -> subprocess.Popen[bytes]:
    return _tokenizer_process._children[spec].process


def gone(pid: int) -> bool:
    """True once no process has ``pid`` (reaped, not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_the_child_counts_and_cuts_as_the_tokenizer_in_this_process_does() -> None:
    here = counter_for(M3)
    loads = _tokenizers.bundled_tokenizer.cache_info().misses
    counting = ExactCounting(M3)
    assert await counting.count(TEXTS) == here.count(TEXTS)
    for text in TEXTS:
        assert await counting.spans(text) == here.spans(text)
    assert not counting.in_process
    assert child_of(M3).poll() is None
    assert _tokenizers.bundled_tokenizer.cache_info().misses == loads  # never built here


def test_one_child_serves_every_job_and_event_loop_of_the_process() -> None:
    async def count() -> list[int]:
        return await ExactCounting(BERT).count(["hello world"])

    expected = counter_for(BERT).count(["hello world"])
    assert asyncio.run(count()) == expected
    pid = child_of(BERT).pid
    assert asyncio.run(count()) == expected
    assert child_of(BERT).pid == pid


async def test_a_cancelled_request_is_answered_whole_and_the_next_gets_its_own_answer() -> None:
    counting = ExactCounting(M3)
    assert await counting.count(["warm"])
    pid = child_of(M3).pid
    task = asyncio.create_task(counting.count(["the river " * 50_000] * 8))
    await asyncio.sleep(0.05)  # on its way to the child, or there already
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await counting.count(["hello world"]) == counter_for(M3).count(["hello world"])
    assert await counting.spans("hello world") == counter_for(M3).spans("hello world")
    assert child_of(M3).pid == pid


async def test_a_child_that_dies_is_replaced_by_counting_here_and_a_later_job_starts_another(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counting = ExactCounting(BERT)
    assert await counting.count(["hello"]) == counter_for(BERT).count(["hello"])
    dead = child_of(BERT)
    dead.kill()
    dead.wait()
    with caplog.at_level(logging.WARNING, logger="sfembed"):
        assert await counting.count(TEXTS) == counter_for(BERT).count(TEXTS)
        assert await counting.spans(TEXTS[1]) == counter_for(BERT).spans(TEXTS[1])
    assert counting.in_process
    assert "tokenizer's process ended" in caplog.text
    later = ExactCounting(BERT)
    assert await later.count(["hello"]) == counter_for(BERT).count(["hello"])
    assert child_of(BERT).pid != dead.pid
    assert not later.in_process


async def test_a_child_that_cannot_start_is_replaced_by_counting_here(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    close_children()
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    counting = ExactCounting(BERT)
    with caplog.at_level(logging.WARNING, logger="sfembed"):
        assert await counting.count(["hello"]) == counter_for(BERT).count(["hello"])
    assert counting.in_process
    assert "could not start" in caplog.text
    assert BERT not in _tokenizer_process._children


async def test_a_bad_tokenizer_file_is_a_config_error_raised_in_the_job(tmp_path: Path) -> None:
    spec = dataclasses.replace(BERT, tokenizer=str(tmp_path / "missing.json"))
    counting = ExactCounting(spec)
    with pytest.raises(ConfigError, match=r"missing\.json"):
        await counting.count(["hello"])
    assert not counting.in_process  # an answer, not a death: the child is still there
    assert child_of(spec).poll() is None


async def test_the_child_ignores_a_terminals_ctrl_c() -> None:
    counting = ExactCounting(BERT)
    assert await counting.count(["hello"])
    child = child_of(BERT)
    child.send_signal(signal.SIGINT)
    child.send_signal(signal.SIGTERM)
    assert await counting.count(["hello world"]) == counter_for(BERT).count(["hello world"])
    assert not counting.in_process
    assert child_of(BERT) is child


def test_the_child_exits_when_its_input_closes() -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "sfembed._tokenizer_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.close()
    assert child.wait(timeout=30) == 0
    assert child.stdout.read() == b""
    child.stdout.close()


def test_no_child_outlives_the_process_that_started_it(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import asyncio
        from sfembed import DEFAULT_CATALOG, _tokenizer_process
        from sfembed._tokenizer_process import ExactCounting

        spec = DEFAULT_CATALOG["BAAI/bge-large-en-v1.5"]
        print(asyncio.run(ExactCounting(spec).count(["hello world"])))
        print(_tokenizer_process._children[spec].process.pid)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    counts, pid = done.stdout.split()
    assert counts == str(counter_for(BERT).count(["hello world"])).replace(" ", "")
    assert gone(int(pid))


async def test_a_model_without_a_tokenizer_is_estimated_here() -> None:
    spec = dataclasses.replace(BERT, tokenizer=None)
    counting = ExactCounting(spec)
    assert counting.in_process
    assert await counting.count(["hello world"]) == counter_for(spec).count(["hello world"])
    assert spec not in _tokenizer_process._children


async def test_a_frozen_application_counts_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    counting = ExactCounting(BERT)
    assert counting.in_process
    assert await counting.count(["hello world"]) == counter_for(BERT).count(["hello world"])
