"""Writers: every format round-trips rows and ids in order, keeps failed rows, and stays flat."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from sfembed._exceptions import ConfigError
from sfembed._types import EmbeddedBatch
from sfembed._writers import (
    FORMATS,
    JsonlWriter,
    NpyWriter,
    ParquetWriter,
    ids_path_for,
    open_writer,
)

DIMS = 6


def _batch(
    first: int, count: int, *, failed: tuple[int, ...] = (), chunks: bool = False
) -> EmbeddedBatch:
    """Rows ``first..first+count``: row r holds r + k/10 in column k; ``failed`` rows are NaN."""
    positions = np.arange(first, first + count, dtype=np.int64)
    rows = (positions[:, None] + np.arange(DIMS) / 10).astype(np.float32)
    for row in failed:
        rows[row - first] = np.nan
    if not chunks:
        return EmbeddedBatch(positions, rows)
    # Two chunks per record: rows 2p and 2p+1 are chunks 0 and 1 of record p.
    starts = (positions % 2) * 100
    spans = np.stack([starts, starts + 100 + positions], axis=1)
    return EmbeddedBatch(positions // 2, rows, positions % 2, spans)


def _ids(batch: EmbeddedBatch) -> list[str]:
    return [f"doc-{p}" for p in batch.positions.tolist()]


def _write_all(path: Path, batches: list[EmbeddedBatch], **options: Any) -> np.ndarray:
    with open_writer(path, dims=DIMS, **options) as writer:
        for batch in batches:
            writer.write(_ids(batch), batch)
        assert writer.rows == sum(len(b) for b in batches)
    return np.concatenate([b.embeddings for b in batches] or [np.empty((0, DIMS), np.float32)])


def _sidecar(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ids_path_for(path).read_text("utf-8").splitlines()]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture
def pq() -> ModuleType:
    module: ModuleType = pytest.importorskip("pyarrow.parquet")
    return module


# --- .npy ---------------------------------------------------------------------------------


def test_npy_round_trips_rows_and_ids_in_order(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    expected = _write_all(path, [_batch(0, 3), _batch(3, 1), _batch(4, 5)])
    loaded = np.load(path)
    assert loaded.dtype == np.float32
    assert loaded.shape == (9, DIMS)
    assert np.array_equal(loaded, expected)
    assert _sidecar(path) == [{"row": r, "id": f"doc-{r}"} for r in range(9)]
    assert ids_path_for(path) == tmp_path / "out.ids.jsonl"


def test_npy_float16_converts_each_batch(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    expected = _write_all(path, [_batch(0, 4), _batch(4, 4, failed=(5,))], dtype="float16")
    loaded = np.load(path)
    assert loaded.dtype == np.float16
    assert np.array_equal(loaded, expected.astype(np.float16), equal_nan=True)
    assert np.isnan(loaded[5]).all()


def test_npy_keeps_failed_rows_as_nan(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    expected = _write_all(path, [_batch(0, 4, failed=(0, 2))])
    loaded = np.load(path)
    assert np.isnan(loaded[[0, 2]]).all()
    assert np.array_equal(loaded, expected, equal_nan=True)


def test_npy_sidecar_describes_chunks(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    _write_all(path, [_batch(0, 3, chunks=True), _batch(3, 2, chunks=True)])
    lines = _sidecar(path)
    assert lines[0] == {"row": 0, "id": "doc-0", "position": 0, "chunk": 0, "span": [0, 100]}
    assert lines[3] == {"row": 3, "id": "doc-1", "position": 1, "chunk": 1, "span": [100, 203]}
    assert [line["row"] for line in lines] == list(range(5))


def test_npy_header_counts_committed_rows_before_close(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    with NpyWriter(path, dims=DIMS, flush_rows=4) as writer:
        assert np.load(path).shape == (0, DIMS)
        writer.write(_ids(_batch(0, 3)), _batch(0, 3))
        assert np.load(path).shape == (0, DIMS)  # written, not committed: not visible yet
        writer.write(_ids(_batch(3, 2)), _batch(3, 2))
        assert np.array_equal(np.load(path), _batch(0, 5).embeddings)
        assert len(_sidecar(path)) >= 5
        writer.write(_ids(_batch(5, 1)), _batch(5, 1))
        writer.flush()
        assert np.array_equal(np.load(path, mmap_mode="r"), _batch(0, 6).embeddings)
    assert np.load(path).shape == (6, DIMS)


def test_npy_header_has_a_fixed_aligned_length(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    _write_all(path, [_batch(0, 2)])
    with path.open("rb") as file:
        assert np.lib.format.read_magic(file) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        assert (shape, fortran, dtype) == ((2, DIMS), False, np.dtype("<f4"))
        assert file.tell() == 128
    assert path.stat().st_size == 128 + 2 * DIMS * 4


def test_npy_with_no_rows_loads_empty(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    _write_all(path, [])
    assert np.load(path).shape == (0, DIMS)
    assert ids_path_for(path).read_bytes() == b""


# --- .jsonl -------------------------------------------------------------------------------


def test_jsonl_round_trips_exact_float32_values(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    rng = np.random.default_rng(7)
    batch = EmbeddedBatch(np.arange(5), rng.standard_normal((5, DIMS)).astype(np.float32))
    with open_writer(path, dims=DIMS) as writer:
        writer.write(list("abcde"), batch)
        writer.write(["f"], _batch(5, 1))
    lines = _jsonl(path)
    assert [line["id"] for line in lines] == list("abcdef")
    assert set(lines[0]) == {"id", "embedding"}
    got = np.array([line["embedding"] for line in lines], dtype=np.float32)
    assert np.array_equal(got, np.concatenate([batch.embeddings, _batch(5, 1).embeddings]))


def test_jsonl_failed_rows_are_null_with_error(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    _write_all(path, [_batch(0, 3, failed=(1,))])
    lines = _jsonl(path)
    assert lines[1] == {"id": "doc-1", "embedding": None, "error": True}
    assert "error" not in lines[0]
    assert lines[2]["embedding"] == pytest.approx(_batch(2, 1).embeddings[0].tolist())


def test_jsonl_chunks_mode_adds_chunk_and_span(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    _write_all(path, [_batch(0, 2, chunks=True), _batch(2, 2, chunks=True, failed=(3,))])
    lines = _jsonl(path)
    assert [(line["id"], line["chunk"], line["span"]) for line in lines] == [
        ("doc-0", 0, [0, 100]),
        ("doc-0", 1, [100, 201]),
        ("doc-1", 0, [0, 102]),
        ("doc-1", 1, [100, 203]),
    ]
    assert lines[3]["error"] is True


# --- .parquet -----------------------------------------------------------------------------


def _parquet_vectors(table: Any) -> np.ndarray:
    column = table["embedding"].combine_chunks()
    return np.asarray(column.values, dtype=np.float32).reshape(len(column), DIMS)


def test_parquet_round_trips_rows_and_ids(tmp_path: Path, pq: ModuleType) -> None:
    path = tmp_path / "out.parquet"
    expected = _write_all(path, [_batch(0, 3), _batch(3, 4)])
    table = pq.read_table(path)
    assert table.column_names == ["id", "embedding"]
    assert str(table.schema.field("embedding").type) == f"fixed_size_list<element: float>[{DIMS}]"
    assert table["id"].to_pylist() == [f"doc-{r}" for r in range(7)]
    assert np.array_equal(_parquet_vectors(table), expected)


def test_parquet_failed_rows_are_null(tmp_path: Path, pq: ModuleType) -> None:
    path = tmp_path / "out.parquet"
    expected = _write_all(path, [_batch(0, 10, failed=(0, 9))])
    table = pq.read_table(path)
    column = table["embedding"].combine_chunks()
    assert column.is_null().to_pylist() == [True] + [False] * 8 + [True]
    assert np.array_equal(_parquet_vectors(table)[1:9], expected[1:9])


def test_parquet_chunks_mode_columns(tmp_path: Path, pq: ModuleType) -> None:
    path = tmp_path / "out.parquet"
    _write_all(path, [_batch(0, 3, chunks=True)])
    table = pq.read_table(path)
    assert table.column_names == ["id", "chunk", "span", "embedding"]
    assert table["chunk"].to_pylist() == [0, 1, 0]
    assert table["span"].to_pylist() == [[0, 100], [100, 201], [0, 102]]


def test_parquet_pools_small_batches_into_bounded_row_groups(
    tmp_path: Path, pq: ModuleType
) -> None:
    path = tmp_path / "out.parquet"
    with ParquetWriter(path, dims=DIMS, group_rows=5) as writer:
        for first in range(0, 12, 3):
            writer.write(_ids(_batch(first, 3)), _batch(first, 3))
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [6, 6]
    assert np.array_equal(_parquet_vectors(pq.read_table(path)), _batch(0, 12).embeddings)


def test_parquet_with_no_rows_is_a_valid_empty_file(tmp_path: Path, pq: ModuleType) -> None:
    path = tmp_path / "out.parquet"
    _write_all(path, [])
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.column_names == ["id", "embedding"]


def test_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"sfembed\[parquet\]"):
        open_writer(tmp_path / "out.parquet", dims=DIMS)


# --- all formats --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_close_is_idempotent_and_ends_writing(tmp_path: Path, name: str) -> None:
    if name == "parquet":
        pytest.importorskip("pyarrow")
    writer = open_writer(tmp_path / f"out.{name}", dims=DIMS)
    writer.write(["a"], _batch(0, 1))
    writer.close()
    writer.close()
    assert writer.rows == 1
    with pytest.raises(ValueError, match="closed"):
        writer.write(["b"], _batch(1, 1))


@pytest.mark.parametrize("name", FORMATS)
def test_context_manager_closes_even_on_error(tmp_path: Path, name: str) -> None:
    if name == "parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"out.{name}"
    writer = open_writer(path, dims=DIMS)

    def fail_mid_job() -> None:
        with writer:
            writer.write(["a", "b"], _batch(0, 2))
            raise RuntimeError("the job broke")

    with pytest.raises(RuntimeError):
        fail_mid_job()
    with pytest.raises(ValueError, match="closed"):
        writer.write(["c"], _batch(2, 1))
    # What was written before the error is complete and readable.
    if name == "npy":
        assert np.load(path).shape == (2, DIMS)
    elif name == "jsonl":
        assert len(_jsonl(path)) == 2


@pytest.mark.parametrize("name", FORMATS)
def test_bad_batches_are_refused(tmp_path: Path, name: str) -> None:
    if name == "parquet":
        pytest.importorskip("pyarrow")
    narrow = open_writer(tmp_path / f"out.{name}", format=name, dims=DIMS + 1)
    with narrow, pytest.raises(ValueError, match="dims"):
        narrow.write(["a"], _batch(0, 1))
    with open_writer(tmp_path / f"out2.{name}", dims=DIMS) as writer:
        with pytest.raises(ValueError, match="ids"):
            writer.write(["a"], _batch(0, 2))
        writer.write(["a"], _batch(0, 1))
        with pytest.raises(ValueError, match="chunks-mode"):
            writer.write(["b"], _batch(1, 1, chunks=True))
        assert writer.rows == 1


def test_format_comes_from_suffix_or_argument(tmp_path: Path) -> None:
    with open_writer(tmp_path / "out.JSONL", dims=DIMS) as writer:
        assert isinstance(writer, JsonlWriter)
    with open_writer(tmp_path / "vectors.bin", format="npy", dims=DIMS) as writer:
        assert isinstance(writer, NpyWriter)
    assert (tmp_path / "vectors.ids.jsonl").exists()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("out.csv", {}, r"\.npy, \.jsonl, \.parquet"),
        ("out", {}, "cannot tell the output format"),
        ("out.npy", {"format": "hdf5"}, "npy, jsonl, parquet"),
        ("out.npy", {"dtype": "float64"}, "float32, float16"),
        ("out.jsonl", {"dtype": "float16"}, "npy output only"),
        ("out.npy", {"dims": 0}, "dims"),
        ("missing/out.npy", {}, "cannot write"),
    ],
)
def test_bad_settings_raise_config_error(
    tmp_path: Path, name: str, options: dict[str, Any], message: str
) -> None:
    settings: dict[str, Any] = {"dims": DIMS, **options}
    with pytest.raises(ConfigError, match=message):
        open_writer(tmp_path / name, **settings)


@pytest.mark.parametrize("name", ["npy", "jsonl"])
def test_awkward_ids_survive_the_line_splitting(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"out.{name}"
    ids = ["line\nbreak", '},{"id":"forged"}', '},{"row":7}', "ünïcödé 🧪"]
    with open_writer(path, dims=DIMS) as writer:
        writer.write(ids, _batch(0, 4, chunks=True))
    lines = _sidecar(path) if name == "npy" else _jsonl(path)
    assert [line["id"] for line in lines] == ids


@pytest.mark.parametrize("name", ["npy", "jsonl"])
def test_memory_does_not_grow_with_rows(tmp_path: Path, name: str) -> None:
    batch = _batch(0, 256, failed=(3,), chunks=True)
    ids = _ids(batch)
    tracemalloc.start()
    try:
        with open_writer(tmp_path / f"out.{name}", dims=DIMS) as writer:
            writer.write(ids, batch)
            settled = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for _ in range(200):
                writer.write(ids, batch)
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 200 more batches (~100 KiB of encoded text each) went through; only one is ever held.
    assert peak - settled < 512 * 1024
