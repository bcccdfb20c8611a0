"""The command line: `sfembed embed` end to end against the built-in local server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from sfembed import testing
from sfembed._cli import _parser, main
from sfembed._commands import settings_from

MODEL = "BAAI/bge-m3"


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _docs(count: int) -> list[bytes]:
    return [orjson.dumps({"id": f"d{i}", "text": f"document number {i}"}) for i in range(count)]


def test_embed_local_writes_rows_in_order_and_reports_bad_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _docs(50)
    lines[7] = b'{"id": "d7", "text": '  # malformed JSON
    lines[20] = orjson.dumps({"id": "d20", "text": ""})
    source = _jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.npy"
    code = main(
        [
            "embed",
            str(source),
            "--out",
            str(out),
            "--local",
            "--model",
            MODEL,
            "--no-progress",
            "--batch-size",
            "8",
        ]
    )
    assert code == 1
    rows = np.load(out)
    assert rows.shape == (50, 1024)
    for i in (0, 8, 49):
        np.testing.assert_allclose(
            rows[i], testing.expected_embedding(MODEL, f"document number {i}"), atol=1e-6
        )
    assert np.isnan(rows[7]).all()
    assert np.isnan(rows[20]).all()
    errors = [
        orjson.loads(line) for line in (tmp_path / "out.npy.errors.jsonl").read_bytes().splitlines()
    ]
    # A malformed line has no readable id: it is null, named by its line number alone.
    assert [(e["id"], e["line"]) for e in errors] == [(None, 8), ("d20", 21)]
    assert all(e["reason"] for e in errors)
    assert "failures" in capsys.readouterr().out


def test_embed_local_clean_run_exits_zero(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(10))
    out = tmp_path / "out.jsonl"
    assert main(["embed", str(source), "--out", str(out), "--local", "--no-progress"]) == 0
    written = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [w["id"] for w in written] == [f"d{i}" for i in range(10)]
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()


def test_dry_run_counts_without_sending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(100))
    code = main(
        [
            "embed",
            str(source),
            "--out",
            str(tmp_path / "o.npy"),
            "--dry-run",
            "--base-url",
            "https://127.0.0.1:9/v1",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "records" in out
    assert "100" in out
    assert not (tmp_path / "o.npy").exists()


def test_flags_override_config_keys(tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('model = "BAAI/bge-m3"\nconcurrency = 4\n[rate]\nrpm = 10\ntpm = 1000\n')
    args = _parser().parse_args(
        [
            "embed",
            "in.jsonl",
            "--out",
            "o.npy",
            "--config",
            str(config),
            "--tpm",
            "5000",
            "--text-field",
            "body",
            "--dtype",
            "float16",
        ]
    )
    settings = settings_from(args)
    assert settings.concurrency == 4
    assert (settings.rate.rpm, settings.rate.tpm) == (10, 5000)
    assert settings.io.text_field == "body"
    assert settings.io.dtype == "float16"


def test_missing_key_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SILICONFLOW_API_KEY", raising=False)
    source = _jsonl(tmp_path / "in.jsonl", _docs(1))
    assert main(["embed", str(source), "--out", str(tmp_path / "o.npy")]) == 2
    assert "SILICONFLOW_API_KEY" in capsys.readouterr().err


async def test_cancelling_a_job_leaves_a_valid_npy_of_the_rows_written(tmp_path: Path) -> None:
    import asyncio

    from sfembed import EmbeddingClient, load_settings
    from sfembed._job import run_job

    source = _jsonl(tmp_path / "in.jsonl", _docs(3000))
    out = tmp_path / "out.npy"
    async with testing.LocalServer(
        testing.ServerConfig(faults=testing.Faults(latency_s=0.01))
    ) as server:
        settings = load_settings(base_url=server.url, concurrency=2)
        async with EmbeddingClient(api_key="sk-local-test", base_url=server.url) as client:
            batches = 0
            two_batches = asyncio.Event()

            def count(_: object) -> None:
                nonlocal batches
                batches += 1
                if batches == 2:
                    two_batches.set()

            task = asyncio.create_task(
                run_job(source, out, settings, client=client, on_batch=count)
            )
            await two_batches.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    rows = np.load(out)
    assert 0 < len(rows) < 3000
    np.testing.assert_allclose(
        rows[0], testing.expected_embedding(MODEL, "document number 0"), atol=1e-6
    )


def test_eta_follows_the_binding_limit() -> None:
    from sfembed import JobStats
    from sfembed._progress import eta_s

    stats = JobStats(rows=100, tokens=10_000, requests=10)
    assert eta_s(stats, 1000) is None  # no pace known yet
    stats.pace_tokens_per_s, stats.pace_requests_per_s = 1000.0, 1.0
    # 900 records left: 90,000 tokens at 1,000/s = 90 s; 90 requests at 1/s = 90 s
    assert eta_s(stats, 1000) == pytest.approx(90.0)
    stats.pace_requests_per_s = 0.5  # requests now bind: 180 s
    assert eta_s(stats, 1000) == pytest.approx(180.0)
    stats.resumed = 500  # an earlier run did 500: 400 left, 80 s
    assert eta_s(stats, 1000) == pytest.approx(80.0)


def test_the_bar_of_a_resumed_job_counts_from_the_records_done_before() -> None:
    import io

    from sfembed import JobStats
    from sfembed._progress import TqdmProgress

    out = io.StringIO()
    bar = TqdmProgress(total=1000, file=out)
    bar.update(JobStats(rows=100, resumed=600))
    bar.close(JobStats(rows=400, resumed=600))
    assert "1000/1000" in out.getvalue()


def test_the_last_of_many_quick_updates_is_shown_at_the_end() -> None:
    import io

    from sfembed import JobStats
    from sfembed._progress import TqdmProgress

    out = io.StringIO()
    bar = TqdmProgress(total=500, file=out)
    for rows in range(1, 501):  # faster than the bar redraws: most are only remembered
        bar.update(JobStats(rows=rows))
    bar.close(bar.last)
    assert "500/500" in out.getvalue()


def test_dry_run_refuses_a_missing_prices_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    code = main(
        [
            "embed",
            str(source),
            "--out",
            str(tmp_path / "o.npy"),
            "--dry-run",
            "--prices",
            str(tmp_path / "nope.toml"),
        ]
    )
    assert code == 2
    assert "nope.toml" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'[prices_per_million_tokens]\n"BAAI/bge-m3" = "cheap"\n', "= 'cheap' is not allowed"),
        (b'[prices_per_million_tokens]\n"BAAI/bge-m3" = -1\n', "= -1 is not allowed"),
        (b"prices_per_million_tokens = 5\n", "prices_per_million_tokens must be a table"),
        (b"# \xa5 per million, saved as Latin-1\n", "not UTF-8 text (byte 2)"),
    ],
)
def test_dry_run_refuses_a_prices_file_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, says: str
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    prices = tmp_path / "prices.toml"
    prices.write_bytes(content)
    out = str(tmp_path / "o.npy")
    code = main(["embed", str(source), "--out", out, "--dry-run", "--prices", str(prices)])
    printed = capsys.readouterr().err
    assert code == 2
    assert f"prices file {str(prices)!r}" in printed
    assert says in printed
    assert "Traceback" not in printed


def test_the_summary_gives_a_utilisation_only_for_a_job_of_a_window_or_more() -> None:
    from sfembed import JobStats, RateLimits
    from sfembed._job import JobSummary
    from sfembed._summary import summary_table

    limits = RateLimits(rpm=600, tpm=60_000, window_s=60.0)
    stats = JobStats(tokens=90_000)  # tokens the server counted
    two_windows = summary_table(JobSummary(stats, wall_s=120.0), limits)
    assert "TPM utilisation 75.0%" in two_windows
    seconds = summary_table(JobSummary(stats, wall_s=3.0), limits)  # would read 3,000%
    assert "TPM utilisation - (the job was shorter than one 60 s window)" in seconds
