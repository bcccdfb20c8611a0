"""The exact tokenizer in its own process: the same counts and cuts as in this one, never built
here, gone when the job ends however it ends, and replaced by counting here if it dies."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sfembed import DEFAULT_CATALOG, _tokenizers
from sfembed._exceptions import ConfigError
from sfembed._tokenizer_process import ExactCounting
from sfembed._tokenizers import counter_for

BERT = DEFAULT_CATALOG["BAAI/bge-large-en-v1.5"]  # a small tokenizer: quick to load
M3 = DEFAULT_CATALOG["BAAI/bge-m3"]
TEXTS = [
    "Embedding models map sentences to vectors.",
    "嵌入模型把句子映射为向量。 Café naïve 12345 😀!",
    "",
    "river mountain winter library " * 5000,  # 150,000 characters: tokenized in segments
]


def gone(pid: int) -> bool:
    """True once no process has ``pid`` (reaped, not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_the_child_counts_and_cuts_as_the_tokenizer_in_this_process_does() -> None:
    here = counter_for(M3)
    counting = ExactCounting(M3)
    loads = _tokenizers.bundled_tokenizer.cache_info().misses
    try:
        assert await counting.count(TEXTS) == here.count(TEXTS)
        for text in TEXTS:
            assert await counting.spans(text) == here.spans(text)
        assert counting._child is not None
        assert not counting.in_process
    finally:
        await counting.aclose()
    assert _tokenizers.bundled_tokenizer.cache_info().misses == loads  # never built here


async def test_leaving_kills_the_child_and_reaps_it() -> None:
    counting = ExactCounting(BERT)
    assert await counting.count(["hello world"]) == counter_for(BERT).count(["hello world"])
    child = counting._child
    assert child is not None
    await counting.aclose()
    assert child.returncode is not None
    assert gone(child.pid)
    await counting.aclose()  # twice is harmless


async def test_a_count_cancelled_mid_request_leaves_no_child_and_no_stale_answer() -> None:
    counting = ExactCounting(M3)
    try:
        task = asyncio.create_task(counting.count(["the river " * 50_000] * 8))
        while counting._child is None:  # noqa: ASYNC110 (started by the task's first step)
            await asyncio.sleep(0.01)
        first = counting._child
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert counting._child is None  # the answer on its way would answer the next request
        assert await counting.count(["hello world"]) == counter_for(M3).count(["hello world"])
        assert counting._child is not first
    finally:
        await counting.aclose()
    assert gone(first.pid)


async def test_a_child_that_dies_is_replaced_by_counting_here(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counting = ExactCounting(BERT)
    try:
        assert await counting.count(["hello"]) == counter_for(BERT).count(["hello"])
        assert counting._child is not None
        counting._child.kill()
        await counting._child.wait()
        with caplog.at_level(logging.WARNING, logger="sfembed"):
            assert await counting.count(TEXTS) == counter_for(BERT).count(TEXTS)
            assert await counting.spans(TEXTS[1]) == counter_for(BERT).spans(TEXTS[1])
        assert counting.in_process
        assert "tokenizer's process ended" in caplog.text
    finally:
        await counting.aclose()


async def test_a_child_that_cannot_start_is_replaced_by_counting_here(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    counting = ExactCounting(BERT)
    with caplog.at_level(logging.WARNING, logger="sfembed"):
        assert await counting.count(["hello"]) == counter_for(BERT).count(["hello"])
    await counting.aclose()
    assert counting.in_process
    assert "could not start" in caplog.text


async def test_a_bad_tokenizer_file_is_a_config_error_raised_in_the_job(tmp_path: Path) -> None:
    spec = dataclasses.replace(BERT, tokenizer=str(tmp_path / "missing.json"))
    counting = ExactCounting(spec)
    try:
        with pytest.raises(ConfigError, match=r"missing\.json"):
            await counting.count(["hello"])
        assert not counting.in_process  # an answer, not a death: the child is still there
    finally:
        await counting.aclose()


async def test_the_child_ignores_a_terminals_ctrl_c() -> None:
    counting = ExactCounting(BERT)
    try:
        assert await counting.count(["hello"])
        assert counting._child is not None
        counting._child.send_signal(signal.SIGINT)
        counting._child.send_signal(signal.SIGTERM)
        assert await counting.count(["hello world"]) == counter_for(BERT).count(["hello world"])
        assert not counting.in_process
    finally:
        await counting.aclose()


def test_the_child_exits_when_the_job_closes_its_input() -> None:
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


async def test_a_model_without_a_tokenizer_is_estimated_here() -> None:
    spec = dataclasses.replace(BERT, tokenizer=None)
    counting = ExactCounting(spec)
    assert counting.in_process
    assert await counting.count(["hello world"]) == counter_for(spec).count(["hello world"])
    await counting.aclose()
