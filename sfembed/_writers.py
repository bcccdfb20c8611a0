"""Output writers: ordered rows to ``.npy``, ``.jsonl`` or ``.parquet`` with flat memory.

The pipeline hands a writer consecutive batches already in input order; a writer appends each one
and keeps nothing of it afterwards (Parquet alone pools small batches into a bounded row group), so
memory does not grow with the corpus.

Formats (chosen from the suffix unless ``format`` is given):

``npy``
    One float32 (or float16) matrix of shape (rows, dims); row i is the i-th row written and a
    failed row is NaN. Rows stream to disk; the header has a fixed length of 128 bytes, so its
    row count is rewritten in place every ``flush_rows`` rows and on close. After a crash the
    file still loads with ``np.load``, holding the rows committed by the last flush. The record
    ids go to a sidecar ``<stem>.ids.jsonl`` (``out.npy`` -> ``out.ids.jsonl``), one JSON object
    per row, in row order::

        {"row": 0, "id": "doc-1"}                                                  # pool mode
        {"row": 7, "id": "doc-3", "position": 3, "chunk": 1, "span": [812, 1650]}  # chunks mode

    ``position`` is the record's input position, ``chunk`` the chunk's number in its record and
    ``span`` its [start, end) characters in the record's text. The sidecar is flushed before each
    header update, so it always holds at least the committed rows (read only the first ``rows``).

``jsonl``
    One line per row: ``{"id": ..., "embedding": [...]}``, with ``"chunk"`` and ``"span"`` in
    chunks mode; a failed row is ``"embedding": null, "error": true``.

``parquet`` (needs ``pip install sfembed[parquet]``)
    Columns ``id`` (string) and ``embedding`` (fixed_size_list<float>[dims], null for a failed
    row), plus ``chunk`` (int64) and ``span`` (fixed_size_list<int64>[2]) in chunks mode. Small
    batches are pooled into row groups of at most 65,536 rows or 32 MiB of vectors.
"""

from __future__ import annotations

import importlib
import io
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import IO, Any, Protocol, Self

import numpy as np
import orjson

from ._config import OUTPUT_FORMATS as FORMATS
from ._direct import Appender
from ._exceptions import ConfigError
from ._types import EmbeddedBatch

__all__ = [
    "DTYPES",
    "FORMATS",
    "Committed",
    "JsonlWriter",
    "NpyWriter",
    "ParquetWriter",
    "Writer",
    "ids_path_for",
    "open_writer",
    "reopen_at",
]

#: Element types of ``.npy`` output.
DTYPES = ("float32", "float16")

_SUFFIXES = {".npy": "npy", ".jsonl": "jsonl", ".parquet": "parquet", ".lance": "lance"}
_NPY_HEADER_BYTES = 128  # whole header, magic included; a multiple of 64 keeps the data aligned
_NPY_PREAMBLE_BYTES = 10  # magic (6), version (2), header length (2) of format 1.0


@dataclass(frozen=True, slots=True)
class Committed:
    """What a writer has made durable: ``rows`` rows, held by the first ``lengths[role]`` bytes of
    each of its files (roles ``output`` and, for ``.npy``, ``ids``). Anything past those lengths
    is a torn write; a writer resumed from a ``Committed`` cuts it off."""

    rows: int
    lengths: Mapping[str, int]


class Writer(Protocol):
    """An open output file taking consecutive batches of rows; a context manager that closes."""

    rows: int  # rows written so far

    def write(
        self,
        ids: Sequence[str | None],
        batch: EmbeddedBatch,
        *,
        places: Sequence[tuple[str, int]] | None = None,
        kept: Sequence[tuple[object, ...]] | None = None,
    ) -> None:
        """Append ``batch``; ``ids[i]`` is the record id of its row i, ``places[i]`` its
        (source, line) when a job reads several sources, ``kept[i]`` the input fields an output
        carries over (LanceDB)."""

    def close(self) -> None:
        """Finalise the file; idempotent."""

    def commit(self) -> Committed:
        """Make every row written so far durable and say where it ends. Raises ConfigError for
        a format that cannot be resumed (Parquet), OSError when the disk refuses."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def open_writer(
    path: str | Path,
    *,
    format: str | None = None,
    dims: int,
    dtype: str = "float32",
    fsync: bool = False,
    resume: Committed | None = None,
    ids_path: Path | None = None,
    table: str = "",
    keep_fields: Sequence[str] = (),
    open_now: bool = True,
) -> Writer:
    """Open ``path`` for rows of ``dims`` floats, in ``format`` or the one its suffix names.

    ``dtype`` (``float32`` or ``float16``) applies to ``.npy`` output only. With ``fsync`` every
    commit reaches the disk before it returns. With ``resume`` the files are reopened, cut back to
    what was committed, and rows are appended after it. ``ids_path`` places an ``.npy``'s id
    sidecar elsewhere than ``ids_path_for(path)``. Raises ConfigError for an unknown format
    or suffix, a bad ``dims`` or ``dtype``, a missing pyarrow (Parquet), a Parquet ``resume``, a
    file that does not hold what ``resume`` says, or a path that cannot be opened for writing.
    LanceDB output (``lance``) is the table ``path`` names, or ``table`` in the folder it names,
    with the input fields ``keep_fields`` carried over; a resume writes into it again (rows are
    upserted by id). With ``open_now`` false a table is opened and checked later (see
    ``LanceWriter``); it is ignored for the other formats.
    """
    name = _format_of(Path(path), format)
    if dtype != "float32" and name != "npy":
        raise ConfigError(f"dtype {dtype!r} is for npy output only; {name} is written as float32")
    if resume is not None and name == "parquet":
        raise ConfigError("a Parquet file cannot be resumed: use .npy or .jsonl output")
    try:
        if name == "npy":
            return NpyWriter(
                path, dims=dims, dtype=dtype, fsync=fsync, resume=resume, ids_path=ids_path
            )
        if name == "jsonl":
            return JsonlWriter(path, dims=dims, fsync=fsync, resume=resume)
        if name == "lance":
            from ._lance import LanceWriter  # lancedb is imported only when it is used

            writer = LanceWriter(
                path, dims=dims, table=table or None, keep_fields=keep_fields, open_now=open_now
            )
            writer.rows = resume.rows if resume is not None else 0
            return writer
        return ParquetWriter(path, dims=dims)
    except OSError as error:
        raise ConfigError(f"cannot write {os.fspath(path)!r}: {error.strerror or error}") from error


def _format_of(path: Path, format: str | None) -> str:
    if format is None:
        name = _SUFFIXES.get(path.suffix.lower())
        if name is None:
            choices = ", ".join(_SUFFIXES)
            raise ConfigError(f"cannot tell the output format of {str(path)!r}: use {choices}")
        return name
    if format.lower() not in FORMATS:
        raise ConfigError(f"unknown output format {format!r}: choose {', '.join(FORMATS)}")
    return format.lower()


def ids_path_for(path: str | Path) -> Path:
    """The id sidecar of an ``.npy`` output: ``out.npy`` -> ``out.ids.jsonl``."""
    return Path(path).with_suffix(".ids.jsonl")


def format_of(path: str | Path, format: str | None = None) -> str:
    """The output format ``open_writer`` would use for ``path``. Raises ConfigError."""
    return _format_of(Path(path), format)


def reopen_at(path: Path, length: int, *, cut: bool = True) -> IO[bytes]:
    """``path`` opened for appending after its first ``length`` bytes; the rest, a torn write,
    is cut off (with ``cut`` false, later by ``_cut``, once every check has passed). Raises
    ConfigError when the file is missing or shorter than ``length``."""
    if length < 0:
        raise ConfigError(f"cannot resume: the checkpoint holds no length for {str(path)!r}")
    try:
        file = open(path, "r+b")  # noqa: SIM115 - the caller owns it
    except FileNotFoundError:
        raise ConfigError(f"cannot resume: {str(path)!r} is missing") from None
    size = os.fstat(file.fileno()).st_size
    if size < length:
        file.close()
        raise ConfigError(
            f"cannot resume: {str(path)!r} holds {size} bytes, fewer than the {length} "
            "its checkpoint committed (it was changed or damaged); run again without --resume"
        )
    if cut:
        _cut(file, length)
    return file


def _cut(file: IO[bytes], length: int) -> None:
    file.truncate(length)
    file.seek(length)


def _sync(*files: IO[bytes]) -> None:
    for file in files:
        os.fsync(file.fileno())


class _BaseWriter:
    """Checks and bookkeeping shared by the writers: row count, closing, chunks mode."""

    def __init__(self, path: str | Path, dims: int) -> None:
        if isinstance(dims, bool) or not isinstance(dims, int) or dims <= 0:
            raise ConfigError(f"dims must be a positive integer, not {dims!r}")
        self.path = Path(path)
        self.dims = dims
        self.rows = 0
        self.closed = False
        self._chunks: bool | None = None  # set by the first batch; every later one must match

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Close on errors too: the rows written so far are complete and worth keeping.
        self.close()

    def write(
        self,
        ids: Sequence[str | None],
        batch: EmbeddedBatch,
        *,
        places: Sequence[tuple[str, int]] | None = None,
        kept: Sequence[tuple[object, ...]] | None = None,
    ) -> None:
        """Append ``batch``; ``ids[i]`` is the record id of its row i, ``places[i]`` its
        (source, line) in a job over several sources (the ``.npy`` sidecar names them); ``kept``
        is for outputs that carry input fields over, and these do not.

        Raises ValueError when the writer is closed, the rows are not (n, dims), ``ids`` does not
        match them, or the batch's mode (chunks or not) differs from earlier batches'.
        """
        self._check(ids, batch)
        if len(batch):
            self._append(ids, batch, places)
            self.rows += len(batch)

    def close(self) -> None:
        """Finalise the file; later calls do nothing."""
        if not self.closed:
            self.closed = True
            self._finish()

    def _append(
        self,
        ids: Sequence[str | None],
        batch: EmbeddedBatch,
        places: Sequence[tuple[str, int]] | None,
    ) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _check(self, ids: Sequence[str | None], batch: EmbeddedBatch) -> None:
        if self.closed:
            raise ValueError(f"write to closed writer of {str(self.path)!r}")
        shape = batch.embeddings.shape
        if len(shape) != 2 or shape[1] != self.dims:
            raise ValueError(f"rows of shape {shape} given to a writer of {self.dims} dims")
        if not len(ids) == len(batch) == shape[0]:
            raise ValueError(f"{len(ids)} ids, {len(batch)} positions and {shape[0]} rows")
        chunks = batch.chunk_numbers is not None
        if chunks and batch.spans is None:
            raise ValueError("a chunks-mode batch needs spans along with chunk_numbers")
        if self._chunks is not None and chunks != self._chunks:
            raise ValueError("chunks-mode and record-mode batches cannot share one output")
        self._chunks = chunks


def _chunk_meta(batch: EmbeddedBatch) -> tuple[list[int], list[list[int]]] | None:
    """(chunk numbers, [start, end] spans) as Python lists, or None outside chunks mode."""
    if batch.chunk_numbers is None or batch.spans is None:
        return None
    return batch.chunk_numbers.tolist(), batch.spans.tolist()


def _failed_rows(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """True for each row holding a NaN: the pipeline leaves failed rows all NaN."""
    failed: np.ndarray[Any, np.dtype[np.bool_]] = np.isnan(rows).any(axis=1)
    return failed


class NpyWriter(_BaseWriter):
    """Rows appended to an ``.npy`` file whose header is rewritten in place, plus an id sidecar.

    Memory holds one batch (converted to ``dtype`` if need be) and a 1 MiB stage of rows, written
    directly where the file system allows (see ``_direct``). Every ``flush_rows`` rows the data
    and sidecar reach the OS, then the header's row count is updated (with ``fsync``, each also
    reaches the disk before the next step), so a reader never sees a count beyond the data.
    Raises ConfigError for a bad ``dims``, ``dtype`` or ``flush_rows``, OSError if ``path`` or
    its sidecar cannot be created.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        dims: int,
        dtype: str = "float32",
        flush_rows: int = 8192,
        fsync: bool = False,
        resume: Committed | None = None,
        ids_path: Path | None = None,
    ) -> None:
        super().__init__(path, dims)
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: choose {', '.join(DTYPES)}")
        if flush_rows <= 0:
            raise ConfigError(f"flush_rows must be positive, not {flush_rows}")
        self.dtype = np.dtype(dtype).newbyteorder("<")  # .npy readers honour the descr; fix it
        self.ids_path = ids_path or ids_path_for(path)
        self._flush_rows = flush_rows
        self._fsync = fsync
        self._data: IO[bytes]
        if resume is None:
            self._data = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        else:
            self._data = self._resumed(resume)
        try:
            self._ids = self._open_ids(resume)
            self._data.flush()  # from here on, the appender alone writes the rows
            self._out = Appender(self.path, self._data.fileno(), self._data.tell())
        except BaseException:
            self._data.close()
            if hasattr(self, "_ids"):
                self._ids.close()
            raise
        try:
            if resume is None:
                self._out.write(memoryview(self._header(0)))
            # A reader may look before the first flush: show it a valid file. Not synced: no
            # checkpoint counts on these bytes, and the first one syncs them (the three fsyncs
            # held up a job's first request by 1-70 ms, with a busy disk the most).
            self._commit(durable=False)
        except BaseException:
            self._close_files()
            raise

    def _resumed(self, resume: Committed) -> IO[bytes]:
        """The data file cut back to ``resume``, once its header and size and the sidecar's size
        agree with it: a refused resume cuts nothing (the file may not be this job's)."""
        expected = _NPY_HEADER_BYTES + resume.rows * self.dims * self.dtype.itemsize
        if resume.lengths.get("output") != expected:
            raise ConfigError(f"cannot resume {str(self.path)!r}: its checkpoint is inconsistent")
        data = reopen_at(self.path, expected, cut=False)
        try:
            header = io.BytesIO(data.read(_NPY_HEADER_BYTES))
            try:
                np.lib.format.read_magic(header)
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
            except ValueError:
                shape, fortran, dtype = (), True, None
            if len(shape) != 2 or shape[1] != self.dims or fortran or dtype != self.dtype:
                raise ConfigError(
                    f"cannot resume: {str(self.path)!r} is not the .npy this job wrote"
                )
            # The sidecar too is checked before either file is cut.
            reopen_at(self.ids_path, resume.lengths.get("ids", -1), cut=False).close()
        except BaseException:
            data.close()
            raise
        _cut(data, expected)
        self.rows = resume.rows
        return data

    def _open_ids(self, resume: Committed | None) -> IO[bytes]:
        if resume is None:
            return open(self.ids_path, "wb")
        return reopen_at(self.ids_path, resume.lengths.get("ids", -1))

    def write(
        self,
        ids: Sequence[str | None],
        batch: EmbeddedBatch,
        *,
        places: Sequence[tuple[str, int]] | None = None,
        kept: Sequence[tuple[object, ...]] | None = None,
    ) -> None:
        """Append ``batch`` (see ``_BaseWriter.write``), committing every ``flush_rows`` rows."""
        super().write(ids, batch, places=places)
        if self.rows - self._committed >= self._flush_rows:
            self.flush()

    def flush(self) -> None:
        """Commit the rows written so far: data and sidecar first, then the header's count.

        Raises ValueError when closed, OSError when the disk refuses.
        """
        if self.closed:
            raise ValueError(f"flush of closed writer of {str(self.path)!r}")
        self._commit()

    def _append(
        self,
        ids: Sequence[str | None],
        batch: EmbeddedBatch,
        places: Sequence[tuple[str, int]] | None,
    ) -> None:
        rows = np.ascontiguousarray(batch.embeddings, dtype=self.dtype)
        self._out.write(rows.data.cast("B"))
        _write_sidecar(self._ids, self.rows, ids, batch, places)

    def commit(self) -> Committed:
        """Commit (see :meth:`flush`) and say what is durable. Raises as :meth:`flush`."""
        self.flush()
        return Committed(self.rows, {"output": self._out.end, "ids": self._ids.tell()})

    def _commit(self, *, durable: bool = True) -> None:
        self._out.flush()
        self._ids.flush()
        if durable:
            self._sync(self._data, self._ids)
        self._out.patch(0, self._header(self.rows))
        if durable:
            self._sync(self._data)
        self._committed = self.rows

    def _sync(self, *files: IO[bytes]) -> None:
        if self._fsync:
            _sync(*files)

    def _finish(self) -> None:
        try:
            self._commit()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        self._out.close()
        self._data.close()
        self._ids.close()

    def _header(self, rows: int) -> bytes:
        """A format 1.0 header of exactly ``_NPY_HEADER_BYTES`` bytes for (rows, dims)."""
        described = f"{{'descr': '{self.dtype.str}', 'fortran_order': False, 'shape': "
        described += f"({rows}, {self.dims}), }}"
        room = _NPY_HEADER_BYTES - _NPY_PREAMBLE_BYTES
        if len(described) + 1 > room:  # unreachable below 10**30 rows; guards a silent overrun
            raise ValueError(f"shape ({rows}, {self.dims}) does not fit the fixed .npy header")
        # numpy pads with spaces and ends the header with a newline; so do we.
        text = described.ljust(room - 1).encode("latin1") + b"\n"
        return np.lib.format.magic(1, 0) + struct.pack("<H", room) + text


def _write_sidecar(
    file: IO[bytes],
    first: int,
    ids: Sequence[str | None],
    batch: EmbeddedBatch,
    places: Sequence[tuple[str, int]] | None = None,
) -> None:
    """Write the sidecar lines of ``batch``, whose first row is row ``first`` of the output;
    with ``places``, each line names its record's source and line."""
    rows = range(first, first + len(ids))
    meta = _chunk_meta(batch)
    lines: list[dict[str, object]]
    if meta is None:
        lines = [{"row": row, "id": id_} for row, id_ in zip(rows, ids, strict=True)]
    else:
        columns = zip(rows, ids, batch.positions.tolist(), *meta, strict=True)
        lines = [
            {"row": row, "id": id_, "position": position, "chunk": number, "span": span}
            for row, id_, position, number, span in columns
        ]
    if places is not None:
        for line, (source, number) in zip(lines, places, strict=True):
            line["source"], line["line"] = source, number
    _write_json_lines(file, lines)


def _write_json_lines(file: IO[bytes], objects: Sequence[dict[str, object]]) -> None:
    """Write one JSON line per object, made by a single orjson call over the whole list.

    One call, not one per row: orjson gives every result a buffer of at least 4 KiB, which per
    row costs more than the row. The objects are flat, share their first key and hold no nested
    objects, so ``},{"<first key>":`` occurs only between them (a quote inside a JSON string is
    always escaped), and replacing it splits the array into lines.
    """
    if not objects:
        return
    head = orjson.dumps(next(iter(objects[0])))
    text = orjson.dumps(objects, option=orjson.OPT_SERIALIZE_NUMPY)
    text = text.replace(b"},{" + head + b":", b"}\n{" + head + b":")
    file.write(memoryview(text)[1:-1])  # a view: slicing bytes would copy the whole batch again
    file.write(b"\n")


class JsonlWriter(_BaseWriter):
    """One JSON line per row; vectors are serialised by orjson straight from the numpy rows.

    Raises ConfigError for a bad ``dims``, OSError if ``path`` cannot be created.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        dims: int,
        fsync: bool = False,
        resume: Committed | None = None,
    ) -> None:
        super().__init__(path, dims)
        self._fsync = fsync
        self._file: IO[bytes]
        if resume is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        else:
            self._file = reopen_at(self.path, resume.lengths.get("output", -1))
            self.rows = resume.rows

    def flush(self) -> None:
        """Hand the lines written so far to the OS (and the disk, with ``fsync``). Raises
        ValueError when closed."""
        if self.closed:
            raise ValueError(f"flush of closed writer of {str(self.path)!r}")
        self._file.flush()
        if self._fsync:
            _sync(self._file)

    def commit(self) -> Committed:
        """Flush and say what is durable. Raises as :meth:`flush`."""
        self.flush()
        return Committed(self.rows, {"output": self._file.tell()})

    def _append(
        self,
        ids: Sequence[str | None],
        batch: EmbeddedBatch,
        places: Sequence[tuple[str, int]] | None,
    ) -> None:
        rows = np.ascontiguousarray(batch.embeddings, dtype=np.float32)
        failed = _failed_rows(rows).tolist()
        meta = _chunk_meta(batch)
        lines: list[dict[str, object]] = []
        for i, id_ in enumerate(ids):
            line: dict[str, object] = {"id": id_}  # first key: lines are split on it
            if meta is not None:
                line["chunk"], line["span"] = meta[0][i], meta[1][i]
            if failed[i]:
                line["embedding"], line["error"] = None, True
            else:
                line["embedding"] = rows[i]  # a contiguous row view: orjson formats it natively
            lines.append(line)
        _write_json_lines(self._file, lines)

    def _finish(self) -> None:
        self._file.close()


def _import_pyarrow() -> tuple[ModuleType, ModuleType]:
    """(pyarrow, pyarrow.parquet). Raises ConfigError when pyarrow is not installed."""
    try:
        return importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")
    except ImportError as error:
        raise ConfigError("Parquet output needs pyarrow: pip install 'sfembed[parquet]'") from error


class ParquetWriter(_BaseWriter):
    """Rows to a Parquet file, pooled into row groups of at most ``group_rows`` rows.

    A row group is written once the pooled rows reach ``group_rows`` or their vectors
    ``group_bytes`` bytes, so memory stays under about ``group_bytes`` plus one batch. The schema
    (with or without the chunks-mode columns) follows the first batch; a file closed with no rows
    has the record-mode schema. Raises ConfigError when pyarrow is missing or ``dims`` is bad,
    OSError if ``path`` cannot be created.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        dims: int,
        group_rows: int = 65_536,
        group_bytes: int = 32 << 20,
    ) -> None:
        super().__init__(path, dims)
        self._pa, self._pq = _import_pyarrow()
        if group_rows <= 0 or group_bytes <= 0:
            raise ConfigError("group_rows and group_bytes must be positive")
        self._group_rows = group_rows
        self._group_bytes = group_bytes
        self._pooled: list[Any] = []  # pyarrow RecordBatches not yet in a row group
        self._pooled_rows = 0
        self._pooled_bytes = 0
        self._sink = self._pa.OSFile(os.fspath(self.path), "wb")
        self._writer: Any = None  # the pyarrow writer, made with the first batch's schema

    def commit(self) -> Committed:
        """Always raises ConfigError: a Parquet file is whole only once closed, so it cannot be
        resumed."""
        raise ConfigError("a Parquet file cannot be resumed: use .npy or .jsonl output")

    def flush(self) -> None:
        """Write the pooled rows as a row group now. Raises ValueError when closed."""
        if self.closed:
            raise ValueError(f"flush of closed writer of {str(self.path)!r}")
        self._write_group()

    def _append(
        self,
        ids: Sequence[str | None],
        batch: EmbeddedBatch,
        places: Sequence[tuple[str, int]] | None,
    ) -> None:
        # A copy: the pooled rows outlive this call and the caller may reuse its buffer.
        rows = np.array(batch.embeddings, dtype=np.float32, order="C", copy=True)
        record = self._record(ids, batch, rows)
        if self._writer is None:
            self._writer = self._open(record.schema)
        self._pooled.append(record)
        self._pooled_rows += len(rows)
        self._pooled_bytes += rows.nbytes
        if self._pooled_rows >= self._group_rows or self._pooled_bytes >= self._group_bytes:
            self._write_group()

    def _record(
        self, ids: Sequence[str | None], batch: EmbeddedBatch, rows: np.ndarray[Any, Any]
    ) -> Any:
        pa = self._pa
        columns = {"id": pa.array(list(ids), type=pa.string())}
        if batch.chunk_numbers is not None and batch.spans is not None:
            columns["chunk"] = pa.array(batch.chunk_numbers.astype(np.int64))
            spans = np.ascontiguousarray(batch.spans, dtype=np.int64).reshape(-1)
            columns["span"] = pa.FixedSizeListArray.from_arrays(pa.array(spans), 2)
        columns["embedding"] = self._vectors(rows)
        return pa.RecordBatch.from_pydict(columns)

    def _vectors(self, rows: np.ndarray[Any, Any]) -> Any:
        """A fixed_size_list<float> array over ``rows``' buffer (no copy); failed rows null."""
        pa = self._pa
        kind = pa.list_(pa.float32(), self.dims)
        values = pa.array(rows.reshape(-1))
        failed = _failed_rows(rows)
        validity = None
        if failed.any():
            # Arrow's validity bitmap: bit i (least significant first) set when row i is valid.
            validity = pa.py_buffer(np.packbits(~failed, bitorder="little"))
        return pa.Array.from_buffers(kind, len(rows), [validity], children=[values])

    def _open(self, schema: Any) -> Any:
        # Dictionary encoding cannot shrink unique ids or float vectors; it only costs time.
        return self._pq.ParquetWriter(self._sink, schema, use_dictionary=False)

    def _write_group(self) -> None:
        if not self._pooled:
            return
        table = self._pa.Table.from_batches(self._pooled)
        self._writer.write_table(table, row_group_size=self._pooled_rows)
        self._pooled, self._pooled_rows, self._pooled_bytes = [], 0, 0

    def _finish(self) -> None:
        try:
            self._write_group()
            if self._writer is None:  # no rows: still a valid, empty file
                empty = self._record([], _EMPTY_BATCH, np.empty((0, self.dims), np.float32))
                self._writer = self._open(empty.schema)
            self._writer.close()
        finally:
            self._sink.close()


_EMPTY_BATCH = EmbeddedBatch(np.empty(0, np.int64), np.empty((0, 0), np.float32))
