"""Hostile inputs, readers' class: whatever the files hold, every line or row is one record, in
order, with its source and line; what cannot be read is an error record or a clear refusal that
names the file (and line), never a merge, a made-up id, a traceback or a silent drop."""

from __future__ import annotations

import gzip
import logging
import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sfembed._exceptions import ConfigError
from sfembed._sources import Record, find_sources, read_records


def jsonl(*values: Any) -> bytes:
    return b"".join(orjson.dumps(value) + b"\n" for value in values)


def docs(shard: int, count: int) -> bytes:
    return jsonl(*({"id": f"s{shard}-{n}", "text": f"shard {shard} doc {n}"} for n in range(count)))


def read(inputs: Any, **options: Any) -> list[Record]:
    return list(read_records(inputs, **options))


def places(records: list[Record]) -> list[tuple[str, int]]:
    return [(Path(record.source).name, record.line) for record in records]


# --- compression ------------------------------------------------------------------------------


def test_gzip_and_zstd_by_suffix_and_by_their_first_bytes(tmp_path: Path) -> None:
    data = docs(0, 5)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (tmp_path / "c.jsonl").write_bytes(gzip.compress(data))  # no suffix says so: the bytes do
    (tmp_path / "d.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(b"id,text\nx,y\n"))
    for name in ("a.jsonl.gz", "b.jsonl.zst", "c.jsonl"):
        records = read(tmp_path / name)
        assert [r.item for r in records] == [f"shard 0 doc {n}" for n in range(5)], name
    assert read(tmp_path / "d.csv.zst")[0].item == "y"


def test_concatenated_gzip_members_and_zstd_frames_are_all_read(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(docs(0, 2)) + gzip.compress(docs(1, 2)))
    zstd = zstandard.ZstdCompressor()
    (tmp_path / "b.jsonl.zst").write_bytes(zstd.compress(docs(0, 2)) + zstd.compress(docs(1, 2)))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        assert [r.id for r in read(tmp_path / name)] == ["s0-0", "s0-1", "s1-0", "s1-1"]


def test_a_truncated_gzip_shard_gives_its_lines_then_one_error_naming_where(
    tmp_path: Path,
) -> None:
    packed = gzip.compress(docs(0, 2000))
    (tmp_path / "a.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(docs(1, 3)))
    records = read([tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"])
    bad = [r for r in records if r.error is not None]
    assert len(bad) == 1
    assert bad[0].id is None
    assert Path(bad[0].source).name == "a.jsonl.gz"
    assert bad[0].error is not None
    assert bad[0].error.startswith(f"unreadable after line {bad[0].line - 1} (")
    assert [r.id for r in records[-3:]] == ["s1-0", "s1-1", "s1-2"]  # the next shard goes on


def test_a_compression_suffix_the_bytes_deny_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(docs(0, 2))
    with pytest.raises(ConfigError, match=r"'.*a.jsonl.gz' is named .gz but is not gzip data"):
        read_records(tmp_path / "a.jsonl.gz")


def test_a_compressed_file_without_a_format_suffix_needs_the_format(tmp_path: Path) -> None:
    (tmp_path / "corpus.gz").write_bytes(gzip.compress(docs(0, 2)))
    with pytest.raises(ConfigError, match=r"cannot tell the format of .*corpus.gz"):
        read_records(tmp_path / "corpus.gz")
    assert len(read(tmp_path / "corpus.gz", format="jsonl")) == 2


def test_compressed_or_piped_parquet_is_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "t.parquet")
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress((tmp_path / "t.parquet").read_bytes()))
    with pytest.raises(ConfigError, match=r"'.*t.parquet.gz' is compressed"):
        read_records(tmp_path / "t.parquet.gz")
    with pytest.raises(ConfigError, match="Parquet cannot be read from standard input"):
        read_records("-", format="parquet")


# --- several inputs ---------------------------------------------------------------------------


def test_a_folder_of_shards_is_read_in_sorted_order_with_each_record_placed(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in (3, 0, 2, 1):
        data = docs(shard, 3)
        if shard % 2:
            (folder / f"part-{shard}.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor().compress(data)
            )
        else:
            (folder / f"part-{shard}.jsonl.gz").write_bytes(gzip.compress(data))
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".hidden.jsonl").write_bytes(docs(9, 1))
    records = read(folder)
    assert [r.id for r in records] == [f"s{s}-{n}" for s in range(4) for n in range(3)]
    assert places(records)[:4] == [
        ("part-0.jsonl.gz", 1),
        ("part-0.jsonl.gz", 2),
        ("part-0.jsonl.gz", 3),
        ("part-1.jsonl.zst", 1),
    ]


def test_paths_and_globs_are_read_in_sorted_order_whatever_order_they_are_named(
    tmp_path: Path,
) -> None:
    for shard in range(3):
        (tmp_path / f"p{shard}.jsonl").write_bytes(docs(shard, 1))
    named = [tmp_path / "p2.jsonl", tmp_path / "p0.jsonl", tmp_path / "p1.jsonl"]
    assert [r.id for r in read(named)] == ["s0-0", "s1-0", "s2-0"]
    assert [r.id for r in read(str(tmp_path / "p*.jsonl"))] == ["s0-0", "s1-0", "s2-0"]
    assert [s.name for s in find_sources(str(tmp_path / "p[12].jsonl"))] == [
        str(tmp_path / "p1.jsonl"),
        str(tmp_path / "p2.jsonl"),
    ]


def test_ids_made_from_line_numbers_name_the_source_when_there_are_several(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("three\n")
    ids = [r.id for r in read(tmp_path)]
    assert ids == [f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 'a.txt'}:2", f"{tmp_path / 'b.txt'}:1"]
    assert [r.id for r in read(tmp_path / "a.txt")] == ["1", "2"]  # one source: as before


def test_folder_and_glob_refusals_name_what_is_wrong(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"input folder '.*empty' holds no input file"):
        read_records(empty)
    with pytest.raises(ConfigError, match=r"no input file matches '.*nothing-\*.jsonl'"):
        read_records(str(tmp_path / "nothing-*.jsonl"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_bytes(docs(0, 1))
    (mixed / "b.csv").write_text("id,text\n1,x\n")
    with pytest.raises(ConfigError, match=r"mix formats: '.*a.jsonl' is jsonl but '.*b.csv' is"):
        read_records(mixed)
    (mixed / "b.csv").unlink()
    (mixed / "notes.md").write_text("# read me")
    with caplog.at_level(logging.WARNING, logger="sfembed"):
        assert len(read(mixed)) == 1
    assert "skipped notes.md" in caplog.text
    with pytest.raises(ConfigError, match=r"input '.*a.jsonl' is named twice"):
        read_records([mixed / "a.jsonl", mixed])
    with pytest.raises(ConfigError, match="must be the only input"):
        read_records(["-", mixed / "a.jsonl"])


def test_a_shard_that_cannot_be_read_is_named_before_anything_is_read(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(docs(0, 1))
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(ConfigError, match=r"cannot read input '.*b.jsonl': No such file"):
        read_records(tmp_path)


def test_a_later_csv_shard_without_the_text_column_is_refused_at_once(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id,text\n1,x\n")
    (tmp_path / "b.csv.gz").write_bytes(gzip.compress(b"id,body\n2,y\n"))
    with pytest.raises(ConfigError, match=r"'.*b.csv.gz' has no text column 'text'"):
        read_records(tmp_path)


# --- pipes ------------------------------------------------------------------------------------


def test_a_fifo_is_streamed_once_even_compressed(tmp_path: Path) -> None:
    path = tmp_path / "pipe.jsonl"
    for data in (docs(0, 500), gzip.compress(docs(0, 500))):
        os.mkfifo(path)
        (source,) = find_sources(path)  # finding it reads nothing
        assert not source.rereadable
        writer = threading.Thread(target=path.write_bytes, args=(data,), daemon=True)
        writer.start()
        records = read(path)
        writer.join(timeout=5)
        assert [r.id for r in records] == [f"s0-{n}" for n in range(500)]
        path.unlink()


# --- CSV and TSV quoting ----------------------------------------------------------------------


def test_a_quote_in_tsv_is_text_and_swallows_no_line(tmp_path: Path) -> None:
    lines = ["id\ttext", '1\t"quoted start', "2\tplain", '3\tmid "quote', '4\t"', "5\tend", '6\t""']
    path = tmp_path / "in.tsv"
    path.write_text("\n".join(lines) + "\n")
    records = read(path)
    assert [(r.id, r.item, r.line) for r in records] == [
        ("1", '"quoted start', 2),
        ("2", "plain", 3),
        ("3", 'mid "quote', 4),
        ("4", '"', 5),
        ("5", "end", 6),
        ("6", '""', 7),
    ]


def test_an_unterminated_csv_quote_is_one_error_and_the_lines_after_it_are_records(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,text\n1,"never closed\n2,two\n3,three\n')
    records = read(path)
    assert [(r.id, r.line, r.item) for r in records] == [
        (None, 2, None),
        ("2", 3, "two"),
        ("3", 4, "three"),
    ]
    assert records[0].error == "malformed CSV: a quoted field opened on this line is never closed"


def test_a_stray_csv_quote_closed_by_a_later_line_is_no_merge(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,text\n1,"stray\n2,two\n3,"closing" here\n4,four\n')
    records = read(path)
    assert [(r.id, r.line) for r in records] == [(None, 2), ("2", 3), (None, 4), ("4", 5)]
    assert records[0].error == "malformed CSV: ',' expected after '\"'"


def test_a_csv_quote_running_over_a_thousand_lines_is_an_error_not_a_merge(
    tmp_path: Path,
) -> None:
    body = "".join(f"{n},line {n}\n" for n in range(3, 1503))
    path = tmp_path / "in.csv"
    path.write_text(f'id,text\n1,"opens here\n{body}')
    records = read(path)
    assert len(records) == 1 + 1500
    assert records[0].id is None
    assert "runs on past 1,000 lines" in (records[0].error or "")
    assert [r.item for r in records[1:3]] == ["line 3", "line 4"]
    assert records[-1].line == 1502


def test_multi_line_csv_fields_still_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,text\n1,"a\nb\n\nc"\n2,"say ""hi"""\n')
    assert [(r.id, r.item, r.line) for r in read(path)] == [
        ("1", "a\nb\n\nc", 2),
        ("2", 'say "hi"', 6),
    ]


# --- ids --------------------------------------------------------------------------------------


def test_a_record_that_cannot_be_parsed_has_no_id_but_its_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"id": "1", "text": "a"}\n{"id": "2", "text": \n\n{"id": "3", "text": "c"}\n'
    )
    records = read(path)
    assert [(r.id, r.line, r.item is None) for r in records] == [
        ("1", 1, False),
        (None, 2, True),
        (None, 3, True),
        ("3", 4, False),
    ]


def test_large_integer_ids_keep_every_digit(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"id": 123456789012345678901234567890, "text": "a"}\n'
        b'{"id": 18446744073709551617, "text": "b"}\n'
        b'{"id": 9007199254740993, "text": "c"}\n'
        b'{"id": 1.5, "text": "d"}\n'
    )
    assert [r.id for r in read(path)] == [
        "123456789012345678901234567890",
        "18446744073709551617",
        "9007199254740993",
        "1.5",
    ]


# --- JSON arrays ------------------------------------------------------------------------------


def test_a_json_array_file_is_read_as_an_array(tmp_path: Path) -> None:
    values = [{"id": n, "text": f"doc {n}"} for n in range(402)]
    path = tmp_path / "in.json"
    path.write_bytes(b"\xef\xbb\xbf  \n" + orjson.dumps(values, option=orjson.OPT_INDENT_2))
    records = read(path)
    assert len(records) == 402
    assert all(r.error is None for r in records)
    assert (records[7].id, records[7].item, records[7].line) == ("7", "doc 7", 8)


def test_a_json_array_too_big_or_broken_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_bytes(orjson.dumps([{"text": "x" * 100}] * 20))
    with pytest.raises(ConfigError, match=r"one JSON array over 1,000 bytes.*jq -c"):
        read(path, max_line_bytes=1000)
    path.write_bytes(b'[{"text": "a"}, {"text": ')
    (record,) = read(path)
    assert record.id is None
    assert (record.error or "").startswith("malformed JSON array")


# --- BOM, CRLF, NUL, empty --------------------------------------------------------------------


def test_bom_crlf_and_nul_in_every_text_format(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "one"}\r\n{"text": "t\x00o"}\r\n')
    (tmp_path / "a.csv").write_bytes(bom + b"id,text\r\n1,one\r\n2,t\x00o\r\n")
    (tmp_path / "a.tsv").write_bytes(bom + b"id\ttext\r\n1\tone\r\n2\tt\x00o\r\n")
    (tmp_path / "a.txt").write_bytes(bom + b"one\r\nt\x00o\r\n")
    for name in ("a.jsonl", "a.csv", "a.tsv", "a.txt"):
        records = read(tmp_path / name)
        assert [r.item for r in records] == ["one", None], name
        assert "NUL byte" in (records[1].error or ""), name
        assert records[1].line == 2 if name in ("a.jsonl", "a.txt") else 3, name


def test_empty_inputs(tmp_path: Path) -> None:
    for name in ("a.jsonl", "a.txt", "a.jsonl.gz"):
        (tmp_path / name).write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"")
        assert read(tmp_path / name) == []
    for name in ("a.csv", "a.tsv"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(
            ConfigError, match=r"'.*a\.[ct]sv' is empty: a [CT]SV file needs a head"
        ):
            read_records(tmp_path / name)


# --- Parquet ----------------------------------------------------------------------------------


def test_a_parquet_string_that_is_not_utf8_is_one_error_record(tmp_path: Path) -> None:
    data = b"okbad\xff\xfefine"
    offsets = pa.py_buffer(bytes(pa.array([0, 2, 7, 11], pa.int32()).buffers()[1]))
    texts = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(data)])
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts}), path)
    records = read(path)
    assert [(r.id, r.item, r.line) for r in records] == [
        ("a", "ok", 1),
        ("b", None, 2),
        ("c", "fine", 3),
    ]
    assert records[1].error == "invalid UTF-8 (invalid start byte) in column 'text'"


def test_a_damaged_parquet_row_group_is_named_and_the_others_are_read(tmp_path: Path) -> None:
    table = pa.table(
        {"id": [f"d{n}" for n in range(30)], "text": [f"doc {n} " * 20 for n in range(30)]}
    )
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=10, compression="snappy", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    start = column.data_page_offset + 20
    data[start : column.data_page_offset + column.total_compressed_size - 5] = b"\xff" * (
        column.total_compressed_size - 25
    )
    path.write_bytes(bytes(data))
    records = read(path)
    assert len(records) == 30
    assert [r.id for r in records[:10] + records[20:]] == [
        f"d{n}" for n in (*range(10), *range(20, 30))
    ]
    lost = records[10:20]
    assert [r.line for r in lost] == list(range(11, 21))
    assert all(r.id is None and "row group 1 of" in (r.error or "") for r in lost)
    assert all("\n" not in (r.error or "") for r in lost)
