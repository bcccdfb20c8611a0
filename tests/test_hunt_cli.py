"""The command line as a demanding user meets it: bad lines, odd outputs, mistyped values."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from sfembed._cli import main

MODEL = "BAAI/bge-m3"


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _docs(count: int) -> list[bytes]:
    return [orjson.dumps({"id": f"d{i}", "text": f"document number {i}"}) for i in range(count)]


def _embed(*args: str) -> int:
    return main(["embed", *args, "--local", "--model", MODEL, "--no-progress"])


def test_a_bad_line_in_a_parquet_job_is_listed_and_the_others_are_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    lines = _docs(5)
    lines[2] = b"not json"
    source = _jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.parquet"
    assert _embed(str(source), "--out", str(out)) == 1
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ["d0", "d1", None, "d3", "d4"]
    vectors = table.column("embedding").to_pylist()
    assert vectors[2] is None
    assert all(vectors[i] for i in (0, 1, 3, 4))
    errors = (tmp_path / "out.parquet.errors.jsonl").read_bytes().splitlines()
    assert [orjson.loads(e)["line"] for e in errors] == [3]
    assert "failed: see" in capsys.readouterr().out
