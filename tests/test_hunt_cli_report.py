"""`sfembed report` and `sfembed serve` on odd input: a damaged report, a plot path that is someone
else's file, a host that does not resolve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from sfembed._cli import main


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run report a real job wrote."""
    folder = tmp_path_factory.mktemp("report")
    source = folder / "in.jsonl"
    source.write_bytes(b'{"id": "a", "text": "one"}\n{"id": "b", "text": ""}\n')
    flags = ["--local", "--no-progress", "--no-cache", "--report", str(folder / "run.json")]
    assert main(["embed", str(source), "--out", str(folder / "o.npy"), *flags]) == 1
    loaded: dict[str, Any] = orjson.loads((folder / "run.json").read_bytes())
    return loaded


def _damaged(report: dict[str, Any], how: str) -> dict[str, Any]:
    damaged = dict(report)
    if how == "no limits":
        del damaged["limits"]
    elif how == "windows null":
        damaged["windows"] = None
    elif how == "records a text":
        damaged["records"] = "many"
    else:
        damaged["limits"] = {**report["limits"], "tpm": 0}
    return damaged


@pytest.mark.parametrize("how", ["no limits", "windows null", "records a text", "tpm 0"])
def test_a_damaged_report_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report: dict[str, Any], how: str
) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(_damaged(report, how)))
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sfembed: error: {str(path)!r} is a damaged run report")
    assert err.count("\n") == 1


def test_a_plot_over_the_report_itself_is_refused_and_the_report_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report: dict[str, Any]
) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(report))
    assert main(["report", str(path), "--plot", str(path)]) == 2
    assert orjson.loads(path.read_bytes()) == report
    assert "is the report itself" in capsys.readouterr().err


def test_a_plot_over_a_file_that_is_not_a_png_is_refused_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report: dict[str, Any]
) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(report))
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"mine\n")
    assert main(["report", str(path), "--plot", str(notes)]) == 2
    assert notes.read_bytes() == b"mine\n"
    assert "exists and is not a PNG" in capsys.readouterr().err


def test_serve_on_a_host_that_does_not_resolve_names_the_host_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--host", "999.1.1.1", "--port", "0"]) == 2
    assert "--host '999.1.1.1'" in capsys.readouterr().err


def test_a_long_failure_reason_is_apart_from_its_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report: dict[str, Any]
) -> None:
    path = tmp_path / "run.json"
    reason = "whitespace-only text in field 'body'"
    path.write_bytes(orjson.dumps({**report, "failures_by_reason": {reason: 7}}))
    assert main(["report", str(path)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if reason in line]
    assert line.split(reason)[1].startswith(" ")
    assert line.split()[-1] == "7"


@pytest.mark.parametrize("key", ["", "   ", " sk-local", "sk\tlocal"])
def test_serve_with_a_key_no_client_can_send_exits_2_without_echoing_it(
    capsys: pytest.CaptureFixture[str], key: str
) -> None:
    assert main(["serve", "--api-key", key, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "argument --api-key: " in err
    assert "sk-local" not in err
    assert "sk\tlocal" not in err


def test_a_plot_into_a_missing_folder_is_refused_before_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report: dict[str, Any]
) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(report))
    plot = tmp_path / "missing" / "run.png"
    assert main(["report", str(path), "--plot", str(plot)]) == 2
    printed = capsys.readouterr()
    assert f"the folder of --plot {str(plot.parent)!r} is missing" in printed.err
    assert printed.out == ""


def test_a_reader_that_leaves_early_ends_the_command_without_a_word(
    report: dict[str, Any], tmp_path: Path
) -> None:
    # `sfembed report run.json | head -1`: the pipe's reader is gone before the table is written.
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(report))
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sfembed", "report", str(path)],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert done.returncode == 1
    assert done.stderr == b""
