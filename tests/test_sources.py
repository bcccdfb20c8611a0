"""read_records: every format to records, one per input line or row, errors named, never skipped."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest

from sfembed import _sources
from sfembed._exceptions import ConfigError
from sfembed._sources import FORMATS, Record, find_sources, read_blocks, read_records, read_sources
from sfembed._types import Unusable

PIXEL = b"\x89PNG\r\n\x1a\n-not-decoded-by-anyone"


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def jsonl(*values: Any) -> bytes:
    return b"".join(orjson.dumps(value) + b"\n" for value in values)


def read(path: Path, **options: Any) -> list[Record]:
    """The records of ``path``, with their source checked and then left out (to compare)."""
    records = list(read_records(path, **options))
    assert {record.source for record in records} <= {str(path)}
    return [dataclasses.replace(record, source="") for record in records]


def errors(records: list[Record]) -> dict[int, str]:
    return {record.line: record.error for record in records if record.error is not None}


# --- JSON Lines -------------------------------------------------------------------------------


def test_jsonl_records_keep_ids_order_and_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", jsonl({"id": "a", "text": "one"}, {"id": 7, "text": "two"}))
    assert read(path) == [Record("a", "one", 1), Record("7", "two", 2)]


def test_ids_default_to_the_line_number(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", jsonl({"text": "one"}, {"id": "", "text": "two"}))
    assert [record.id for record in read(path)] == ["1", "2"]


def test_custom_field_names(tmp_path: Path) -> None:
    path = write(tmp_path / "in.ndjson", jsonl({"doc": "d1", "body": "hello", "text": "no"}))
    assert read(path, id_field="doc", text_field="body") == [Record("d1", "hello", 1)]


@pytest.mark.parametrize(
    ("line", "cause"),
    [
        (b'{"text": "x"', "malformed JSON: unexpected end of data"),
        (b"[1, 2]", "not a JSON object but an array"),
        (b'"just text"', "not a JSON object but a string"),
        (b'{"id": "k"}', "missing text field 'text'"),
        (b'{"text": ""}', "empty text in field 'text'"),
        (b'{"text": " \\t\\n "}', "whitespace-only text in field 'text'"),
        (b'{"text": 42}', "text field 'text' is a number, not a string"),
        (b'{"text": null}', "text field 'text' is null, not a string"),
        (b'{"text": ["a"]}', "text field 'text' is an array, not a string"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8 (invalid continuation byte) at byte 13"),
        (b'{"text": "a\x00b"}', "NUL byte at character 11 of the line"),
        (b'{"text": "a\\u0000b"}', "NUL byte at character 1 of text field 'text'"),
        (b"", "blank line"),
        (b"   \t", "blank line"),
    ],
)
def test_each_unusable_jsonl_line_is_named_and_the_stream_goes_on(
    tmp_path: Path, line: bytes, cause: str
) -> None:
    good = orjson.dumps({"text": "fine"})
    path = write(tmp_path / "in.jsonl", b"\n".join([good, line, good]) + b"\n")
    records = read(path)
    assert [record.line for record in records] == [1, 2, 3]
    assert records[1].item is None
    assert records[1].error is not None
    assert records[1].error.startswith(cause)
    assert records[0].item == records[2].item == "fine"


def test_an_unusable_object_keeps_its_id(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", jsonl({"id": "x1", "text": 3}))
    assert read(path)[0].id == "x1"


def test_a_long_line_is_reported_and_skipped_to_its_end(tmp_path: Path) -> None:
    long = orjson.dumps({"id": "big", "text": "w" * 5000})
    path = write(tmp_path / "in.jsonl", b"\n".join([b'{"text": "a"}', long, b'{"text": "b"}']))
    records = read(path, max_line_bytes=1000)
    assert [record.item for record in records] == ["a", None, "b"]
    assert records[1] == Record(None, None, 2, f"line longer than 1000 bytes ({len(long)} bytes)")


def test_a_line_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    line = orjson.dumps({"text": "w" * 100})
    path = write(tmp_path / "in.jsonl", line + b"\n" + line)  # the last one without a newline
    assert [r.error for r in read(path, max_line_bytes=len(line))] == [None, None]
    assert errors(read(path, max_line_bytes=len(line) - 1)) == {
        1: f"line longer than {len(line) - 1} bytes ({len(line)} bytes)",
        2: f"line longer than {len(line) - 1} bytes ({len(line)} bytes)",
    }


def test_a_long_last_line_without_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", b'{"text": "a"}\n' + b"x" * 3000)
    assert errors(read(path, max_line_bytes=100)) == {2: "line longer than 100 bytes (3000 bytes)"}


def test_crlf_lines_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [record.item for record in read(path)] == ["a", "b"]


def test_json_suffix_and_format_override(tmp_path: Path) -> None:
    data = jsonl({"text": "a"})
    assert read(write(tmp_path / "in.json", data))[0].item == "a"
    assert read(write(tmp_path / "in.data", data), format="JSONL")[0].item == "a"


# --- images -----------------------------------------------------------------------------------


def test_image_records_url_data_uri_base64_and_paths(tmp_path: Path) -> None:
    picture = write(tmp_path / "cat.png", PIXEL)
    values = [
        "https://example.com/cat.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "iVBORw0KGgoAAAANSUhEUg==",
        str(picture),
        str(tmp_path / "missing.png"),
        str(tmp_path / "no-such-dir" / "picture"),
    ]
    lines = [{"id": str(n), "img": value} for n, value in enumerate(values)]
    path = write(tmp_path / "in.jsonl", jsonl(*lines, {"id": "t", "text": "words", "img": ""}))
    records = read(path, image_field="img")
    assert [record.item for record in records[:4]] == [{"image": value} for value in values[:4]]
    assert records[4].item is None
    assert records[4].error == f"cannot read image {values[4]!r}: No such file or directory"
    assert records[5].error == f"cannot read image {values[5]!r}: No such file or directory"
    assert records[6] == Record("t", "words", 7)


def test_image_problems_without_a_missing_file(tmp_path: Path) -> None:
    lines = [{"img": 5}, {"img": str(tmp_path) + "/"}, {"img": "  "}]
    path = write(tmp_path / "in.jsonl", jsonl(*lines))
    assert errors(read(path, image_field="img")) == {
        1: "image field 'img' is a number, not a string",
        2: f"cannot read image {str(tmp_path) + '/'!r}: Is a directory",
        3: "missing text field 'text' (and no image field 'img')",
    }


# Run in a child so that this process never changes its user: when root runs it, the child drops
# to nobody (after its imports, which may lie where nobody cannot read) and so loses root's right
# to read any file; otherwise it reads as the user running the tests.
READ_AS_A_PLAIN_USER = """
import os, pwd, sys
import orjson
from sfembed._sources import read_records

if os.geteuid() == 0:
    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
records = [[record.line, record.error] for record in read_records(sys.argv[1], image_field="image")]
sys.stdout.buffer.write(orjson.dumps({"uid": os.geteuid(), "records": records}))
"""


def read_as_a_plain_user(path: Path) -> tuple[int, dict[int, str | None]]:
    """The effective uid of a child that read ``path``'s images, and each record's error by line."""
    done = subprocess.run(
        [sys.executable, "-c", READ_AS_A_PLAIN_USER, str(path)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    answer = orjson.loads(done.stdout)
    return answer["uid"], dict(answer["records"])


def test_an_unreadable_image_file() -> None:
    # A folder in /tmp, which any user may enter (pytest's own folders, and TMPDIR, may be
    # root's alone when root runs the tests), so that the file's mode alone refuses it.
    folder = Path(
        tempfile.mkdtemp(prefix="sfembed-test-", dir="/tmp" if os.geteuid() == 0 else None)
    )
    try:
        folder.chmod(0o755)
        picture = write(folder / "locked.png", PIXEL)
        picture.chmod(0)
        readable = write(folder / "open.png", PIXEL)
        readable.chmod(0o644)
        path = write(folder / "in.jsonl", jsonl({"image": str(picture)}, {"image": str(readable)}))
        path.chmod(0o644)
        uid, errors_by_line = read_as_a_plain_user(path)
    finally:
        shutil.rmtree(folder)
    assert uid != 0  # root would read the locked file: the test would prove nothing
    assert errors_by_line == {
        1: f"cannot read image {str(picture)!r}: Permission denied",
        2: None,  # the same user reads its neighbour: the mode refused the first
    }


def test_image_paths_no_user_can_read(tmp_path: Path) -> None:
    """Entries that even root cannot open: a socket, and a link that leads back to itself."""
    sock = tmp_path / "socket.png"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        loop = tmp_path / "loop.png"
        loop.symlink_to(loop)
        path = write(tmp_path / "in.jsonl", jsonl({"image": str(sock)}, {"image": str(loop)}))
        records = read(path, image_field="image")
    assert errors(records) == {
        1: f"cannot read image {str(sock)!r}: No such device or address",
        2: f"cannot read image {str(loop)!r}: Too many levels of symbolic links",
    }


# --- plain text -------------------------------------------------------------------------------


def test_txt_one_document_per_line_with_line_number_ids(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbfalpha\r\n\n  \nbad \xff byte\nnul\x00\n" + b"y" * 50 + b"\nomega"
    records = read(write(tmp_path / "in.txt", data), max_line_bytes=40)
    assert records[0] == Record("1", "alpha", 1)
    assert records[-1] == Record("7", "omega", 7)
    assert errors(records) == {
        2: "blank line",
        3: "blank line",
        4: "invalid UTF-8 (invalid start byte) at byte 4 of the line",
        5: "NUL byte at character 3 of the line",
        6: "line longer than 40 bytes (50 bytes)",
    }


# --- CSV and TSV ------------------------------------------------------------------------------


def test_csv_columns_by_name_and_multi_line_quoted_fields(tmp_path: Path) -> None:
    data = 'n,body,key\n1,"first\nsecond\nthird",a\n2,plain,\n3,"say ""hi""",c\n'
    records = read(write(tmp_path / "in.csv", data), id_field="key", text_field="body")
    assert records == [
        Record("a", "first\nsecond\nthird", 2),
        Record("5", "plain", 5),  # no key: the record's first line
        Record("c", 'say "hi"', 6),
    ]


def test_csv_problems_keep_the_record_count_and_first_lines(tmp_path: Path) -> None:
    data = b'id,text\na,"ok\nstill"\n\nb\nc,\n"d,\xff",x\ne,"z\x00"\nf,last\n'
    assert [(r.id, r.line, r.error) for r in read(write(tmp_path / "in.csv", data))] == [
        ("a", 2, None),
        (None, 4, "blank line"),
        ("b", 5, "missing text field 'text'"),
        ("c", 6, "empty text in field 'text'"),
        (None, 7, "invalid UTF-8 (invalid start byte) at byte 3 of the line"),
        (None, 8, "NUL byte at character 4 of the line"),
        ("f", 9, None),
    ]


def test_malformed_csv_is_one_record_and_parsing_resumes(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", "id,text\n1,a\rb\n2,ok\n")
    assert read(path) == [
        Record(None, None, 2, "malformed CSV: new-line character seen in unquoted field"),
        Record("2", "ok", 3),
    ]


def test_csv_long_lines_and_records_do_not_lose_the_quoting(tmp_path: Path) -> None:
    big = "w" * 3000
    rows = [["1", "short"], ["2", big], ["3", f"x\n{big}\ny"], ["4", "a\n" * 60], ["5", "end"]]
    path = tmp_path / "in.csv"
    with path.open("w", newline="") as stream:
        csv.writer(stream, lineterminator="\n").writerows([["id", "text"], *rows])
    records = read(path, max_line_bytes=100)
    assert [(r.id, r.line, r.item) for r in records] == [
        ("1", 2, "short"),
        (None, 3, None),
        (None, 4, None),
        (None, 7, None),
        ("5", 68, "end"),
    ]
    assert [r.error for r in records[1:4]] == [
        "line longer than 100 bytes (3002 bytes)",
        "line longer than 100 bytes (3000 bytes)",
        "record longer than 100 bytes",
    ]


def csv_line(row: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(row)
    return out.getvalue()


def test_csv_quoting_survives_stubbed_lines_on_random_rows(tmp_path: Path) -> None:
    rng = random.Random(7)
    pieces = ["w", "w" * 150, '"', '""', ",", "\n", "\t", " "]
    rows = [[str(n), "".join(rng.choices(pieces, k=rng.randint(1, 12)))] for n in range(300)]
    encoded = [csv_line(row) for row in [["id", "text"], *rows]]
    write(tmp_path / "in.csv", "".join(encoded))
    records = read(tmp_path / "in.csv", max_line_bytes=200)
    starts = [1 + sum(text.count("\n") for text in encoded[:n]) for n in range(1, len(encoded))]
    assert [record.line for record in records] == starts
    for record, (n, text), raw in zip(records, rows, encoded[1:], strict=True):
        fits = len(raw) - 1 <= 200 and text.strip()  # the final newline is not counted
        assert (record.id, record.item) == (n, text) if fits else record.item is None
    assert sum(record.error is None for record in records) > 100


def test_tsv_by_suffix_and_by_format(tmp_path: Path) -> None:
    data = "id\ttext\nt1\tone, with a comma\n"
    expected = [Record("t1", "one, with a comma", 2)]
    assert read(write(tmp_path / "in.tsv", data)) == expected
    assert read(write(tmp_path / "in.dat", data), format="tsv") == expected


def test_csv_without_the_text_column_fails_at_open(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", "id,body\n1,x\n")
    with pytest.raises(ConfigError, match=r"no text column 'text' \(columns: id, body\)"):
        read_records(path)
    with pytest.raises(ConfigError, match="needs a header"):
        read_records(write(tmp_path / "empty.csv", ""))


def test_csv_image_column_may_stand_in_for_text(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", "id,url\n1,https://example.com/a.png\n")
    records = read(path, image_field="url")
    assert records == [Record("1", {"image": "https://example.com/a.png"}, 2)]


# --- Parquet ----------------------------------------------------------------------------------


def test_parquet_rows_by_column_name(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "key": [10, None, 12, 13],
            "body": ["one", "two", "", None],
            "extra": [1.0, 2.0, 3.0, 4.0],
        }
    )
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=2)
    records = read(path, id_field="key", text_field="body")
    assert records == [
        Record("10", "one", 1),
        Record("2", "two", 2),
        Record("12", None, 3, "empty text in field 'body'"),
        Record("13", None, 4, "text field 'body' is null, not a string"),
    ]


def test_parquet_without_pyarrow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    path = write(tmp_path / "in.parquet", b"PAR1")
    with pytest.raises(ConfigError, match=r"install sfembed\[parquet\]"):
        read_records(path)


def test_parquet_missing_column_and_bad_file(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a"]}), path)
    with pytest.raises(ConfigError, match="no text column 'text'"):
        read_records(path)
    with pytest.raises(ConfigError, match="cannot read Parquet file"):
        read_records(write(tmp_path / "bad.parquet", b"not parquet"))


# --- opening ----------------------------------------------------------------------------------


def test_formats_and_unknown_suffix_or_format(tmp_path: Path) -> None:
    assert FORMATS == ("jsonl", "txt", "csv", "tsv", "parquet")
    path = write(tmp_path / "in.xml", "<a/>")
    with pytest.raises(ConfigError, match=r"from its suffix.*jsonl, txt, csv, tsv, parquet"):
        read_records(path)
    with pytest.raises(ConfigError, match="unknown input format 'xml'; choose one of jsonl"):
        read_records(path, format="xml")


def test_unreadable_paths_fail_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read input .*No such file"):
        read_records(tmp_path / "absent.jsonl")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(ConfigError, match=r"input folder .*dir.txt' holds no input file"):
        read_records(tmp_path / "dir.txt")


def test_large_input_streams_without_reading_ahead(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", jsonl(*({"text": f"doc {n}"} for n in range(50_000))))
    records = read_records(path)
    assert next(records) == Record("1", "doc 0", 1, None, str(path))
    assert sum(1 for _ in records) == 49_999


# --- the job's reading in blocks: the same records as one by one --------------------------------


def _hostile_lines(rng: random.Random, count: int, rare: bool) -> list[bytes]:
    """JSONL lines, most of them good; 5% each wrong in its own way, or (``rare``) one of each
    way that is valid JSON, far apart, so that most blocks are clean."""
    bad = [
        b'{"id": 7, "text": "an int id"}',
        b'{"id": 123456789012345678901234567890, "text": "a huge id"}',
        b'{"id": "", "text": "empty id"}',
        b'{"text": "no id"}',
        b'{"id": "y", "text": ""}',
        b'{"id": "y", "text": " \\t "}',
        b'{"id": "y", "text": "a NUL \\u0000 inside"}',
        b'{"id": "y", "text": 5}',
        b'{"id": "y"}',
        b"[1, 2]",
        b'"a string"',
        b"",
        b"   ",
        b"{not json",
        b'{"id": "x", "text": "cut',
        b'{"id": "y", "text": "caf\xff bad utf-8"}',
        b'{"id": "y", "text": "a raw NUL \x00"}',
        b'{"id": "z", "text": "crlf"}\r',
        b'{"id": "w", "text": "' + b"long " * 40 + b'"}',
        b'{"id": "v", "text": "kept", "tag": [1, {"a": 2}], "img": "x.png"}',
    ]
    lines = []
    for n in range(count):
        if not rare and rng.random() < 0.05:
            lines.append(rng.choice(bad))
        else:
            text = " ".join(rng.choice(["river", "Quota", "中文", "é", "42"]) for _ in range(8))
            lines.append(orjson.dumps({"id": f"d{n}", "text": text, "tag": n}))
    if rare:
        for k, line in enumerate(bad[:9]):
            lines[(k + 1) * count // 10] = line
    return lines


def _flat_blocks(blocks: Any) -> list[tuple[Any, ...]]:
    rows = []
    for block in blocks:
        places = block.places
        for i, item in enumerate(block.inputs):
            kept = places.kept[i] if places.kept is not None else None
            rows.append((places.ids[i], places.lines[i], places.source, kept, item))
    return rows


def _flat_records(records: Any) -> list[tuple[Any, ...]]:
    return [
        (
            r.id,
            r.line,
            r.source,
            r.kept,
            r.item if r.item is not None else Unusable(r.error or "unusable"),
        )
        for r in records
    ]


@pytest.mark.parametrize("seed", range(8))
def test_blocks_hold_the_records_read_one_by_one(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(_sources, "_BLOCK_LINES", 16)  # a bad line alone among clean blocks
    # Often enough that each block has a bad line, or so rarely that most blocks have none.
    lines = _hostile_lines(rng, rng.choice([700, 3000]), rare=seed >= 3)
    if seed % 2:
        lines[0] = b"\xef\xbb\xbf" + lines[0]  # a byte order mark
    if seed % 3 == 0:
        lines.insert(
            rng.randrange(len(lines)), b'{"id": "huge", "text": "' + b"x" * 2_500_000 + b'"}'
        )
    data = b"\n".join(lines) + (b"\n" if seed % 4 else b"")  # the last line may lack its newline
    first = write(tmp_path / "a.jsonl", data)
    second = write(tmp_path / "b.jsonl", b"\n".join(lines[: len(lines) // 2]) + b"\n")
    gz = write(tmp_path / "c.jsonl.gz", gzip.compress(data))
    options: list[dict[str, Any]] = [
        {},
        {"max_line_bytes": 90},
        {"max_line_bytes": 100_000},
        {"keep_fields": ("tag",)},
        {"image_field": "img"},
    ]
    for inputs in ([first], [first, second], [gz]):
        sources = find_sources(inputs)
        for option in options:
            expected = _flat_records(read_sources(sources, **option))
            assert _flat_blocks(read_blocks(sources, **option)) == expected, (inputs, option)
