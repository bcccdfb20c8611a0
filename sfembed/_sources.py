"""Inputs -> records with their place: files, folders, globs and stdin; gzip and zstd; JSON Lines
(or one JSON array), plain text, CSV/TSV and Parquet.

A job reads one or more *sources*. ``find_sources`` turns what the user named into that list: a
file, a folder (its files, not its subfolders), a glob, or ``-`` for standard input. The sources
are read one after the other in sorted path order, whatever order they were named in, so that a
job's output rows follow a documented order. Compression is found by the file's first bytes (and a
``.gz`` / ``.zst`` suffix must agree with them); the format by the suffix under it, or given.

Every line (or row) yields exactly one :class:`Record`, in order, with the source it came from and
its line there, so that output rows and input records stay aligned and countable: a line that
cannot be used still yields a record, with ``item`` ``None`` and ``error`` saying why, and one
whose id cannot be read has id ``None`` (never a made-up id that could be another record's).
Nothing is held whole (but a JSON array, which is bounded by ``max_line_bytes``): lines are read
as bytes in bounded pieces, so a 100 MB line costs about twice ``max_line_bytes``, then is skipped.
"""

from __future__ import annotations

# csv, glob and gzip are imported where a CSV input, a glob or a .gz file needs them: some 4 M
# instructions that a job of plain JSONL would otherwise pay before its first request.
import importlib
import io
import json
import logging
import os
import re
import stat
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice, repeat
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NamedTuple, cast

import orjson

from ._config import DEFAULT_ID_FIELD
from ._config import INPUT_FORMATS as FORMATS
from ._exceptions import ConfigError
from ._request import IMAGE_SUFFIXES
from ._types import Unusable

__all__ = [
    "FORMATS",
    "STDIN",
    "Block",
    "Place",
    "Places",
    "Record",
    "Source",
    "count_lines",
    "find_sources",
    "read_blocks",
    "read_records",
    "read_sources",
]

log = logging.getLogger("sfembed")

#: The input name that means standard input.
STDIN = "-"

_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "txt",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_COMPRESSED = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_BUFFER = 1 << 20  # bytes; large reads keep the per-line cost in C
_FIRST_READ = 1 << 16  # bytes: the first records go out before a whole buffer is read
_BLOCK_LINES = 1024  # JSONL lines parsed and handed on together
_PIECE = 1 << 20  # bytes read at a time while passing over an over-long line
_PARQUET_BATCH = 1024  # rows per Arrow batch: bounds memory when texts are long
_MAX_RECORD_LINES = 1000  # lines one CSV record may span; more is an unterminated quote
_BOM = b"\xef\xbb\xbf"
_MISSING: Any = object()
_URL_PREFIXES = ("http://", "https://", "data:")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_GLOB = re.compile(r"[*?\[]")
_MANIFEST = ".manifest.json"  # beside each output of a job: out.npy.manifest.json
_MAX_PATH = 4096  # characters; a longer image value is data, never a path
_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number"}
_JSON_KINDS.update({float: "a number", bool: "a boolean", type(None): "null"})


@dataclass(frozen=True, slots=True)
class Record:
    """One input record and its place.

    ``id`` comes from the id field; without one it is the line number (``source:line`` when the
    job reads several sources); it is ``None`` when the record could not be parsed far enough to
    know it. ``item`` is the text, or ``{"image": value}`` for the multimodal model, or ``None``
    when the record is unusable, and then ``error`` says why. ``line`` is 1-based: the line (JSONL,
    TXT, TSV), the first line of the CSV record, the element of a JSON array or the Parquet row.
    ``source`` names the input it came from (a path, or ``-`` for standard input). ``kept``
    holds the values of the fields ``keep_fields`` names (``None`` for a missing one), or is
    ``None`` when none are asked for or the record could not be parsed.
    """

    id: str | None
    item: str | dict[str, str] | None
    line: int
    error: str | None = None
    source: str = ""
    kept: tuple[object, ...] | None = None


class Place(NamedTuple):
    """Where a record stands, and what an output keeps of it, once its text is on its way: its
    id, line, source and kept fields (see :class:`Record`)."""

    id: str | None
    line: int
    source: str
    kept: tuple[object, ...] | None


@dataclass(frozen=True, slots=True)
class Places:
    """The places of consecutive records of one source, column by column (see :class:`Place`):
    a job keeps these, not an object per record, until the records' rows are written."""

    source: str
    ids: list[str | None]
    lines: Sequence[int]
    kept: list[tuple[object, ...] | None] | None = None  # None when no field is kept

    def __len__(self) -> int:
        return len(self.ids)

    def after(self, start: int) -> Places:
        """The places of the records from the ``start``-th on."""
        kept = self.kept[start:] if self.kept is not None else None
        return Places(self.source, self.ids[start:], self.lines[start:], kept)

    def place(self, i: int) -> Place:
        """The place of the ``i``-th record."""
        return Place(self.ids[i], self.lines[i], self.source, self.kept[i] if self.kept else None)


@dataclass(frozen=True, slots=True)
class Block:
    """Consecutive records of one source: their places, and what goes into the pipeline for
    each (its item, or :class:`~sfembed._types.Unusable` with the reason it cannot be used)."""

    places: Places
    inputs: list[str | dict[str, str] | Unusable]

    @classmethod
    def of(cls, records: Sequence[Record]) -> Block:
        """The block of ``records`` (all of one source)."""
        places = Places(
            records[0].source if records else "",
            [record.id for record in records],
            [record.line for record in records],
            [record.kept for record in records]
            if any(r.kept is not None for r in records)
            else None,
        )
        inputs = [
            r.item if r.item is not None else Unusable(r.error or "unusable") for r in records
        ]
        return cls(places, inputs)

    def after(self, start: int) -> Block:
        """The records from the ``start``-th on."""
        return Block(self.places.after(start), self.inputs[start:])


@dataclass(frozen=True, slots=True)
class Source:
    """One input: ``name`` as found (``-`` for standard input), its ``format``, its
    ``compression`` (``gzip``, ``zstd`` or ``None``; found when it is opened for a stream), and
    whether it is a regular file that can be read twice (``rereadable``): a pipe, a FIFO or
    standard input is read once, as it streams."""

    name: str
    format: str
    compression: str | None
    rereadable: bool

    @property
    def path(self) -> Path | None:
        """The file to open, or None for standard input."""
        return None if self.name == STDIN else Path(self.name)


@dataclass(frozen=True, slots=True)
class _Fields:
    id: str
    text: str
    image: str | None
    prefix: str  # of ids made from line numbers: "" for one source, "<source>:" for several
    source: str
    keep: tuple[str, ...] = ()


# --- finding the sources ----------------------------------------------------------------------


def find_sources(
    inputs: str | Path | Sequence[str | Path], *, format: str | None = None
) -> list[Source]:
    """The sources ``inputs`` name, in the order a job reads them (sorted by path).

    Each input is a file, a folder (its files with a known suffix, not hidden ones or ones starting
    with ``_``, and not its subfolders), a glob (``shards/*.jsonl.gz``), or ``-`` for standard
    input (which must then be the only input). Raises ConfigError naming the input for: a path that
    does not exist or cannot be read, a folder or glob with no input in it, an input named twice,
    ``-`` beside other inputs, a format that cannot be told (or mixed formats in one job), a
    compression suffix the bytes deny, and Parquet that is compressed or not a regular file.
    """
    names = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if not names:
        raise ConfigError("no input named")
    if any(os.fspath(name) == STDIN for name in names):
        if len(names) > 1:
            raise ConfigError("'-' (standard input) must be the only input of a job")
        return [_stdin_source(format)]
    paths = [path for name in names for path in _expand(os.fspath(name), format)]
    _refuse_twice(paths)
    sources = [_file_source(path, format) for path in sorted(paths)]
    _refuse_mixed(sources)
    return sources


def _stdin_source(format: str | None) -> Source:
    kind = _checked_format(format) if format is not None else "jsonl"
    if kind == "parquet":
        raise ConfigError("Parquet cannot be read from standard input: name the file")
    return Source(STDIN, kind, None, rereadable=False)


def _expand(name: str, format: str | None) -> list[str]:
    """The files one input names."""
    if os.path.isdir(name):
        return _folder(name, format)
    if os.path.lexists(name) or not _GLOB.search(name):
        return [name]
    import glob

    found = [path for path in glob.glob(name, recursive=True) if not os.path.isdir(path)]
    if not found:
        raise ConfigError(f"no input file matches {name!r}")
    return _without_job_files(f"input glob {name!r}", found)


def _folder(folder: str, format: str | None) -> list[str]:
    """A folder's input files. Others (without a known suffix) are skipped, and said so."""
    files, skipped, folders = [], [], []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir():
            folders.append(entry.name)
        elif format is None and _suffix_format(Path(entry.name)) is None:
            skipped.append(entry.name)
        else:
            files.append(os.path.join(folder, entry.name))
    if skipped:
        log.warning("input folder %s: skipped %s (no input suffix)", folder, ", ".join(skipped))
    unread = f"; its subfolders ({', '.join(folders)}) are not read" if folders else ""
    files = _without_job_files(f"input folder {folder}", files)
    if not files:
        known = ", ".join(_BY_SUFFIX)
        raise ConfigError(
            f"input folder {folder!r} holds no input file (known suffixes: {known}){unread}"
        )
    if folders:  # a folder's files are read, not its tree: said, as nothing may go unread unsaid
        log.warning(
            "input folder %s: skipped the subfolder(s) %s: name them as inputs too, or a glob "
            "with ** to read a tree",
            folder,
            ", ".join(folders),
        )
    return files


def _without_job_files(what: str, paths: list[str]) -> list[str]:
    """``paths`` (a folder's files, a glob's matches) less those an sfembed job wrote, which are
    skipped, and said so: a job writing into its input folder reads its inputs alone when it
    runs again."""
    manifests = _manifests_beside(paths)
    if not manifests:
        return paths
    kept: list[str] = []
    written: list[str] = []
    for path in paths:
        (written if _job_file(path, manifests) else kept).append(path)
    if written:
        names = ", ".join(os.path.basename(path) for path in written)
        log.warning("%s: skipped %s (an sfembed job's output and its files)", what, names)
    return kept


def _manifests_beside(paths: list[str]) -> set[str]:
    """The sfembed manifests in the folders of ``paths``: one listing a folder, and only a
    file named as a manifest is opened (a folder of 10,000 shards is not probed 10,000 times)."""
    found = set()
    for folder in dict.fromkeys(os.path.dirname(path) for path in paths):
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(_MANIFEST) and _is_manifest(path := os.path.join(folder, name)):
                found.add(path)
    return found


def _job_file(path: str, manifests: set[str]) -> bool:
    """Whether ``path`` is one of ``manifests``, or an output one of them describes, or that
    output's errors file or id sidecar (``out.npy`` -> ``out.ids.jsonl``)."""
    owners = [path]
    for suffix, output_suffix in ((".errors.jsonl", ""), (".ids.jsonl", ".npy")):
        if path.endswith(suffix):
            owners.append(path.removesuffix(suffix) + output_suffix)
    return path in manifests or any(owner + _MANIFEST in manifests for owner in owners)


def _is_manifest(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            return b'"sfembed-manifest"' in file.read(64)
    except OSError:
        return False


def _refuse_twice(paths: list[str]) -> None:
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"input {path!r} is named twice (also as {seen[real]!r})")
        seen[real] = path


def _refuse_mixed(sources: list[Source]) -> None:
    first = sources[0]
    for source in sources[1:]:
        if source.format != first.format:
            raise ConfigError(
                f"the inputs mix formats: {first.name!r} is {first.format} but {source.name!r} "
                f"is {source.format}; one job reads one format"
            )


def _file_source(name: str, format: str | None) -> Source:
    path = Path(name)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory")
        rereadable = stat.S_ISREG(mode)
        head = b""
        if rereadable:
            with open(path, "rb") as file:
                head = file.read(4)
        elif not os.access(path, os.R_OK):  # opening a FIFO would wait for its writer
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"cannot read input {name!r}: {exc.strerror or exc}") from None
    compression = _compression_of(path, head, rereadable)
    kind = _checked_format(format) if format is not None else _format_from_name(path)
    if kind == "parquet" and (compression or not rereadable):
        why = "is compressed" if compression else "is not a regular file"
        raise ConfigError(f"Parquet input {name!r} {why}: Parquet is read from a plain file")
    return Source(name, kind, compression, rereadable)


def _compression_of(path: Path, head: bytes, rereadable: bool) -> str | None:
    """The compression the first bytes show; a compression suffix must agree with them."""
    found = _MAGIC.get(head[:2]) or _MAGIC.get(head[:4])
    named = _COMPRESSED.get(path.suffix.lower())
    if rereadable and named and head and found != named:
        raise ConfigError(f"input {str(path)!r} is named {path.suffix} but is not {named} data")
    return found if rereadable else named


def _checked_format(format: str) -> str:
    if format.lower() not in FORMATS:
        raise ConfigError(f"unknown input format {format!r}; choose one of {', '.join(FORMATS)}")
    return format.lower()


def _suffix_format(path: Path) -> str | None:
    """The format named by the suffix under any compression suffix."""
    if path.suffix.lower() in _COMPRESSED:
        path = path.with_suffix("")
    return _BY_SUFFIX.get(path.suffix.lower())


def _format_from_name(path: Path) -> str:
    kind = _suffix_format(path)
    if kind is None:
        known = ", ".join(_BY_SUFFIX)
        raise ConfigError(
            f"cannot tell the format of {str(path)!r} from its suffix (known: {known}, each "
            f"optionally followed by .gz or .zst); name one of {', '.join(FORMATS)}"
        )
    return kind


def count_lines(sources: Sequence[Source], stop: threading.Event | None = None) -> int | None:
    """The lines of the sources, for a progress bar's total; None when one cannot be counted
    without reading it twice or decompressing it (a pipe, a compressed file, Parquet), or when
    ``stop`` is set before the count is done (it is checked between reads)."""
    if not all(s.rereadable and s.compression is None and s.format != "parquet" for s in sources):
        return None
    total = 0
    for source in sources:
        with open(source.name, "rb") as handle:
            for piece in iter(lambda: handle.read(_BUFFER), b""):
                if stop is not None and stop.is_set():
                    return None
                total += piece.count(b"\n")
    return total


# --- reading ----------------------------------------------------------------------------------


def read_records(
    inputs: str | Path | Sequence[str | Path],
    *,
    format: str | None = None,
    id_field: str = "id",
    text_field: str = "text",
    image_field: str | None = None,
    keep_fields: Sequence[str] = (),
    max_line_bytes: int = 16 * 2**20,
) -> Iterator[Record]:
    """Stream the records of ``inputs`` (see ``find_sources``), one per input line (or CSV record,
    JSON array element, or Parquet row), source after source.

    ``format`` is one of :data:`FORMATS`, else inferred from each suffix. ``max_line_bytes``
    bounds one line in bytes, not counting its newline (for CSV, one record, which may span up to
    1,000 lines; for a JSON array, the whole file); a longer one becomes an error record. With
    ``image_field``, a record whose image field is present and non-empty gives ``{"image": value}``,
    any other its text; an image value that is a local path (relative to the working directory)
    must be readable, or the record is unusable. ``keep_fields`` names fields whose values each
    record carries in ``kept`` (for an output that keeps them beside the vector).

    Raises ConfigError at once (not on first iteration) as ``find_sources`` does, and for a file
    that is a CSV/TSV or Parquet without the text column, or Parquet without pyarrow installed;
    standard input and later sources that cannot be checked ahead raise it when reached.
    """
    sources = find_sources(inputs, format=format)
    return read_sources(
        sources,
        id_field=id_field,
        text_field=text_field,
        image_field=image_field,
        keep_fields=keep_fields,
        max_line_bytes=max_line_bytes,
    )


def read_sources(
    sources: Sequence[Source],
    *,
    id_field: str = "id",
    text_field: str = "text",
    image_field: str | None = None,
    keep_fields: Sequence[str] = (),
    max_line_bytes: int = 16 * 2**20,
) -> Iterator[Record]:
    """The records of ``sources`` (from ``find_sources``), as ``read_records``."""
    named = _prepared(sources, id_field, text_field, image_field, keep_fields, max_line_bytes)
    shards = (_shard(s, f, max_line_bytes) for s, f in named)
    return chain.from_iterable(shards)


def read_blocks(
    sources: Sequence[Source],
    *,
    id_field: str = "id",
    text_field: str = "text",
    image_field: str | None = None,
    keep_fields: Sequence[str] = (),
    max_line_bytes: int = 16 * 2**20,
) -> Iterator[Block]:
    """The records of ``sources`` as ``read_sources`` gives them, in blocks of consecutive
    records of one source. Plain JSON Lines, a job's usual input, is parsed a block of lines at
    a time, without an object per record; the records are the same."""
    named = _prepared(sources, id_field, text_field, image_field, keep_fields, max_line_bytes)
    for source, fields in named:
        if source.format == "jsonl" and source.compression is None:
            yield from _jsonl_blocks(source, fields, max_line_bytes)
        else:
            yield from _grouped(_shard(source, fields, max_line_bytes))


def _prepared(
    sources: Sequence[Source],
    id_field: str,
    text_field: str,
    image_field: str | None,
    keep_fields: Sequence[str],
    max_line_bytes: int,
) -> list[tuple[Source, _Fields]]:
    """Each source with the fields to read from it, once those that can be were checked."""
    if max_line_bytes < 1:
        raise ConfigError(f"max_line_bytes must be at least 1, not {max_line_bytes}")
    several = len(sources) > 1
    keep = tuple(keep_fields)
    fields = [
        _Fields(
            id_field, text_field, image_field or None, f"{s.name}:" if several else "", s.name, keep
        )
        for s in sources
    ]
    for source, named in zip(sources, fields, strict=True):
        if source.rereadable:
            _check_ahead(source, named, max_line_bytes)
    return list(zip(sources, fields, strict=True))


def _grouped(records: Iterable[Record]) -> Iterator[Block]:
    """``records`` (of one source) in blocks; the first ones small, so that a slow stream's
    first records do not wait for a whole block."""
    iterator = iter(records)
    for size in chain((64, 256), repeat(_BLOCK_LINES)):
        batch = list(islice(iterator, size))
        if not batch:
            return
        yield Block.of(batch)


def _check_ahead(source: Source, fields: _Fields, limit: int) -> None:
    """Refuse now what would stop the job when this source is reached: a missing text column."""
    if source.format == "parquet":
        _parquet_columns(source, fields)
    elif source.format in ("csv", "tsv"):
        with _opened(source) as stream:
            records = _TABLE_READERS[source.format](stream, fields, limit)
            try:
                next(records)  # reads the header and checks it
            finally:
                records.close()


def _shard(source: Source, fields: _Fields, limit: int) -> Iterator[Record]:
    if source.format == "jsonl":  # the common case, without a generator in between
        return _jsonl_records(source, fields, limit)
    return _other_shard(source, fields, limit)


def _other_shard(source: Source, fields: _Fields, limit: int) -> Iterator[Record]:
    if source.format == "parquet":
        yield from _parquet_records(source, _parquet_columns(source, fields), fields)
        return
    with _opened(source) as stream:
        if source.format == "txt":
            yield from _txt_records(stream, fields, limit)
        else:
            records = _TABLE_READERS[source.format](stream, fields, limit)
            next(records)  # the header, checked
            yield from records


@contextmanager
def _opened(source: Source) -> Iterator[IO[bytes]]:
    """The source's bytes, decompressed. Raises ConfigError when it cannot be opened."""
    try:
        if source.path is None:
            raw: IO[bytes] = open(sys.stdin.fileno(), "rb", buffering=_BUFFER, closefd=False)  # noqa: SIM115
        else:
            raw = open(source.path, "rb", buffering=_BUFFER)  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot read input {source.name!r}: {exc.strerror or exc}") from None
    with raw:
        compression = source.compression
        if not source.rereadable:  # not looked at ahead: its first bytes are seen now
            compression = _MAGIC.get(raw.peek(4)[:2]) or _MAGIC.get(raw.peek(4)[:4])  # type: ignore[attr-defined]
        if compression is None:
            yield raw
        elif compression == "gzip":
            import gzip

            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            reader = _zstandard().ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader, buffer_size=_BUFFER) as unzipped:
                yield unzipped


def _zstandard() -> ModuleType:
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        raise ConfigError("reading .zst input needs zstandard: install sfembed[zstd]") from None


def _damage_types() -> tuple[type[BaseException], ...]:
    """What a damaged compressed stream raises while it is read."""
    kinds: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    zstd = sys.modules.get("zstandard")
    return (*kinds, zstd.ZstdError) if zstd is not None else kinds


def _damaged(fields: _Fields, line: int, exc: BaseException) -> Record:
    """The record standing for the rest of a source that could not be read past ``line``."""
    why = f"unreadable after line {line} ({_one_line(exc)}); the rest of it is lost"
    return Record(None, None, line + 1, why, fields.source)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one printable line (a library's may hold newlines)."""
    text = "".join(c if c.isprintable() else " " for c in str(exc))
    return " ".join(text.split()) or type(exc).__name__


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


def _pass_long_line(
    readline: Callable[[int], bytes], first: bytes, limit: int, *, before: int = 0
) -> str:
    """Read to the end of a line that went on with ``first`` after ``before`` bytes, and say
    how long it was."""
    size = sum(len(piece.rstrip(b"\n")) for piece in _rest_of_line(readline, first))
    return _too_long(limit, before + size)


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


def _unusable(line: int, error: str, fields: _Fields) -> Record:
    """A record whose id could not be read."""
    return Record(None, None, line, error, fields.source)


# --- JSON Lines, or one JSON array -----------------------------------------------------------


def _jsonl_records(source: Source, fields: _Fields, limit: int) -> Iterator[Record]:
    with _opened(source) as stream:
        try:
            first = _first_byte(stream)
        except _damage_types() as exc:  # a compressed stream damaged from its start
            yield _damaged(fields, 0, exc)
            return
        if first == b"[":
            yield from _json_array(stream, fields, limit)
            return
        yield from _jsonl_lines(stream, fields, limit)


def _jsonl_lines(stream: IO[bytes], fields: _Fields, limit: int) -> Iterator[Record]:
    """One record per line of ``stream``."""
    # The hot loop of a job: the reading is inlined rather than taken from _lines, as a
    # generator between it and orjson costs a fifth of the time on short lines.
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    readline, line = stream.readline, 0
    try:
        while raw := readline(limit + 1):
            line += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                yield _unusable(line, _pass_long_line(readline, raw, limit), fields)
                continue
            try:
                value = loads(raw)
            except decode_error as exc:
                yield _bad_json(raw, line, exc, fields)
                continue
            yield _from_value(value, line, fields, raw)
    except _damage_types() as exc:
        yield _damaged(fields, line, exc)


def _jsonl_blocks(source: Source, fields: _Fields, limit: int) -> Iterator[Block]:
    """The records of a JSON Lines source (or JSON array) in blocks, each the one
    ``_jsonl_records`` gives. The lines of an uncompressed stream are split from large reads
    and parsed a block at a time; a compressed one is read line by line (a damaged stream then
    loses no line before the damage)."""
    with _opened(source) as stream:
        try:
            first = _first_byte(stream)
        except _damage_types() as exc:  # a compressed stream damaged from its start
            yield Block.of([_damaged(fields, 0, exc)])
            return
        if first == b"[":
            yield from _grouped(_json_array(stream, fields, limit))
            return
        if not isinstance(getattr(stream, "raw", None), io.FileIO):
            yield from _grouped(_jsonl_lines(stream, fields, limit))
            return
        line = 0  # lines handed on so far
        try:
            for lines, ended, long in _split_lines(stream, limit):
                for start in range(0, len(lines), _BLOCK_LINES):
                    part = lines[start : start + _BLOCK_LINES]
                    yield _lines_block(part, line + 1, fields, limit, ended)
                    line += len(part)
                if long is not None:
                    line += 1
                    yield Block.of([_unusable(line, long, fields)])
        except _damage_types() as exc:
            yield Block.of([_damaged(fields, line, exc)])


def _split_lines(stream: IO[bytes], limit: int) -> Iterator[tuple[list[bytes], bool, str | None]]:
    """(lines without their newline, whether each had one, why a line after them was passed
    over or None), from large reads. A line is passed over in pieces once it is over
    ``limit`` bytes, so it is never held whole."""
    read, readline = stream.read1, stream.readline  # type: ignore[attr-defined]
    tail, size = b"", _FIRST_READ
    while piece := read(size):
        size = _BUFFER
        if b"\n" not in piece:  # a line goes on: kept up to the limit, then passed over
            if len(tail) + len(piece) <= limit:
                tail += piece
            else:
                yield [], True, _pass_long_line(readline, piece, limit, before=len(tail))
                tail = b""
            continue
        lines = (tail + piece).split(b"\n") if tail else piece.split(b"\n")
        tail = lines.pop()
        if len(tail) > limit:
            yield lines, True, _pass_long_line(readline, tail, limit)
            tail = b""
        elif lines:
            yield lines, True, None
    if tail:
        yield [tail], False, None  # the last line, without a newline


def _lines_block(lines: list[bytes], first: int, fields: _Fields, limit: int, ended: bool) -> Block:
    """The records of ``lines`` (line ``first`` on; ``ended``: each had a newline). When each
    is an object with an id and a text, as nearly all are, the block is parsed and checked in
    bulk; else line by line, for each record's own reason."""
    if fields.image is not None or fields.keep or max(map(len, lines)) > limit:
        return _each_line(lines, first, fields, limit, ended)
    try:
        values = list(map(orjson.loads, lines))
    except orjson.JSONDecodeError:
        return _each_line(lines, first, fields, limit, ended)
    if set(map(type, values)) != {dict}:
        return _each_line(lines, first, fields, limit, ended)
    ids: list[Any] = list(map(dict.get, values, repeat(fields.id)))
    texts: list[Any] = list(map(dict.get, values, repeat(fields.text)))
    if _all_text(ids) and _all_text(texts) and not any(map(str.isspace, texts)):
        plain = cast(list[str], texts)
        if "\x00" not in "".join(plain):
            places = Places(
                fields.source, cast(list[str | None], ids), range(first, first + len(lines))
            )
            return Block(places, cast(list[str | dict[str, str] | Unusable], plain))
    return _each_line(lines, first, fields, limit, ended)


def _all_text(values: list[Any]) -> bool:
    """True when every one of ``values`` is a non-empty string."""
    return set(map(type, values)) == {str} and all(values)


def _each_line(lines: list[bytes], first: int, fields: _Fields, limit: int, ended: bool) -> Block:
    """The records of ``lines`` one by one, as ``_jsonl_records`` makes them."""
    records = []
    for number, body in enumerate(lines, first):
        raw = body + b"\n" if ended else body
        if len(body) > limit:
            records.append(_unusable(number, _too_long(limit, len(body)), fields))
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            records.append(_bad_json(raw, number, exc, fields))
            continue
        records.append(_from_value(value, number, fields, raw))
    return Block.of(records)


def _first_byte(stream: IO[bytes]) -> bytes:
    """The first byte that is not white space or a byte order mark, left unread."""
    head = stream.peek(64)  # type: ignore[attr-defined]
    return bytes(head.removeprefix(_BOM).lstrip()[:1])


def _json_array(stream: IO[bytes], fields: _Fields, limit: int) -> Iterator[Record]:
    """One JSON array of records, read whole: bounded by ``limit``, else refused."""
    try:
        data = stream.read(limit + 1)
    except _damage_types() as exc:  # compressed, and cut short or damaged: no element is sure
        yield _damaged(fields, 0, exc)
        return
    if len(data) > limit:
        raise ConfigError(
            f"input {fields.source!r} is one JSON array over {limit:,} bytes; sfembed streams "
            "JSON Lines (one object per line): convert it, e.g. with jq -c '.[]'"
        )
    try:
        values = orjson.loads(data.removeprefix(_BOM))
    except orjson.JSONDecodeError as exc:
        yield _unusable(1, f"malformed JSON array: {exc}", fields)
        return
    for number, value in enumerate(values, 1):
        yield _from_value(value, number, fields, None)


def _bad_json(raw: bytes, line: int, exc: orjson.JSONDecodeError, fields: _Fields) -> Record:
    """Why a line is not JSON, most specific cause first. Only failed lines pay for this."""
    if line == 1 and raw.startswith(_BOM):  # editors on Windows write one; orjson refuses it
        try:
            return _from_value(orjson.loads(raw[len(_BOM) :]), line, fields, raw[len(_BOM) :])
        except orjson.JSONDecodeError as again:
            return _bad_json(raw[len(_BOM) :], line, again, fields)
    if not raw.strip():
        return _unusable(line, "blank line", fields)
    problem = _decode(raw)[1]
    return _unusable(line, problem or f"malformed JSON: {exc}", fields)


# --- one record from a mapping (JSON object, CSV row, Parquet row) ---------------------------


def _from_value(value: object, line: int, fields: _Fields, raw: bytes | None = None) -> Record:
    """The record of a decoded JSON line (``raw``), array element, CSV row or Parquet row."""
    if type(value) is not dict:
        return _unusable(line, f"not a JSON object but {_kind(value)}", fields)
    ident = value.get(fields.id)
    if type(ident) is not str or not ident:
        ident = _ident(ident, line, fields, raw)
    kept = tuple(value.get(name) for name in fields.keep) if fields.keep else None
    if fields.image is not None and _has_image(value.get(fields.image)):
        return _image_record(ident, value[fields.image], line, fields, kept)
    text = value.get(fields.text, _MISSING)
    if type(text) is str and text and not text.isspace() and "\x00" not in text:
        return Record(ident, text, line, None, fields.source, kept)
    return Record(ident, None, line, _text_problem(text, fields), fields.source, kept)


def _has_image(image: object) -> bool:
    return image is not None and not (isinstance(image, str) and not image.strip())


def _ident(value: object, line: int, fields: _Fields, raw: bytes | None) -> str:
    if value is None or value == "":
        return f"{fields.prefix}{line}"
    if type(value) is float and raw is not None:
        # orjson reads an integer past 64 bits as a float; the standard library keeps its digits.
        value = json.loads(raw.decode(errors="replace")).get(fields.id)
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


def _image_record(
    ident: str, image: object, line: int, fields: _Fields, kept: tuple[object, ...] | None
) -> Record:
    if not isinstance(image, str):
        why = f"image field {fields.image!r} is {_kind(image)}, not a string"
        return Record(ident, None, line, why, fields.source, kept)
    problem = _image_problem(image)
    if problem:
        return Record(ident, None, line, problem, fields.source, kept)
    return Record(ident, {"image": image}, line, None, fields.source, kept)


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
    return image.lower().endswith(IMAGE_SUFFIXES) or not _BASE64.fullmatch(image)


# --- plain text -------------------------------------------------------------------------------


def _txt_records(stream: IO[bytes], fields: _Fields, limit: int) -> Iterator[Record]:
    """One record per line; its id is its line number (there is no id field to misread)."""
    line = 0
    try:
        for line, (raw, problem) in enumerate(_lines(stream, limit), 1):
            body = raw.removeprefix(_BOM) if line == 1 else raw
            text, problem = (None, problem) if problem else _line_text(body)
            if problem is None and text is not None and text.strip():
                yield Record(f"{fields.prefix}{line}", text, line, None, fields.source)
            else:
                why = problem or "blank line"
                yield Record(f"{fields.prefix}{line}", None, line, why, fields.source)
    except _damage_types() as exc:
        yield _damaged(fields, line, exc)


def _line_text(raw: bytes) -> tuple[str, str | None]:
    return _decode(raw.rstrip(b"\n").removesuffix(b"\r"))


# --- TSV: one record per line, fields split on tabs, no quoting ---------------------------------


def _tsv_records(stream: IO[bytes], fields: _Fields, limit: int) -> Generator[Record, None, None]:
    """Tab-separated values: a quote is an ordinary character, so no record spans lines. The
    first item stands for the header, once it is read and checked."""
    lines = enumerate(_lines(stream, limit), 1)
    header = _tsv_header(_header_read(lambda: next(lines, None), fields), fields)
    yield Record(None, None, 1, None, fields.source)
    line = 1
    try:
        for line, (raw, problem) in lines:
            text, problem = (None, problem) if problem else _line_text(raw)
            if problem or text is None:
                yield _unusable(line, problem or "unreadable line", fields)
            elif not text:
                yield _unusable(line, "blank line", fields)
            else:
                yield _table_record(header, text.split("\t"), line, fields, _TAB_ADVICE)
    except _damage_types() as exc:
        yield _damaged(fields, line, exc)


_COMMA_ADVICE = "a text holding a comma must be quoted"
_TAB_ADVICE = "a tab inside a text cannot be told from the next field"


def _table_record(
    header: list[str], row: list[str], line: int, fields: _Fields, advice: str
) -> Record:
    """The record of a CSV or TSV row. A row with more fields than the header (an unquoted
    comma, a tab in a text) fails: the text read would be cut short. Empty extra fields (a
    trailing delimiter) are no loss."""
    record = _from_value(dict(zip(header, row, strict=False)), line, fields)
    if len(row) > len(header) and any(extra.strip() for extra in row[len(header) :]):
        why = f"{len(row)} fields, {len(header)} in the header: {advice}"
        return Record(record.id, None, line, why, fields.source, record.kept)
    return record


def _header_read(read: Callable[[], Any], fields: _Fields) -> Any:
    """The first row of a table, read with ``read``; a damaged stream is a ConfigError."""
    try:
        return read()
    except _damage_types() as exc:
        raise ConfigError(f"cannot read the header of {fields.source!r}: {exc}") from None


def _tsv_header(first: tuple[int, tuple[bytes, str | None]] | None, fields: _Fields) -> list[str]:
    if first is None:
        raise ConfigError(f"{fields.source!r} is empty: a TSV file needs a header row")
    raw, problem = first[1]
    text, problem = (None, problem) if problem else _line_text(raw.removeprefix(_BOM))
    if problem or text is None:
        raise ConfigError(f"cannot read the header of {fields.source!r}: {problem}")
    names = text.split("\t")
    _check_columns(names, fields)
    return names


# --- CSV --------------------------------------------------------------------------------------

# The csv module's quoting states at the start of a field, inside an unquoted field, inside a
# quoted one, and just after a quote inside a quoted one.
_START, _FIELD, _QUOTED, _QUOTE = range(4)


class _RunawayQuote(Exception):
    """A quoted field has run over ``_MAX_RECORD_LINES`` lines."""


class _CsvSource:
    """Physical lines for ``csv.reader``, each read as bytes and decoded strictly on its own.

    What is wrong with a line is noted against the record being read, since the reader only sees
    text. A line over the limit, or a record grown past it, is not handed over: a stub is, which
    leaves the reader's quoting state as the real text would, so later records still parse.

    A record's lines are held until it ends. When it turns out malformed, or its quoted field runs
    on past ``_MAX_RECORD_LINES`` lines, only its first line becomes an error record and the lines
    after it are handed over again: a stray quote never merges the lines after it into one record.
    """

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.readline = stream.readline
        self.limit = limit
        self.lines = 0  # physical lines handed over so far
        self.first = 1  # first line of the record being read
        self.size = 0  # bytes of that record so far
        self.held: list[tuple[str, str | None]] = []  # its lines (stubs neutral), for a replay
        self.again: deque[tuple[str, str | None]] = deque()  # lines to hand over again

    def end_record(self) -> tuple[int, str | None]:
        """(first line, problem) of the record the reader just returned; starts the next one."""
        problem = next((problem for _, problem in self.held if problem), None)
        done = self.first, problem
        self.first, self.size, self.held = self.lines + 1, 0, []
        return done

    def reject_record(self) -> tuple[int, str | None]:
        """(first line, problem) of a record found malformed: its first line is given up, and
        the lines after it will be read again."""
        first, held = self.first, self.held
        self.again.extendleft(reversed(held[1:]))
        self.lines = first
        self.first, self.size, self.held = first + 1, 0, []
        return first, held[0][1] if held else None

    def __iter__(self) -> Iterator[str]:
        while True:
            stub = False
            if self.again:
                text, problem = self.again.popleft()
            else:
                raw = self.readline(self.limit + 1)
                if not raw:
                    return
                text, problem, stub = self._text(raw.removeprefix(_BOM) if self.lines == 0 else raw)
                if stub:  # handed over again, a stub's quote would mislead the reader
                    self.held.append(("-", problem))
            self.lines += 1
            if not stub:
                self.held.append((text, problem))
            if len(self.held) > _MAX_RECORD_LINES:
                raise _RunawayQuote
            yield text

    def _text(self, raw: bytes) -> tuple[str, str | None, bool]:
        """(text, problem, whether the text is a stub)."""
        self.size += len(raw)
        if self.size - raw.endswith(b"\n") > self.limit:  # the record's own newline not counted
            return (*self._stub(raw), True)
        return (*_decode(raw), False)

    def _stub(self, raw: bytes) -> tuple[str, str | None]:
        continuing = self.lines + 1 > self.first  # then the reader is inside a quoted field
        state = _QUOTED if continuing else _START
        size = 0
        for piece in _rest_of_line(self.readline, raw):
            state = _csv_scan(piece, state)
            size += len(piece.rstrip(b"\n"))
        long = size > self.limit
        why = _too_long(self.limit, size) if long else f"record longer than {self.limit} bytes"
        if continuing == (state not in (_QUOTED,)):  # the quote opens here, or closes here
            return '"', why
        return ("" if continuing else "-"), why


def _csv_scan(piece: bytes, state: int) -> int:
    """The quoting state after ``piece``. Jumps to the next quote or comma with bytes.find,
    so a 100 MB quoted field costs a few C scans, not a Python step per character."""
    body = piece.rstrip(b"\r\n")
    pos = 0
    while pos < len(body):
        if state in (_QUOTED, _FIELD):
            hit = body.find(b'"' if state == _QUOTED else b",", pos)
            if hit < 0:
                return state
            state, pos = (_QUOTE if state == _QUOTED else _START), hit + 1
            continue
        char = body[pos : pos + 1]
        state = _QUOTED if char == b'"' else _START if char == b"," else _FIELD
        pos += 1
    return state


def _csv_rows(stream: IO[bytes], limit: int) -> Iterator[tuple[list[str] | None, int, str | None]]:
    """(row or None, first line, problem) for each CSV record, the header included."""
    import csv

    _widen_field_limit(limit)
    source = _CsvSource(stream, limit)
    rows = csv.reader(source, strict=True)
    while True:
        try:
            row: list[str] | None = next(rows)
        except StopIteration:
            return
        except (csv.Error, _RunawayQuote) as exc:
            first, problem = source.reject_record()
            rows = csv.reader(source, strict=True)  # a fresh state, from the line after
            yield None, first, problem or _csv_problem(exc)
            continue
        yield (row, *source.end_record())


def _csv_problem(exc: Exception) -> str:
    if isinstance(exc, _RunawayQuote):
        return (
            f"a quoted field opened on this line runs on past {_MAX_RECORD_LINES:,} lines "
            "(an unterminated quote?)"
        )
    cause = str(exc).split(" - ")[0]  # drops a hint about open() that misleads here
    if cause == "unexpected end of data":
        return "malformed CSV: a quoted field opened on this line is never closed"
    return f"malformed CSV: {cause}"


def _widen_field_limit(limit: int) -> None:
    """The csv module refuses fields over 128 KiB by default, a process-wide setting; only ever
    raised here, to what one record may hold (our own bound keeps memory in check)."""
    import csv

    if csv.field_size_limit() < limit + 8:
        csv.field_size_limit(limit + 8)


def _csv_records(stream: IO[bytes], fields: _Fields, limit: int) -> Generator[Record, None, None]:
    """The first item stands for the header, once it is read and checked."""
    rows = _csv_rows(stream, limit)
    header = _csv_header(_header_read(lambda: next(rows, None), fields), fields)
    yield Record(None, None, 1, None, fields.source)
    line = 1
    try:
        for row, line, problem in rows:
            if problem or row is None:
                yield _unusable(line, problem or "unreadable CSV record", fields)
            elif not row:
                yield _unusable(line, "blank line", fields)
            else:
                yield _table_record(header, row, line, fields, _COMMA_ADVICE)
    except _damage_types() as exc:
        yield _damaged(fields, line, exc)


def _csv_header(
    first: tuple[list[str] | None, int, str | None] | None, fields: _Fields
) -> list[str]:
    if first is None:
        raise ConfigError(f"{fields.source!r} is empty: a CSV file needs a header row")
    row, _, problem = first
    if problem or row is None:
        raise ConfigError(f"cannot read the header of {fields.source!r}: {problem}")
    _check_columns(row, fields)
    return row


def _check_columns(names: Iterable[str], fields: _Fields) -> None:
    names = list(names)
    columns = f"(columns: {', '.join(names)})"
    # An id field named on purpose (not the default, which may be absent) must be there: a
    # mistyped one would number every record by its line instead.
    if fields.id != DEFAULT_ID_FIELD and fields.id not in names:
        raise ConfigError(f"{fields.source!r} has no id column {fields.id!r} {columns}")
    if fields.text in names or (fields.image and fields.image in names):
        return
    raise ConfigError(f"{fields.source!r} has no text column {fields.text!r} {columns}")


#: CSV and TSV readers: the first item stands for the header, once it is read and checked.
_TABLE_READERS = {"csv": _csv_records, "tsv": _tsv_records}


# --- Parquet ----------------------------------------------------------------------------------


def _parquet() -> ModuleType:
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ConfigError("reading Parquet needs pyarrow: install sfembed[parquet]") from None


def _parquet_columns(source: Source, fields: _Fields) -> list[str]:
    """The columns to read (only these are decoded). Raises ConfigError."""
    parquet = _parquet()
    try:
        with parquet.ParquetFile(source.name) as handle:
            names: list[str] = handle.schema_arrow.names
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"cannot read Parquet file {source.name!r}: {exc}") from None
    _check_columns(names, fields)
    missing = [name for name in fields.keep if name not in names]
    if missing:
        raise ConfigError(f"{source.name!r} has no column {missing[0]!r} to keep")
    wanted = (fields.id, fields.text, fields.image, *fields.keep)
    return [name for name in dict.fromkeys(wanted) if name and name in names]


def _parquet_records(source: Source, columns: list[str], fields: _Fields) -> Iterator[Record]:
    """Row group by row group: a damaged one gives one error record per row it held (its row
    count is in the file's footer), naming it, and the next one is read as usual."""
    with _parquet().ParquetFile(source.name) as handle:
        line = 0
        for group in range(handle.num_row_groups):
            end = line + handle.metadata.row_group(group).num_rows
            try:
                batches = handle.iter_batches(
                    batch_size=_PARQUET_BATCH, row_groups=[group], columns=columns
                )
                for batch in batches:
                    for row, problem in _rows_of(batch):
                        line += 1
                        yield _parquet_record(row, problem, line, fields)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                why = f"row group {group} of {source.name!r} is damaged: {_one_line(exc)}"
                for lost in range(line + 1, end + 1):
                    yield _unusable(lost, why, fields)
            line = end


def _rows_of(batch: Any) -> Iterator[tuple[dict[str, Any], str | None]]:
    """(row, problem) of a batch; a string that is not UTF-8 is a problem of its row alone."""
    try:
        rows = batch.to_pylist()
    except UnicodeDecodeError:
        yield from _rows_checked(batch)
        return
    for row in rows:
        yield row, None


def _rows_checked(batch: Any) -> Iterator[tuple[dict[str, Any], str | None]]:
    pa = importlib.import_module("pyarrow")
    columns: dict[str, list[Any]] = {}
    texts = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = column.cast(pa.large_binary())
            texts.append(name)
        columns[name] = column.to_pylist()
    for values in zip(*columns.values(), strict=True):
        row, problem = dict(zip(columns, values, strict=True)), None
        for name in texts:
            if row[name] is None:
                continue
            try:
                row[name] = row[name].decode()
            except UnicodeDecodeError as exc:
                row[name] = _MISSING
                problem = problem or f"invalid UTF-8 ({exc.reason}) in column {name!r}"
        yield row, problem


def _parquet_record(row: dict[str, Any], problem: str | None, line: int, fields: _Fields) -> Record:
    record = _from_value(row, line, fields)
    if problem is None:
        return record
    ident = row.get(fields.id)
    known = None if ident is _MISSING else _ident(ident, line, fields, None)
    return Record(known, None, line, problem, fields.source)
