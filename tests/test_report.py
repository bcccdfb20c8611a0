"""The run report: what it says matches what the server saw, it is rewritten at checkpoints and
at the end, `sfembed report` prints it and plots it, and JobStats holds the same figures."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from hostile import KEY, MakeServer, docs, write_lines

from sfembed import (
    BatchLimits,
    ConfigError,
    EmbeddingClient,
    IOSettings,
    RateLimits,
    load_settings,
)
from sfembed._cli import main
from sfembed._job import JobSummary, run_job
from sfembed._report import load_report, report_table
from sfembed.testing import Faults, LocalServer, ModelLimits, synthetic_corpus

MODEL = "BAAI/bge-m3"


def _corpus(path: Path, count: int) -> Path:
    texts = synthetic_corpus(count, seed=5)
    lines = [orjson.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)]
    lines[3] = b'{"id": "d3", "text": '  # malformed
    lines[7] = orjson.dumps({"id": "d7", "text": ""})
    lines[9] = orjson.dumps({"id": "d9", "text": "   "})
    return write_lines(path, lines)


async def _job(server: LocalServer, source: Path, out: Path, **options: Any) -> JobSummary:
    settings = load_settings(
        model=MODEL,
        base_url=server.url,
        rate=RateLimits(rpm=10_000, tpm=400_000, window_s=2.0),
        concurrency=4,
        batch=BatchLimits(max_items=8),
        io=IOSettings(cache=False, checkpoint_rows=40),
    )
    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        return await run_job(source, out, settings, client=client, **options)


async def test_the_report_matches_what_the_server_saw(
    make_server: MakeServer, tmp_path: Path
) -> None:
    # The server allows less than the job believes: 429s happen, and are counted by limit.
    server = await make_server(window_s=2.0, default_limits=ModelLimits(tpm=60_000))
    source = _corpus(tmp_path / "in.jsonl", 300)
    report_path = tmp_path / "run.json"

    summary = await _job(
        server,
        source,
        tmp_path / "out.npy",
        report_path=report_path,
        price_per_million=2.0,
        prices_file="prices.toml",
    )

    report = load_report(report_path)
    seen = server.stats
    assert report["status"] == "complete"
    assert report["tokens"] == seen.tokens_accepted > 0
    assert report["requests"] == seen.by_status[200]
    assert report["rate_limited"]["tpm"] == seen.rate_limited_tpm > 0
    assert report["rate_limited"]["rpm"] == seen.rate_limited_rpm == 0
    assert (report["records"], report["rows"], report["failed"]) == (300, 300, 3)
    assert report["failures_by_reason"] == {
        "malformed JSON": 1,
        "empty text in field 'text'": 1,
        "whitespace-only text in field 'text'": 1,
    }
    assert sum(report["failures_by_reason"].values()) == report["failed"]
    windows = report["windows"]
    assert sum(w["tokens"] for w in windows) == report["tokens"]
    assert sum(w["requests"] for w in windows) == report["requests"]
    assert sum(sum(w["rate_limited"].values()) for w in windows) == seen.rate_limited_tpm
    for w in windows:
        assert w["tokens_share"] == pytest.approx(w["tokens"] / 400_000, abs=1e-4)
    assert report["cost"]["total"] == pytest.approx(report["tokens"] / 1e6 * 2.0)
    assert report["limits"] == {"tpm": 400_000, "rpm": 10_000, "window_s": 2.0, "headroom": 0.02}
    assert 0 <= report["first_request_s"] <= report["wall_s"]
    # The same figures, for async callers, in JobStats.
    stats = summary.stats
    assert stats.tokens == report["tokens"]
    assert [w.tokens for w in stats.windows] == [w["tokens"] for w in windows]


async def test_the_report_is_written_at_checkpoints_and_says_how_a_job_ended(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server = await make_server(faults=Faults(latency_s=0.05))
    source = _corpus(tmp_path / "in.jsonl", 600)
    report_path = tmp_path / "run.json"
    task = asyncio.create_task(_job(server, source, tmp_path / "out.npy", report_path=report_path))
    for _ in range(5000):
        if report_path.exists():
            break
        assert not task.done()
        await asyncio.sleep(0.01)
    running = load_report(report_path)
    assert running["status"] == "running"  # a checkpoint's, while the job goes on
    assert 0 < running["rows"] < 600
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert load_report(report_path)["status"] == "stopped"

    resumed = await _job(server, source, tmp_path / "out.npy", report_path=report_path, resume=True)
    final = load_report(report_path)
    assert final["status"] == "complete"
    assert final["resumed_records"] == resumed.resumed_records > 0
    # An earlier run's failures are counted from its part of the errors file.
    assert sum(final["failures_by_reason"].values()) == final["failed"] == 3


async def test_a_file_at_the_report_path_that_is_not_a_report_is_kept(
    server: LocalServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", docs(5))
    notes = tmp_path / "notes.json"
    notes.write_bytes(b'{"mine": true}\n')
    with pytest.raises(ConfigError, match="not an sfembed run report"):
        await _job(server, source, tmp_path / "out.npy", report_path=notes)
    assert notes.read_bytes() == b'{"mine": true}\n'
    assert server.stats.requests == 0


def test_sfembed_report_prints_a_table_and_draws_a_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_lines(tmp_path / "in.jsonl", docs(40))
    report_path, png = tmp_path / "run.json", tmp_path / "run.png"
    flags = ["--local", "--no-progress", "--no-cache", "--window-s", "2", "--tpm", "5000"]
    code = main(
        [
            "embed",
            str(source),
            "--out",
            str(tmp_path / "o.npy"),
            *flags,
            "--report",
            str(report_path),
        ]
    )
    assert code == 0
    capsys.readouterr()

    assert main(["report", str(report_path), "--plot", str(png)]) == 0

    table = capsys.readouterr().out
    report = load_report(report_path)
    assert f"{report['tokens']:,}" in table
    assert "TPM 5,000" in table
    assert table.count("s  ") >= len(report["windows"])  # a line per window
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1000, 480)  # 10 x 4.8 inches at 100 dpi


def test_sfembed_report_refuses_a_file_that_is_not_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "x.json"
    other.write_bytes(b"[1, 2]")
    assert main(["report", str(other)]) == 2
    assert "not an sfembed run report" in capsys.readouterr().err


async def test_a_failed_job_says_why_in_its_report_without_the_key(
    server: LocalServer, tmp_path: Path
) -> None:
    from sfembed import AuthenticationError

    source = write_lines(tmp_path / "in.jsonl", docs(5))
    report_path = tmp_path / "run.json"
    wrong = "sk-wrong-0123456789abcdef"
    settings = load_settings(base_url=server.url, io=IOSettings(cache=False))
    async with EmbeddingClient(api_key=wrong, base_url=server.url) as client:
        with pytest.raises(AuthenticationError):
            await run_job(
                source, tmp_path / "o.npy", settings, client=client, report_path=report_path
            )

    report = load_report(report_path)
    assert report["status"] == "failed"
    assert "401" in report["error"]
    assert wrong not in report_path.read_text()
    assert "401" in report_table(report)
