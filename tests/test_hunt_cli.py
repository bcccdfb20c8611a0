"""The command line as a demanding user meets it: bad lines, odd outputs, mistyped values."""

from __future__ import annotations

import gzip
import sys
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


@pytest.mark.parametrize(
    ("out_name", "foreign_name"),
    [("o.npy", "o.npy"), ("o.npy", "o.ids.jsonl"), ("o.jsonl", "o.jsonl")],
)
def test_an_existing_output_no_run_wrote_is_refused_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out_name: str, foreign_name: str
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    foreign = tmp_path / foreign_name
    foreign.write_bytes(b"the user's own file\n")
    assert _embed(str(source), "--out", str(tmp_path / out_name)) == 2
    assert foreign.read_bytes() == b"the user's own file\n"
    err = capsys.readouterr().err
    assert f"{foreign_name}' exists and no earlier sfembed run wrote it" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.jsonl", foreign_name])


def test_a_symlink_out_to_a_file_no_run_wrote_is_refused_and_both_kept(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    foreign = tmp_path / "theirs.npy"
    foreign.write_bytes(b"the user's own file\n")
    link = tmp_path / "o.npy"
    link.symlink_to(foreign.name)
    assert _embed(str(source), "--out", str(link)) == 2
    assert foreign.read_bytes() == b"the user's own file\n"
    assert link.is_symlink()


def test_a_rerun_replaces_the_output_its_earlier_run_wrote(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    out = tmp_path / "o.npy"
    assert _embed(str(source), "--out", str(out)) == 0
    _jsonl(source, _docs(4))
    assert _embed(str(source), "--out", str(out)) == 0
    assert len((tmp_path / "o.ids.jsonl").read_bytes().splitlines()) == 4


@pytest.mark.parametrize(
    ("name", "body", "why"),
    [
        ("in.csv", b"id,text\na,one\nb,hello, world\nc,three\n", "comma"),
        ("in.tsv", b"id\ttext\na\tone\nb\thello\tworld\nc\tthree\n", "tab"),
    ],
)
def test_a_row_with_more_fields_than_the_header_is_an_error_not_a_cut_text(
    tmp_path: Path, name: str, body: bytes, why: str
) -> None:
    source = tmp_path / name
    source.write_bytes(body)
    out = tmp_path / "o.jsonl"
    assert _embed(str(source), "--out", str(out)) == 1
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [(r["id"], r["embedding"] is None) for r in rows] == [
        ("a", False),
        ("b", True),
        ("c", False),
    ]
    (error,) = [
        orjson.loads(e) for e in (tmp_path / "o.jsonl.errors.jsonl").read_bytes().splitlines()
    ]
    assert (error["id"], error["line"]) == ("b", 3)
    assert "3 fields, 2 in the header" in error["reason"]
    assert why in error["reason"]


def test_a_trailing_empty_field_is_no_error(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"id,text\na,one,\nb,two, \n")
    assert _embed(str(source), "--out", str(tmp_path / "o.jsonl")) == 0


def test_the_subfolders_a_folder_input_does_not_read_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "shards"
    (folder / "2025").mkdir(parents=True)
    _jsonl(folder / "a.jsonl", _docs(2))
    _jsonl(folder / "2025" / "b.jsonl", _docs(2))
    assert _embed(str(folder), "--out", str(tmp_path / "o.jsonl")) == 0
    assert "skipped the subfolder(s) 2025" in caplog.text
    (folder / "a.jsonl").unlink()
    assert _embed(str(folder), "--out", str(tmp_path / "o.jsonl")) == 2
    assert "its subfolders (2025) are not read" in capsys.readouterr().err


@pytest.mark.parametrize("out_name", ["vectors.npy", "vectors.jsonl"])
@pytest.mark.parametrize("as_glob", [False, True])
def test_a_job_writing_into_its_input_folder_runs_again_reading_its_inputs_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, out_name: str, as_glob: bool
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", _docs(3))
    _jsonl(folder / "b.jsonl", [b"not json"])
    named = str(folder / "*.jsonl") if as_glob else str(folder)
    out = folder / out_name
    assert _embed(named, "--out", str(out)) == 1
    first = out.read_bytes()
    assert _embed(named, "--out", str(out)) == 1  # the same command, the next night
    assert out.read_bytes() == first
    skipped = [line for line in caplog.text.splitlines() if "an sfembed job's output" in line]
    assert skipped
    assert f"{out_name}.errors.jsonl" in skipped[0]


def test_a_report_in_a_missing_folder_is_refused_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    out = tmp_path / "o.npy"
    report = tmp_path / "missing" / "run.json"
    assert _embed(str(source), "--out", str(out), "--report", str(report)) == 2
    assert f"the report's folder {str(report.parent)!r} is missing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_mistyped_table_in_the_prices_file_is_refused_not_priced_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    prices = tmp_path / "prices.toml"
    prices.write_text('[price_per_million_tokens]\n"BAAI/bge-m3" = 0.5\n')
    out = str(tmp_path / "o.npy")
    assert _embed(str(source), "--out", out, "--prices", str(prices), "--dry-run") == 2
    err = capsys.readouterr().err
    assert "unknown key(s) price_per_million_tokens" in err
    assert str(prices) in err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        # A setting the long mode ignores.
        (["--truncate-side", "left"], "truncate_side = 'left' does nothing unless long_mode"),
        (["--long", "truncate", "--overlap-tokens", "16"], "overlap_tokens = 16 does nothing"),
        # Two flags, one of which would undo the other.
        (["--base-url", "https://api.example.com/v1"], "--local and --base-url"),
        (["--no-cache", "--cache", "c.sqlite"], "--no-cache and --cache"),
    ],
)
def test_flags_that_would_not_run_as_asked_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    assert _embed(str(source), "--out", str(tmp_path / "o.npy"), *flags) == 2
    assert named in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_resume_or_restart_on_standard_input_starts_over_each_night(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o.jsonl"
    night = _jsonl(tmp_path / "night.jsonl", _docs(3))
    for count in (3, 5):  # the same command, night after night, on new input
        _jsonl(night, _docs(count))
        with open(night, "rb") as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)  # read by its file descriptor
            assert _embed("-", "--out", str(out), "--resume-or-restart") == 0
        ids = [orjson.loads(line)["id"] for line in out.read_bytes().splitlines()]
        assert ids == [f"d{i}" for i in range(count)]


@pytest.mark.parametrize(
    ("name", "body"),
    [("in.csv", b"docid,text\na,one\n"), ("in.tsv", b"docid\ttext\na\tone\n")],
)
def test_an_id_field_named_but_not_in_the_header_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, body: bytes
) -> None:
    source = tmp_path / name
    source.write_bytes(body)
    out = str(tmp_path / "o.npy")
    assert _embed(str(source), "--out", out, "--id-field", "doc_id") == 2
    assert "has no id column 'doc_id' (columns: docid, text)" in capsys.readouterr().err
    assert _embed(str(source), "--out", out) == 0  # no id column: ids are line numbers


def test_a_jsonl_gz_damaged_from_its_start_is_one_error_and_the_other_shards_are_read(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", _docs(2))
    (folder / "b.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage, not deflate data")
    _jsonl(folder / "c.jsonl", _docs(1))
    out = tmp_path / "o.jsonl"
    assert _embed(str(folder), "--out", str(out)) == 1
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["embedding"] is None for r in rows] == [False, False, True, False]
    (error,) = [
        orjson.loads(e) for e in (tmp_path / "o.jsonl.errors.jsonl").read_bytes().splitlines()
    ]
    assert error["source"].endswith("b.jsonl.gz")
    assert "unreadable after line 0" in error["reason"]


def test_a_json_array_gz_cut_short_is_one_error_not_a_traceback(tmp_path: Path) -> None:
    array = orjson.dumps([{"id": str(i), "text": f"text {i}"} for i in range(500)])
    packed = gzip.compress(array)
    source = tmp_path / "in.json.gz"
    source.write_bytes(packed[: len(packed) // 2])
    out = tmp_path / "o.jsonl"
    assert _embed(str(source), "--out", str(out)) == 1
    errors = (tmp_path / "o.jsonl.errors.jsonl").read_bytes().splitlines()
    assert [orjson.loads(e)["line"] for e in errors] == [1]
    assert "the rest of it is lost" in orjson.loads(errors[0])["reason"]


def test_an_image_field_for_a_text_only_model_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _docs(3))
    assert _embed(str(source), "--out", str(tmp_path / "o.npy"), "--image-field", "img") == 2
    assert "model BAAI/bge-m3 takes text only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
