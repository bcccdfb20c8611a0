"""The files of a file-to-file job: which they are, that none is another, who may replace them.

A job reads its input(s) and writes an output, for ``.npy`` an id sidecar, an errors file and a
manifest, and it may keep a cache. Before anything is written the paths are checked: no two of
them may be one file (by resolved path, and by device and inode, so hard and symbolic links
count), an existing output (and id sidecar) must be a regular file an earlier run wrote (a
manifest lies beside it), and an existing errors file must be one the earlier run of this output
wrote (its manifest names it). Nothing else is ever truncated, replaced or removed.

A run that starts afresh writes beside the earlier run's files, under hidden names
(``.out.npy.sfembed-new``), and moves them into place at its first checkpoint that holds an
embedded row, or when it ends: a rerun that stops at once (a mistyped setting, a wrong key, a
model that refuses the dimensions) leaves the earlier run's files exactly as they were. The move
is decided by writing the new manifest under its hidden name, and ends by renaming it over the
earlier one; a crash in between leaves the hidden manifest, and the next job on this output
finishes the move before anything else. So at every moment one manifest describes the files in
place, or a staged one the files about to be.

Each job holds an exclusive lock (``flock``) on a hidden lock file beside its output, and on one
beside its cache, for its whole life: a second job writing the same output, or using the same
cache, is refused at once. The lock files are removed as the job ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._cachestore import vectors_path
from ._exceptions import ConfigError
from ._manifest import (
    Checkpoint,
    Manifest,
    load_manifest,
    manifest_path_for,
    save_manifest,
    sync_folder,
)
from ._writers import ids_path_for

__all__ = ["JobFiles", "staged_path"]

_STAGED = ".sfembed-new"


def staged_path(path: Path) -> Path:
    """Where a fresh run writes ``path`` until its first checkpoint: ``.out.npy.sfembed-new``."""
    return path.with_name(f".{path.name}{_STAGED}")


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@dataclass(frozen=True, slots=True)
class JobFiles:
    """Every path a job reads or writes, by its role."""

    inputs: tuple[Path, ...]
    output: Path
    ids: Path | None  # the id sidecar of an .npy output
    errors: Path
    manifest: Path
    cache: Path | None
    report: Path | None = None  # the run report, if one is asked for
    table: bool = False  # the output is a LanceDB table: a folder, upserted in place

    @classmethod
    def of(
        cls,
        inputs: Sequence[str | Path],
        output: str | Path,
        output_format: str,
        errors: Path,
        cache: Path | None,
    ) -> JobFiles:
        out = Path(output)
        return cls(
            inputs=tuple(Path(p) for p in inputs),
            output=out,
            ids=ids_path_for(out) if output_format == "npy" else None,
            errors=errors,
            manifest=manifest_path_for(out),
            cache=cache,
            table=output_format == "lance",
        )

    def written(self) -> dict[str, Path]:
        """The files the job writes or replaces, by a name for messages."""
        roles = {"output": self.output, "errors file": self.errors, "manifest": self.manifest}
        if self.ids is not None:
            roles["id sidecar"] = self.ids
        if self.cache is not None:
            roles["cache"] = self.cache
            roles["cache's vectors"] = vectors_path(self.cache)
        for role, path in list(roles.items()):
            if not role.startswith("cache"):
                roles[f"{role} being written"] = staged_path(path)
        if self.report is not None:
            roles["report"] = self.report
        roles["lock file"] = _lock_path(self.output)
        if self.cache is not None:
            roles["cache's lock file"] = _lock_path(self.cache)
        return roles

    def check(self) -> None:
        """Raise ConfigError when two roles are one file, when an input is one of the files
        written, or when a file to be written exists and is not a regular file."""
        written = self.written()
        # Each path resolved and looked up once: some 12 roles, compared pairwise.
        identity = {path: _identity(path) for path in (*self.inputs, *written.values())}
        for path in self.inputs:
            for role, other in written.items():
                if _same(identity[path], identity[other]):
                    raise ConfigError(
                        f"the input {str(path)!r} is also the job's {role}: refusing to write "
                        "over it; choose another --out, --errors or --cache"
                    )
        names = list(written.items())
        for i, (role, path) in enumerate(names):
            for other_role, other in names[i + 1 :]:
                if _same(identity[path], identity[other]):
                    raise ConfigError(
                        f"the {role} and the {other_role} are one file ({str(path)!r}); "
                        "choose another --out, --errors or --cache"
                    )
        for role, path in written.items():
            if not (self.table and path == self.output):  # a table is a folder
                _check_kind(role, path)

    def check_owned(self, earlier: Manifest | None) -> None:
        """Raise ConfigError when an output, id sidecar or errors file exists that the earlier
        run of this output (``earlier`` is its manifest, if any) did not write, or a file at the
        report's path that is not a run report: they are the user's, and stay."""
        self.check_report()
        if not self.table and earlier is None and not self.manifest.exists():
            # No manifest (not even one past reading) vouches for these: not this output's.
            for role, path in (("output", self.output), ("id sidecar", self.ids)):
                if path is not None and path.exists():
                    raise ConfigError(
                        f"the {role} {str(path)!r} exists and no earlier sfembed run wrote it "
                        "(there is no manifest beside it): move it away or choose another --out"
                    )
        named = earlier.settings.get("errors file") if earlier is not None else None
        if self.errors.exists() and named != os.path.abspath(self.errors):
            raise ConfigError(
                f"the errors file {str(self.errors)!r} exists and no earlier run of this output "
                "wrote it (its manifest does not name it): move it away or choose another --errors"
            )

    def check_report(self) -> None:
        """Raise ConfigError when the report's folder is missing, or a file at its path is not
        a run report."""
        if self.report is not None and not self.report.parent.is_dir():  # found before the job
            raise ConfigError(
                f"the report's folder {str(self.report.parent)!r} is missing or not a folder"
            )
        if self.report is not None and self.report.exists():
            from ._report import load_report  # a report is asked for: loaded only then

            try:
                load_report(self.report)
            except ConfigError:
                raise ConfigError(
                    f"{str(self.report)!r} exists and is not an sfembed run report: refusing "
                    "to write over it; choose another --report"
                ) from None

    def check_lengths(self, done: Checkpoint) -> None:
        """Raise ConfigError unless each file holds at least what the checkpoint committed."""
        files = {"output": self.output, "errors": self.errors}
        if self.ids is not None:
            files["ids"] = self.ids
        for role, path in files.items():
            committed = done.lengths.get(role, 0)
            size = path.stat().st_size if path.exists() else -1
            if committed and size < committed:
                raise ConfigError(
                    f"cannot resume: {str(path)!r} holds {max(size, 0)} bytes, fewer than the "
                    f"{committed} its checkpoint committed; run again without --resume"
                )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the output's lock, and the cache's, until the block ends. Raises ConfigError
        when another job holds either."""
        with contextlib.ExitStack() as locks:
            locks.enter_context(_locked(_lock_path(self.output), f"the output {self.output}"))
            if self.cache is not None:
                locks.enter_context(_locked(_lock_path(self.cache), f"the cache {self.cache}"))
            yield

    def remove_staged(self) -> None:
        """Remove what a fresh run wrote beside the earlier files (an earlier crash's too),
        unless a move into place was decided (a staged manifest): ``finish_swap`` ends that."""
        if self._staged_manifest().exists():
            return
        for path in self._replaced():
            staged = staged_path(path)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(staged.lstat().st_mode):
                    staged.unlink()

    def swap_in(self, manifest: Manifest) -> None:
        """Move a fresh run's files over the earlier run's, with ``manifest``, which describes
        them. It is written first, under its staged name: from then on the move is decided, and
        a crash at any later step is finished by the next run (``finish_swap``). Raises OSError.
        """
        save_manifest(self._staged_manifest(), manifest)
        self.finish_swap()

    def finish_swap(self) -> None:
        """Finish the move a staged manifest decided (this run's, or one a crash cut short):
        each staged file over the earlier one, then the manifest over the earlier manifest, last,
        so that no manifest vouches for files it did not describe. An earlier errors file goes
        when the new run wrote none (``check`` made sure it was the earlier run's). Each step
        may be done again. Raises ConfigError for a staged manifest that cannot be read."""
        staged_manifest = self._staged_manifest()
        manifest = load_manifest(staged_manifest)
        if manifest is None:
            return
        errors_written = manifest.checkpoint.lengths.get("errors", 0) > 0
        for path in self._replaced():
            staged = staged_path(path)
            if path == self.errors and not errors_written:
                path.unlink(missing_ok=True)
                staged.unlink(missing_ok=True)
            elif staged.exists():
                os.replace(staged, path)
        for folder in {path.parent for path in self._replaced()}:
            sync_folder(folder)
        os.replace(staged_manifest, self.manifest)
        sync_folder(self.manifest.parent)

    def _staged_manifest(self) -> Path:
        return staged_path(self.manifest)

    def _replaced(self) -> list[Path]:
        return [self.output, self.errors] + ([self.ids] if self.ids is not None else [])


#: A path as resolved, and its file's (device, inode) when it exists.
_Identity = tuple[Path, tuple[int, int] | None]


def _identity(path: Path) -> _Identity:
    try:
        found = os.stat(path)
    except OSError:  # it does not exist (yet)
        return path.resolve(), None
    return path.resolve(), (found.st_dev, found.st_ino)


def _same(first: _Identity, second: _Identity) -> bool:
    """True when the two paths are one file: the same resolved path, or the same inode."""
    return first[0] == second[0] or (first[1] is not None and first[1] == second[1])


def _check_kind(role: str, path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise ConfigError(f"the {role} {str(path)!r}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(
            f"the {role} {str(path)!r} exists and is not a regular file: refusing to replace it"
        )


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the block, and remove it after: a job leaves no lock
    file behind, a refused one none in the user's folder either."""
    descriptor = _lock(path, what)
    try:
        yield
    finally:
        # Removed while still held: a job that opened it meanwhile and then gets the lock finds
        # the path gone or another file there (see _lock), and locks anew.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(descriptor)


def _lock(path: Path, what: str) -> int:
    """The descriptor of ``path``, created if need be and locked. Raises ConfigError when
    another job holds it."""
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(f"cannot create {str(path)!r}: {error.strerror or error}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(descriptor, path):
                return descriptor
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"cannot lock {what}: {error.strerror or error}") from None
            raise ConfigError(
                f"another sfembed job is using {what}: wait for it to end, or give this job "
                "another --out (and --cache)"
            ) from None
        os.close(descriptor)  # a job that held it removed it meanwhile: lock the path anew


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``descriptor``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
