"""Input files -> records, streamed: JSON Lines, plain text, CSV/TSV and Parquet.

Every line (or row) of the input yields exactly one :class:`Record`, in order, so that output rows
and input records stay aligned and countable: a line that cannot be used still yields a record,
with ``item`` ``None`` and ``error`` saying why. Nothing is held whole: lines are read as bytes in
bounded pieces, so a 100 MB line costs about twice ``max_line_bytes`` of memory, then is skipped.
"""

from __future__ import annotations

import csv
import importlib
import re
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import orjson

from ._exceptions import ConfigError
from ._request import _IMAGE_SUFFIXES

__all__ = ["FORMATS", "Record", "read_records"]

#: Input format names ``read_records`` accepts (``tsv`` is CSV with tabs).
FORMATS = ("jsonl", "txt", "csv", "tsv", "parquet")

_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "txt",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_BUFFER = 1 << 20  # bytes; large reads keep the per-line cost in C
_PIECE = 1 << 20  # bytes read at a time while passing over an over-long line
_PARQUET_BATCH = 1024  # rows per Arrow batch: bounds memory when texts are long
_BOM = b"\xef\xbb\xbf"
_MISSING: Any = object()
_URL_PREFIXES = ("http://", "https://", "data:")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_MAX_PATH = 4096  # characters; a longer image value is data, never a path
_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number"}
_JSON_KINDS.update({float: "a number", bool: "a boolean", type(None): "null"})


@dataclass(frozen=True, slots=True)
class Record:
    """One input record.

    ``id`` comes from the id field, or is the line number when there is none. ``item`` is the text,
    or ``{"image": value}`` for the multimodal model, or ``None`` when the record is unusable, and
    then ``error`` says why. ``line`` is 1-based: the line (JSONL, TXT), the first line of the CSV
    record, or the Parquet row number.
    """

    id: str
    item: str | dict[str, str] | None
    line: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Fields:
    id: str
    text: str
    image: str | None


def read_records(
    path: str | Path,
    *,
    format: str | None = None,
    id_field: str = "id",
    text_field: str = "text",
    image_field: str | None = None,
    max_line_bytes: int = 16 * 2**20,
) -> Iterator[Record]:
    """Stream the records of ``path``, one per input line (or CSV record, or Parquet row).

    ``format`` is one of :data:`FORMATS`, else inferred from the suffix. ``max_line_bytes`` bounds
    one line in bytes, not counting its newline (for CSV, one record, which may span lines); a
    longer one becomes an error record. With ``image_field``, a record whose image field is
    present and non-empty gives ``{"image": value}``, any other its text; an image value that is
    a local path (relative to the working directory) must be readable, or the record is unusable.

    Raises ConfigError at once (not on first iteration) for an unknown format, an unreadable file,
    a CSV or Parquet file without the text column, or Parquet without pyarrow installed.
    """
    where = Path(path)
    kind = _format_of(where, format)
    if max_line_bytes < 1:
        raise ConfigError(f"max_line_bytes must be at least 1, not {max_line_bytes}")
    fields = _Fields(id_field, text_field, image_field or None)
    _check_readable(where)
    if kind == "parquet":
        return _parquet_records(where, _parquet_columns(where, fields), fields)
    if kind in ("csv", "tsv"):
        delimiter = "\t" if kind == "tsv" else ","
        header = _csv_header(where, delimiter, fields, max_line_bytes)
        return _csv_records(where, delimiter, header, fields, max_line_bytes)
    reader = _jsonl_records if kind == "jsonl" else _txt_records
    return reader(where, fields, max_line_bytes)


def _format_of(path: Path, format: str | None) -> str:
    if format is not None:
        if format.lower() not in FORMATS:
            raise ConfigError(
                f"unknown input format {format!r}; choose one of {', '.join(FORMATS)}"
            )
        return format.lower()
    kind = _BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(_BY_SUFFIX)
        raise ConfigError(
            f"cannot tell the format of {str(path)!r} from its suffix (known: {known}); "
            f"name one of {', '.join(FORMATS)}"
        )
    return kind


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read input {str(path)!r}: {exc.strerror or exc}") from None


# --- lines ------------------------------------------------------------------------------------


def _lines(stream: IO[bytes], limit: int) -> Iterator[tuple[bytes, str | None]]:
    """Each line's bytes with its newline and ``None``; for a line over ``limit`` bytes, ``b""``
    and the reason, having read past it in pieces (it is never held whole)."""
    readline = stream.readline
    while raw := readline(limit + 1):
        if len(raw) > limit and not raw.endswith(b"\n"):
            yield b"", _pass_long_line(readline, raw, limit)
        else:
            yield raw, None


def _rest_of_line(readline: Callable[[int], bytes], first: bytes) -> Iterator[bytes]:
    """``first`` and the pieces after it up to and including the newline (or the end of file)."""
    piece = first
    while piece:
        yield piece
        if piece.endswith(b"\n"):
            return
        piece = readline(_PIECE)


def _pass_long_line(readline: Callable[[int], bytes], first: bytes, limit: int) -> str:
    """Read to the end of a line that began with ``first`` and say how long it was."""
    size = sum(len(piece.rstrip(b"\n")) for piece in _rest_of_line(readline, first))
    return _too_long(limit, size)


def _too_long(limit: int, size: int) -> str:
    return f"line longer than {limit} bytes ({size} bytes)"


def _decode(raw: bytes) -> tuple[str, str | None]:
    """The line as text (kept, with replacements, even when bad) and what is wrong with it:
    invalid UTF-8 or a NUL byte (which no model input should carry)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        text = raw.decode(errors="replace").replace("\x00", "")
        return text, f"invalid UTF-8 ({exc.reason}) at byte {exc.start} of the line"
    nul = text.find("\x00")
    if nul >= 0:
        return text.replace("\x00", ""), f"NUL byte at character {nul} of the line"
    return text, None


def _unusable(line: int, error: str) -> Record:
    return Record(str(line), None, line, error)


# --- JSON Lines -------------------------------------------------------------------------------


def _jsonl_records(path: Path, fields: _Fields, limit: int) -> Iterator[Record]:
    # The hot loop of a job: the reading is inlined rather than taken from _lines, as a generator
    # between it and orjson costs a fifth of the time on short lines.
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    with open(path, "rb", buffering=_BUFFER) as stream:
        readline, line = stream.readline, 0
        while raw := readline(limit + 1):
            line += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                yield _unusable(line, _pass_long_line(readline, raw, limit))
                continue
            try:
                value = loads(raw)
            except decode_error as exc:
                yield _bad_json(raw, line, exc, fields)
                continue
            yield _from_value(value, line, fields)


def _bad_json(raw: bytes, line: int, exc: orjson.JSONDecodeError, fields: _Fields) -> Record:
    """Why a line is not JSON, most specific cause first. Only failed lines pay for this."""
    if line == 1 and raw.startswith(_BOM):  # editors on Windows write one; orjson refuses it
        try:
            return _from_value(orjson.loads(raw[len(_BOM) :]), line, fields)
        except orjson.JSONDecodeError as again:
            return _bad_json(raw[len(_BOM) :], line, again, fields)
    if not raw.strip():
        return _unusable(line, "blank line")
    problem = _decode(raw)[1]
    return _unusable(line, problem or f"malformed JSON: {exc}")


# --- one record from a mapping (JSONL object, CSV row, Parquet row) -------------------------


def _from_value(value: object, line: int, fields: _Fields) -> Record:
    """The record of a decoded JSON line, CSV row or Parquet row."""
    if type(value) is not dict:
        return _unusable(line, f"not a JSON object but {_kind(value)}")
    ident = value.get(fields.id)
    if type(ident) is not str or not ident:
        ident = _ident(ident, line)
    if fields.image is not None and _has_image(value.get(fields.image)):
        return _image_record(ident, value[fields.image], line, fields.image)
    text = value.get(fields.text, _MISSING)
    if type(text) is str and text and not text.isspace() and "\x00" not in text:
        return Record(ident, text, line)
    return Record(ident, None, line, _text_problem(text, fields))


def _has_image(image: object) -> bool:
    return image is not None and not (isinstance(image, str) and not image.strip())


def _ident(value: object, line: int) -> str:
    if value is None or value == "":
        return str(line)
    return value if type(value) is str else str(value)


def _kind(value: object) -> str:
    return _JSON_KINDS.get(type(value)) or f"a {type(value).__name__}"


def _text_problem(text: object, fields: _Fields) -> str:
    """Why ``text`` cannot be embedded (the caller has found that it cannot)."""
    name = repr(fields.text)
    if text is _MISSING:
        also = f" (and no image field {fields.image!r})" if fields.image else ""
        return f"missing text field {name}{also}"
    if not isinstance(text, str):
        return f"text field {name} is {_kind(text)}, not a string"
    if not text:
        return f"empty text in field {name}"
    if text.isspace():
        return f"whitespace-only text in field {name}"
    return f"NUL byte at character {text.index(chr(0))} of text field {name}"


def _image_record(ident: str, image: object, line: int, field: str) -> Record:
    if not isinstance(image, str):
        return Record(ident, None, line, f"image field {field!r} is {_kind(image)}, not a string")
    problem = _image_problem(image)
    return Record(ident, None, line, problem) if problem else Record(ident, {"image": image}, line)


def _image_problem(image: str) -> str | None:
    """Why a local image cannot be read, or ``None``. URLs, data URIs and base64 are left to the
    server. A value is taken for a path when it has an image suffix (the request builder will read
    it) or a character that base64 never has (so it can be nothing else)."""
    if image.startswith(_URL_PREFIXES) or not _looks_like_path(image):
        return None
    try:
        with open(image, "rb"):
            return None
    except OSError as exc:
        return f"cannot read image {image!r}: {exc.strerror or exc}"
    except ValueError:  # a NUL in the path: not a file name any system accepts
        return f"cannot read image {image!r}: not a valid path"


def _looks_like_path(image: str) -> bool:
    if len(image) > _MAX_PATH:
        return False
    return image.lower().endswith(_IMAGE_SUFFIXES) or not _BASE64.fullmatch(image)


# --- plain text -------------------------------------------------------------------------------


def _txt_records(path: Path, fields: _Fields, limit: int) -> Iterator[Record]:
    with open(path, "rb", buffering=_BUFFER) as stream:
        for line, (raw, problem) in enumerate(_lines(stream, limit), 1):
            body = raw.removeprefix(_BOM) if line == 1 else raw
            yield _unusable(line, problem) if problem else _txt_record(body, line)


def _txt_record(raw: bytes, line: int) -> Record:
    text, problem = _decode(raw.rstrip(b"\n").removesuffix(b"\r"))
    if problem is None and not text.strip():
        problem = "blank line"
    return _unusable(line, problem) if problem else Record(str(line), text, line)


# --- CSV / TSV --------------------------------------------------------------------------------

# The csv module's quoting states at the start of a field, inside an unquoted field, inside a
# quoted one, and just after a quote inside a quoted one (default dialect, strict=False).
_START, _FIELD, _QUOTED, _QUOTE = range(4)


class _CsvSource:
    """Physical lines for ``csv.reader``, each read as bytes and decoded strictly on its own.

    What is wrong with a line is noted against the record being read, since the reader only sees
    text. A line over the limit, or a record grown past it, is not handed over: a stub is, which
    leaves the reader's quoting state as the real text would, so later records still parse.
    """

    def __init__(self, stream: IO[bytes], delimiter: str, limit: int) -> None:
        self.readline = stream.readline
        self.delimiter = delimiter.encode()
        self.limit = limit
        self.lines = 0  # physical lines handed over so far
        self.first = 1  # first line of the record being read
        self.size = 0  # bytes of that record so far
        self.problem: str | None = None

    def end_record(self) -> tuple[int, str | None]:
        """(first line, problem) of the record the reader just returned; starts the next one."""
        done = self.first, self.problem
        self.first, self.size, self.problem = self.lines + 1, 0, None
        return done

    def __iter__(self) -> Iterator[str]:
        while raw := self.readline(self.limit + 1):
            self.lines += 1
            yield self._text(raw.removeprefix(_BOM) if self.lines == 1 else raw)

    def _text(self, raw: bytes) -> str:
        self.size += len(raw)
        if self.size - raw.endswith(b"\n") > self.limit:  # the record's own newline not counted
            return self._stub(raw)
        text, problem = _decode(raw)
        self.problem = self.problem or problem
        return text

    def _stub(self, raw: bytes) -> str:
        continuing = self.lines > self.first  # then the reader is inside a quoted field
        state = _QUOTED if continuing else _START
        size = 0
        for piece in _rest_of_line(self.readline, raw):
            state = _csv_scan(piece, state, self.delimiter)
            size += len(piece.rstrip(b"\n"))
        long = size > self.limit
        why = _too_long(self.limit, size) if long else f"record longer than {self.limit} bytes"
        self.problem = self.problem or why
        if continuing == (state != _QUOTED):  # the quote opens here, or closes here
            return '"'
        return "" if continuing else "-"


def _csv_scan(piece: bytes, state: int, delimiter: bytes) -> int:
    """The quoting state after ``piece``. Jumps to the next quote or delimiter with bytes.find,
    so a 100 MB quoted field costs a few C scans, not a Python step per character."""
    body = piece.rstrip(b"\r\n")
    pos = 0
    while pos < len(body):
        if state in (_QUOTED, _FIELD):
            hit = body.find(b'"' if state == _QUOTED else delimiter, pos)
            if hit < 0:
                return state
            state, pos = (_QUOTE if state == _QUOTED else _START), hit + 1
            continue
        char = body[pos : pos + 1]
        state = _QUOTED if char == b'"' else _START if char == delimiter else _FIELD
        pos += 1
    return state


def _csv_rows(
    path: Path, delimiter: str, limit: int
) -> Generator[tuple[list[str] | None, int, str | None], None, None]:
    """(row or None, first line, problem) for each CSV record, the header included."""
    _widen_field_limit(limit)
    with open(path, "rb", buffering=_BUFFER) as stream:
        source = _CsvSource(stream, delimiter, limit)
        rows = csv.reader(source, delimiter=delimiter)
        while True:
            try:
                row: list[str] | None = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:  # the reader resumes at the next line
                row, first, problem = None, *source.end_record()
                cause = str(exc).split(" - ")[0]  # drops a hint about open() that misleads here
                yield row, first, problem or f"malformed CSV: {cause}"
                continue
            yield (row, *source.end_record())


def _widen_field_limit(limit: int) -> None:
    """The csv module refuses fields over 128 KiB by default, a process-wide setting; only ever
    raised here, to what one record may hold (our own bound keeps memory in check)."""
    if csv.field_size_limit() < limit + 8:
        csv.field_size_limit(limit + 8)


def _csv_header(path: Path, delimiter: str, fields: _Fields, limit: int) -> list[str]:
    rows = _csv_rows(path, delimiter, limit)
    try:
        row, _, problem = next(rows, (None, 0, None))
    finally:
        rows.close()  # closes the file now, not when the generator is collected
    if problem:
        raise ConfigError(f"cannot read the header of {str(path)!r}: {problem}")
    if row is None:
        raise ConfigError(f"{str(path)!r} is empty: a CSV file needs a header row")
    _check_columns(row, fields, path)
    return row


def _check_columns(names: Iterable[str], fields: _Fields, path: Path) -> None:
    names = list(names)
    if fields.text in names or (fields.image and fields.image in names):
        return
    raise ConfigError(
        f"{str(path)!r} has no text column {fields.text!r} (columns: {', '.join(names)})"
    )


def _csv_records(
    path: Path, delimiter: str, header: list[str], fields: _Fields, limit: int
) -> Iterator[Record]:
    rows = _csv_rows(path, delimiter, limit)
    next(rows, None)  # the header, checked when the reader was opened
    for row, line, problem in rows:
        if problem or row is None:
            yield _unusable(line, problem or "unreadable CSV record")
        elif not row:
            yield _unusable(line, "blank line")
        else:
            yield _from_value(dict(zip(header, row, strict=False)), line, fields)


# --- Parquet ----------------------------------------------------------------------------------


def _parquet() -> ModuleType:
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ConfigError("reading Parquet needs pyarrow: install sfembed[parquet]") from None


def _parquet_columns(path: Path, fields: _Fields) -> list[str]:
    """The columns to read (only these are decoded). Raises ConfigError."""
    parquet = _parquet()
    try:
        with parquet.ParquetFile(path) as handle:
            names: list[str] = handle.schema_arrow.names
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"cannot read Parquet file {str(path)!r}: {exc}") from None
    _check_columns(names, fields, path)
    wanted = (fields.id, fields.text, fields.image)
    return [name for name in dict.fromkeys(wanted) if name and name in names]


def _parquet_records(path: Path, columns: list[str], fields: _Fields) -> Iterator[Record]:
    with _parquet().ParquetFile(path) as handle:
        batches = handle.iter_batches(batch_size=_PARQUET_BATCH, columns=columns)
        rows = (row for batch in batches for row in batch.to_pylist())
        for line, row in enumerate(rows, 1):
            yield _from_value(row, line, fields)
