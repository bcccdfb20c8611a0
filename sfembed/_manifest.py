"""The manifest of a file-to-file job: what it runs on, and how far it has durably got.

A job writes ``<out>.manifest.json`` beside its output and rewrites it at every checkpoint::

    {"format": "sfembed-manifest", "version": 2, "complete": false,
     "input": [{"path": "/data/docs.jsonl", "size": 10485760, "mtime_ns": ..., "sha256": "..."}],
     "settings": {"model": "BAAI/bge-m3", "dimensions": null, "encoding_format": "base64", ...},
     "checkpoint": {"records": 81920, "rows": 81920, "failed": 3,
                    "lengths": {"output": 335544448, "ids": 2457600, "errors": 311}}}

``input`` holds one identity per source the job reads, in reading order (a job over a folder of
shards records each shard). ``checkpoint`` says that the first ``records`` input records are
done: their ``rows`` rows and ``failed`` errors-file entries are held by the first
``lengths[role]`` bytes of each file, and those bytes reached the disk before the manifest did.
A manifest is replaced atomically (written to a temporary file, synced, renamed over the old
one, and the folder synced), so a crash leaves either the old checkpoint or the new one, never a
mix. Whatever a file holds past its committed length is a torn write, and a resumed job cuts it
off.

``settings`` holds the options that change the output (model, dimensions, encoding, long-text
handling, fields, formats, the input fields a LanceDB table keeps) and the errors file's path.
The API key is never part of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ._config import Settings
from ._exceptions import ConfigError
from ._models import ModelSpec
from ._sources import Source

__all__ = [
    "Checkpoint",
    "InputIdentity",
    "Manifest",
    "check_resumable",
    "identify",
    "identify_soon",
    "load_manifest",
    "manifest_path_for",
    "output_settings",
    "save_manifest",
    "sync_folder",
]

_FORMAT = "sfembed-manifest"
_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 held one input identity, not a list
_HASH_PIECE = 1 << 20  # bytes hashed per read


@dataclass(frozen=True, slots=True)
class InputIdentity:
    """An input file as it was when the job read it: absolute path, size in bytes, modification
    time in nanoseconds, and the SHA-256 of its bytes. An input read once as it streams
    (standard input, a pipe) has its name, size and time 0 and no digest: it cannot be resumed."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The first ``records`` records are done, as ``rows`` output rows and ``failed`` errors-file
    entries, held by the first ``lengths[role]`` bytes of each file (``output``, ``ids``,
    ``errors``)."""

    records: int = 0
    rows: int = 0
    failed: int = 0
    lengths: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A job's inputs, its output-changing settings, its last checkpoint, and whether it ended."""

    input: tuple[InputIdentity, ...]
    settings: Mapping[str, Any]
    checkpoint: Checkpoint
    complete: bool = False


def manifest_path_for(output: str | Path) -> Path:
    """``out.npy`` -> ``out.npy.manifest.json``."""
    return Path(f"{os.fspath(output)}.manifest.json")


def output_settings(
    settings: Settings, spec: ModelSpec, output_format: str, errors: Path
) -> dict[str, Any]:
    """The settings a resumed job must share with the run it continues, by their config keys.
    The model's limits count too: a catalogue entry overridden in ``[models]`` moves the cuts."""
    io = settings.io
    kept: dict[str, Any] = {
        "model": settings.model,
        "model limits": [spec.max_input_tokens, spec.special_tokens, str(spec.tokenizer)],
        "dimensions": settings.dimensions,
        "encoding_format": settings.encoding_format,
        "long_mode": settings.long_mode,
        "truncate_side": settings.truncate_side,
        "overlap_tokens": settings.overlap_tokens,
        "io.input_format": io.input_format,
        "io.id_field": io.id_field,
        "io.text_field": io.text_field,
        "io.image_field": io.image_field,
        "io.output_format": output_format,
        "io.dtype": io.dtype,
        "errors file": os.path.abspath(errors),
    }
    if io.keep_fields:  # a table's columns (absent when none: earlier manifests stay resumable)
        kept["io.keep_fields"] = sorted(io.keep_fields)  # in any order, the same columns
    return kept


async def identify(inputs: str | Path | Sequence[Source]) -> tuple[InputIdentity, ...]:
    """The identity of each input, a path or the sources of ``find_sources``; their bytes are
    hashed on a worker thread (SHA-256 runs at about 1.4 GB/s here). A source read once as it
    streams is not read here. Raises ConfigError when a file cannot be read."""
    return await asyncio.to_thread(_identities, inputs)


def identify_soon(inputs: str | Path | Sequence[Source]) -> Future[tuple[InputIdentity, ...]]:
    """``identify``'s answer, worked out from now on a thread of its own: a fresh job needs it
    only at its first checkpoint and sends meanwhile (a file of gigabytes takes seconds to
    hash). The thread is a daemon: a job that ends first does not wait for it. The result raises
    ConfigError as ``identify`` does."""
    future: Future[tuple[InputIdentity, ...]] = Future()

    def work() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(_identities(inputs))
            except BaseException as error:
                future.set_exception(error)

    threading.Thread(target=work, name="sfembed:identify", daemon=True).start()
    return future


def _identities(inputs: str | Path | Sequence[Source]) -> tuple[InputIdentity, ...]:
    sources = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    identities = []
    for source in sources:
        if isinstance(source, Source) and not source.rereadable:
            identities.append(InputIdentity(source.name, 0, 0, ""))
            continue
        path = Path(source.name if isinstance(source, Source) else source)
        try:
            identities.append(_identify(path))
        except OSError as error:
            raise ConfigError(
                f"cannot read input {str(path)!r}: {error.strerror or error}"
            ) from None
    return tuple(identities)


def _identify(path: Path) -> InputIdentity:
    digest = hashlib.sha256()
    # One buffer read into again and again: fresh 4 MiB pieces would each be a new allocation,
    # and the allocator keeps such memory after a big file, adding to the job's RSS for good.
    buffer = memoryview(bytearray(_HASH_PIECE))
    with open(path, "rb", buffering=0) as file:
        status = os.fstat(file.fileno())
        while size := file.readinto(buffer):
            digest.update(buffer[:size])
    return InputIdentity(
        str(path.resolve()), status.st_size, status.st_mtime_ns, digest.hexdigest()
    )


def check_resumable(
    manifest: Manifest, settings: Mapping[str, Any], inputs: Sequence[InputIdentity]
) -> None:
    """Raise ConfigError naming the first setting or input property that differs between the
    manifest's run and this one."""
    for key in sorted(set(manifest.settings) | set(settings)):
        was, now = manifest.settings.get(key, _UNSET), settings.get(key, _UNSET)
        if was != now:
            raise ConfigError(_refusal(f"setting {key} was {_shown(was)}, now {_shown(now)}"))
    if len(manifest.input) != len(inputs):
        was_n, now_n = len(manifest.input), len(inputs)
        raise ConfigError(_refusal(f"the job read {was_n} input(s), now {now_n}"))
    for earlier, current in zip(manifest.input, inputs, strict=True):
        for name in ("path", "size", "mtime_ns", "sha256"):
            was, now = getattr(earlier, name), getattr(current, name)
            if was != now:
                which = f"input {earlier.path!r}" if len(inputs) > 1 else "the input"
                raise ConfigError(_refusal(f"{which}'s {name} was {was!r}, now {now!r}"))


#: A setting a manifest records only when it is set (``io.keep_fields``).
_UNSET = object()


def _shown(value: object) -> str:
    return "none" if value is _UNSET else repr(value)


def _refusal(difference: str) -> str:
    return f"cannot resume: {difference}; run without --resume to start over"


def load_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, or None when there is none. Raises ConfigError when it cannot
    be read or is not a manifest this version understands."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    try:
        return _from_json(orjson.loads(raw))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{str(path)!r} is not a readable sfembed manifest: {error}") from None


def _from_json(value: dict[str, Any]) -> Manifest:
    if value.get("format") != _FORMAT or value.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"format {value.get('format')!r} version {value.get('version')!r}")
    checkpoint = value["checkpoint"]
    inputs = value["input"] if value["version"] > 1 else [value["input"]]
    return Manifest(
        input=tuple(InputIdentity(**identity) for identity in inputs),
        settings=value["settings"],
        checkpoint=Checkpoint(
            records=int(checkpoint["records"]),
            rows=int(checkpoint["rows"]),
            failed=int(checkpoint["failed"]),
            lengths={str(k): int(v) for k, v in checkpoint["lengths"].items()},
        ),
        complete=bool(value["complete"]),
    )


def save_manifest(path: Path, manifest: Manifest) -> None:
    """Replace the manifest at ``path`` atomically and durably. Raises OSError."""
    body = {"format": _FORMAT, "version": _VERSION, **dataclasses.asdict(manifest)}
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Make a rename or removal in ``folder`` durable, where the system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
