"""The LanceDB sink: rows upserted by id into a LanceDB table, so a nightly job keeps one table
current instead of writing a new file.

A table has the columns ``id`` (string), ``vector`` (fixed_size_list<float32>[dims], null for a
failed record), ``error`` (string, null for an embedded one) and any columns carried over from
the input (``keep_fields``, as text: a value that is not a string is kept as its JSON). Rows are
pooled up to ``group_rows`` rows or ``group_bytes`` bytes of vectors, then merged into the table
in one ``merge_insert`` on ``id``: an id already there is updated, a new one inserted; but a
failed row never replaces a vector (a record that fails tonight keeps the one an earlier night
gave it). Memory stays under about ``group_bytes`` plus one batch, and a rerun (or a resumed run
writing its rows again) leaves exactly one row per id. A record without a readable id has no row
(the errors file names it by its line). Needs ``pip install 'sfembed[lance]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import orjson

from ._exceptions import ConfigError
from ._types import EmbeddedBatch

if TYPE_CHECKING:
    from ._writers import Committed

__all__ = ["LanceWriter", "lance_location"]

_SUFFIX = ".lance"


_MISSING = "LanceDB output needs lancedb: pip install 'sfembed[lance]'"


def _import_lancedb() -> tuple[ModuleType, ModuleType]:
    """(lancedb, pyarrow). Raises ConfigError when they are not installed."""
    try:
        return importlib.import_module("lancedb"), importlib.import_module("pyarrow")
    except ImportError:
        raise ConfigError(_MISSING) from None


def _check_installed() -> None:
    """Raise ConfigError when lancedb or pyarrow is not installed, without importing them
    (lancedb's import takes seconds)."""
    if any(importlib.util.find_spec(name) is None for name in ("lancedb", "pyarrow")):
        raise ConfigError(_MISSING)


def lance_location(path: str | Path, table: str | None = None) -> tuple[Path, str]:
    """(database folder, table name) of an output: ``data/vectors.lance`` is table ``vectors``
    in ``data``; a folder with ``table`` is that table in it. Raises ConfigError for neither."""
    where = Path(path)
    if table:
        if where.suffix.lower() == _SUFFIX:
            raise ConfigError(
                f"name the table once: {str(where)!r} already names table {where.stem!r}"
            )
        return where, table
    if where.suffix.lower() != _SUFFIX or not where.stem:
        raise ConfigError(
            f"LanceDB output {str(where)!r}: name a table as NAME.lance, or a folder with --table"
        )
    return where.parent, where.stem


class LanceWriter:
    """Rows upserted by id into a LanceDB table (see the module docstring).

    ``keep_fields`` names the input columns carried over, given to ``write`` as ``kept`` (one
    tuple of values per row). Raises ConfigError when lancedb is missing, ``dims`` is bad, the
    table exists with other columns or another vector width, or chunks-mode rows are written.

    With ``open_now`` false the table is neither opened nor checked here (importing lancedb
    alone takes seconds): :meth:`open` does it, on a thread of the caller's choosing, and raises
    what this would have; rows are only pooled until then, and nothing reaches the table first.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        dims: int,
        table: str | None = None,
        keep_fields: Sequence[str] = (),
        group_rows: int = 65_536,
        group_bytes: int = 32 << 20,
        open_now: bool = True,
    ) -> None:
        if dims <= 0:
            raise ConfigError(f"dims must be positive, not {dims}")
        reserved = {"id", "vector", "error"} & set(keep_fields)
        if reserved:
            raise ConfigError(
                f"--keep-fields cannot carry {', '.join(sorted(reserved))}: "
                "the table has a column of that name already"
            )
        self.folder, self.name = lance_location(path, table)
        self.dims = dims
        self.keep_fields = tuple(keep_fields)
        self.rows = 0
        self.closed = False
        self._group_rows, self._group_bytes = group_rows, group_bytes
        self._pooled: dict[str, tuple[np.ndarray[Any, Any], str | None, tuple[object, ...]]] = {}
        self._pooled_bytes = 0
        self._table: Any = None
        if open_now:
            self.open()
        else:
            _check_installed()

    def open(self, *, create: bool = True) -> None:
        """Import lancedb, open the table (made if missing) and check its columns; idempotent.
        Without ``create`` a missing table is left to be made by the first merge or commit: a
        job that ends before writing anything leaves no empty table. Raises ConfigError as the
        class says."""
        if self._table is None:
            self._lancedb, self._pa = _import_lancedb()
            self._table = self._open(create=create)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self, *, create: bool) -> Any:
        try:
            os.makedirs(self.folder, exist_ok=True)
            database = self._lancedb.connect(os.fspath(self.folder))
            try:
                table = database.open_table(self.name)
            except ValueError:  # lancedb's "table not found"
                if not create:
                    return None
                return database.create_table(self.name, schema=self._schema())
            self._check_schema(table.schema)
            return table
        except OSError as error:
            raise ConfigError(
                f"cannot write LanceDB table {self.name!r} in {str(self.folder)!r}: {error}"
            ) from None

    def _schema(self) -> Any:
        pa = self._pa
        return pa.schema(
            [
                pa.field("id", pa.string()),
                pa.field("vector", pa.list_(pa.float32(), self.dims)),
                pa.field("error", pa.string()),
                *(pa.field(name, pa.string()) for name in self.keep_fields),
            ]
        )

    def _check_schema(self, schema: Any) -> None:
        names = [name for name in schema.names if name not in ("id", "vector", "error")]
        vector = schema.field("vector").type if "vector" in schema.names else None
        width = getattr(vector, "list_size", None)
        if (
            "id" not in schema.names
            or width != self.dims
            or sorted(names) != sorted(self.keep_fields)
        ):
            vectors = "no vector column" if vector is None else f"vectors of {width} dims"
            if vector is not None and width is None:
                vectors = f"vectors of type {vector}"  # a variable-size list, say
            raise ConfigError(
                f"LanceDB table {self.name!r} in {str(self.folder)!r} has columns "
                f"{', '.join(schema.names)} with {vectors}; this job writes id, "
                f"vector ({self.dims} dims), error{''.join(', ' + n for n in self.keep_fields)}: "
                "write to another table"
            )

    def write(
        self,
        ids: Sequence[str | None],
        batch: EmbeddedBatch,
        *,
        places: Sequence[tuple[str, int]] | None = None,
        kept: Sequence[tuple[object, ...]] | None = None,
    ) -> None:
        """Pool ``batch``'s rows under their ids (a later row of an id replaces an earlier one);
        ``kept[i]`` holds the carried-over values of row i (``places`` is not stored). Raises
        ValueError when closed or given chunks-mode rows or mismatched lengths."""
        if self.closed:
            raise ValueError(f"write to closed LanceDB writer of table {self.name!r}")
        if batch.chunk_numbers is not None:
            raise ValueError("LanceDB output holds one row per record: no chunks-mode rows")
        rows = np.asarray(batch.embeddings, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dims or len(ids) != len(rows):
            raise ValueError(f"{len(ids)} ids and rows of shape {rows.shape} for {self.dims} dims")
        reasons = _reasons(batch, rows)
        empty: tuple[object, ...] = (None,) * len(self.keep_fields)
        for i, ident in enumerate(ids):
            if ident is None:
                continue  # no id to upsert under: the errors file names it by its line
            vector = rows[i].copy()
            error = reasons.get(i)
            if error is None and np.isnan(vector).any():
                error = "not embedded"
            self._pooled.pop(ident, None)  # a repeated id goes to the end, with its new row
            self._pooled[ident] = (vector, error, kept[i] if kept is not None else empty)
            self._pooled_bytes += vector.nbytes
        self.rows += len(ids)
        if len(self._pooled) >= self._group_rows or self._pooled_bytes >= self._group_bytes:
            self._merge()

    def commit(self) -> Committed:
        """Merge what is pooled into the table (each merge is a durable table version); returns
        the writer's ``Committed`` for a job's checkpoint."""
        from ._writers import Committed  # here: _writers imports this module lazily

        self.open()  # a job vouching for no row still has its table
        self._merge()
        return Committed(self.rows, {})

    def close(self) -> None:
        """Merge what is pooled; idempotent."""
        if self.closed:
            return
        try:
            self._merge()
        finally:
            self.closed = True

    def _merge(self) -> None:
        if not self._pooled:
            return
        self.open()  # the table's check comes before any row reaches it
        data = self._arrow(self._pooled)
        (
            self._table.merge_insert("id")
            # A record that failed today keeps the vector an earlier night gave it.
            .when_matched_update_all(where="source.vector IS NOT NULL OR target.vector IS NULL")
            .when_not_matched_insert_all()
            .execute(data, on_bad_vectors="null")  # a failed record's vector is null by design
        )
        self._pooled, self._pooled_bytes = {}, 0

    def _arrow(
        self, pooled: dict[str, tuple[np.ndarray[Any, Any], str | None, tuple[object, ...]]]
    ) -> Any:
        pa = self._pa
        vectors = np.stack([vector for vector, _, _ in pooled.values()])  # float32, a new array
        failed = np.isnan(vectors).any(axis=1)
        validity = None
        if failed.any():
            vectors[failed] = 0.0  # under a null: never read
            validity = pa.py_buffer(np.packbits(~failed, bitorder="little"))
        values = pa.array(vectors.reshape(-1))  # over the array's buffer, no copy
        kind = pa.list_(pa.float32(), self.dims)
        columns = {
            "id": pa.array(list(pooled), type=pa.string()),
            "vector": pa.Array.from_buffers(kind, len(vectors), [validity], children=[values]),
            "error": pa.array([error for _, error, _ in pooled.values()], type=pa.string()),
        }
        for n, name in enumerate(self.keep_fields):
            texts = [_as_text(kept[n]) for _, _, kept in pooled.values()]
            columns[name] = pa.array(texts, type=pa.string())
        return pa.Table.from_pydict(columns, schema=self._schema())


def _as_text(value: object) -> str | None:
    """A carried-over value as text: strings as they are, anything else as its JSON."""
    if value is None or isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def _reasons(batch: EmbeddedBatch, rows: np.ndarray[Any, Any]) -> dict[int, str]:
    """Each failed row's reason, by its row in the batch. One failure per failed row, matched in
    input order (a job may have shifted the rows' positions, not the failures')."""
    failed = np.flatnonzero(np.isnan(rows).any(axis=1)).tolist()
    ordered = sorted(batch.failures, key=lambda failure: failure.position)
    return {row: failure.reason for row, failure in zip(failed, ordered, strict=False)}
