"""The errors file of a job: one JSON line per record (or chunk) that could not be embedded.

Each line names the record by its id and its 1-based line (or row) in the input, and gives the
reason: ``{"id": "doc-7", "line": 8, "reason": "empty text"}``, plus ``"chunk"`` for a piece
of a long record in ``chunks`` mode. The file is created on the first failure only, so a clean
job leaves none.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import IO

import orjson

from ._sources import Place
from ._types import EmbeddedBatch
from ._writers import reopen_at

__all__ = ["ErrorLog"]

log = logging.getLogger("sfembed")


class ErrorLog:
    """The errors file at ``path``, opened on the first failure; ``reasons`` counts its entries
    by reason group (see ``_report.reason_group``), an earlier run's committed ones included.

    ``resume_length`` (bytes committed by an earlier run) reopens the file cut back to it; 0
    removes what a crashed run may have left, as nothing of it was committed. ``path`` may be
    changed before the file is opened (a fresh run moves its files into place at its first
    checkpoint); once opened, the file goes on where it is, renamed or not.
    """

    def __init__(
        self,
        path: Path,
        resume_length: int | None = None,
        *,
        reasons: Counter[str] | None = None,
    ) -> None:
        self.path = path
        self.reasons = reasons if reasons is not None else Counter()
        self._file: IO[bytes] | None = None
        self._closed_length: int | None = None  # the length it was closed at, made durable
        if resume_length:
            self._file = reopen_at(path, resume_length)
            self._count_earlier(resume_length)
        elif resume_length == 0:
            path.unlink(missing_ok=True)

    def _count_earlier(self, length: int) -> None:
        """Count the reasons of the entries an earlier run committed."""
        from ._report import reason_group  # on a resume or a failure only, as below

        assert self._file is not None
        self._file.seek(0)
        for line in self._file.read(length).splitlines():
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                self.reasons[reason_group(str(orjson.loads(line).get("reason")))] += 1
        self._file.seek(length)

    @property
    def opened(self) -> bool:
        """True once a failure has been written (the file exists)."""
        return self._file is not None

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            try:
                if exc_info[0] is None:  # a Parquet job saves once its files are closed
                    self._closed_length = self.commit()
            finally:
                self._file.close()

    def write(self, batch: EmbeddedBatch, where: list[Place], *, with_source: bool) -> int:
        """Log the failures of ``batch``, whose row i is the record ``where[i]``, by its id and
        line (and its source, ``with_source``: a job over several inputs); returns how many.
        Each is also logged at WARNING, named by id and line."""
        if not batch.failures:
            return 0
        from ._report import reason_group  # a job that fails nothing does without

        rows = {position: row for row, position in enumerate(batch.positions.tolist())}
        lines = []
        for failure in batch.failures:
            record = where[rows[failure.position]]
            record_id, line = record.id, record.line
            entry: dict[str, object] = {"id": record_id}
            if with_source:
                entry["source"] = record.source
            entry["line"], entry["reason"] = line, failure.reason
            if failure.chunk is not None:
                entry["chunk"] = failure.chunk
            lines.append(orjson.dumps(entry) + b"\n")
            self.reasons[reason_group(failure.reason)] += 1
            named = (
                f"record {record_id!r} (line {line})" if record_id is not None else f"line {line}"
            )
            log.warning("%s failed: %s", named, failure.reason)
        self._out().write(b"".join(lines))
        return len(batch.failures)

    def commit(self) -> int:
        """Make the entries written so far durable; returns the file's length in bytes."""
        if self._file is None:
            return 0
        if self._file.closed:
            if self._closed_length is None:
                raise ValueError("the errors file was closed by a failed job: nothing to commit")
            return self._closed_length
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def _out(self) -> IO[bytes]:
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        return self._file
