"""Direct writes: bulk rows handed to the device from our memory, not copied into the page cache.

A write through the page cache costs the CPU a copy and, on a loaded machine, 1-7 us of system
time per 4 KiB row; a job writes every vector twice (the cache's file and the output), so that
was a large share of its CPU. With ``O_DIRECT`` the device takes the bytes from our buffer. It
asks for the buffer's address, the file offset and the length to sit on the device's block
boundaries: 4 KiB suits every common device. A file system that refuses ``O_DIRECT`` (older
tmpfs, some network ones), or that takes it at ``open`` and then fails a direct write, is written
through the page cache as before; only an error the page cache would meet as well (a full disk
or quota, a file too large, a read-only file system, the device's own failure) ends the write.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["ALIGN", "Appender", "RawBuffer", "aligned_buffer", "named", "open_direct", "refused"]

#: The boundary of a direct write's memory, offset and length.
ALIGN = 4096
_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the system has none

#: Bytes whose first one sits on an ``ALIGN`` boundary.
RawBuffer = npt.NDArray[np.uint8]


def aligned_buffer(size: int) -> RawBuffer:
    """``size`` uninitialised bytes starting on an ``ALIGN`` boundary."""
    raw = np.empty(size + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    buffer: RawBuffer = raw[start : start + size]
    return buffer


def open_direct(path: Path, flags: int) -> int:
    """A descriptor on ``path`` (which exists) for direct writes, opened with ``flags``; -1
    when the system or the file system refuses them."""
    if not _DIRECT:
        return -1
    with contextlib.suppress(OSError):
        return os.open(path, flags | os.O_CLOEXEC | _DIRECT)
    return -1


#: Errors of a direct write that a write through the page cache would meet too: the disk refuses
#: the bytes themselves, whichever way they come.
_DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def refused(error: OSError) -> bool:
    """True when ``error`` is a direct write the file system refused for being direct (an
    alignment it does not take, ``EINVAL``; direct writes it does not support after all, say
    ``EOPNOTSUPP``): write it through the page cache. False for an error the page cache would
    meet too (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EROFS``, ``EIO``)."""
    return error.errno not in _DISK_ERRORS


def named(error: OSError, path: Path) -> OSError:
    """``error`` with ``path`` as its file name (``os.pwrite`` and ``os.write`` give none), so
    that a full disk names the file it refused."""
    if error.filename is not None or error.errno is None:
        return error
    return OSError(error.errno, error.strerror, str(path))


class Appender:
    """Bytes appended to a file from ``end`` on, through a stage of ``stage_bytes`` in memory:
    a full stage is written directly, and :meth:`flush` writes what is staged, its whole pages
    directly and the partial last one through the page cache (written again, whole, with the
    pages after it). ``fd`` is a descriptor of the file open for writing, which the caller owns
    and syncs; the bytes from ``end`` on are the appender's. Raises OSError naming ``path`` when
    the disk refuses or takes only a part.
    """

    def __init__(self, path: Path, fd: int, end: int, *, stage_bytes: int = 1 << 20) -> None:
        self.path = path
        self.fd = fd
        self.stage = aligned_buffer(stage_bytes - stage_bytes % ALIGN or ALIGN)
        self.base = end - end % ALIGN  # the file offset of the stage's first byte
        self.fill = end - self.base
        if self.fill:  # the partial page before ``end``: written again with what follows
            self.stage[: self.fill] = np.frombuffer(self._read(self.base, self.fill), np.uint8)
        self.direct = open_direct(path, os.O_WRONLY)

    @property
    def end(self) -> int:
        """The file's length once everything staged is written."""
        return self.base + self.fill

    def write(self, data: memoryview) -> None:
        """Append ``data`` (bytes, format ``B``)."""
        view = np.frombuffer(data, np.uint8)
        while view.size:
            count = min(view.size, self.stage.size - self.fill)
            self.stage[self.fill : self.fill + count] = view[:count]
            self.fill += count
            view = view[count:]
            if self.fill == self.stage.size:
                self.flush()

    def flush(self) -> None:
        """Write everything staged."""
        whole = self.fill - self.fill % ALIGN
        if whole:
            self._write_direct(whole)
        tail = self.fill - whole
        if tail:
            self._pwrite(self.fd, self.stage[whole : self.fill], self.base + whole)
        if whole:  # the partial page moves to the stage's start
            self.stage[:tail] = self.stage[whole : self.fill]
            self.base += whole
            self.fill = tail

    def patch(self, offset: int, data: bytes) -> None:
        """Write ``data`` over the bytes at ``offset`` (before :attr:`end`), in the file and in
        the stage if it holds them."""
        self._pwrite(self.fd, np.frombuffer(data, np.uint8), offset)
        start, end = max(offset, self.base), min(offset + len(data), self.end)
        if start < end:
            self.stage[start - self.base : end - self.base] = np.frombuffer(
                data, np.uint8, end - start, start - offset
            )

    def close(self) -> None:
        """Close the direct descriptor (not ``fd``); what is staged and not flushed is lost."""
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1

    def _write_direct(self, size: int) -> None:
        if self.direct >= 0:
            try:
                self._pwrite(self.direct, self.stage[:size], self.base)
                return
            except OSError as error:
                if not refused(error):
                    raise
                # This file takes no direct writes: the page cache from now on. A part written
                # directly before the error is written again, at the same offsets.
                self.close()
        self._pwrite(self.fd, self.stage[:size], self.base)

    def _pwrite(self, fd: int, data: RawBuffer, offset: int) -> None:
        # The rest of a short write is written again: a full disk then says so (ENOSPC, EFBIG).
        while data.size:
            try:
                written = os.pwrite(fd, data.data, offset)
            except OSError as error:
                raise named(error, self.path) from None
            if not written:
                raise OSError(errno.EIO, f"{str(self.path)!r}: no byte written at {offset}")
            data, offset = data[written:], offset + written

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(f"{str(self.path)!r}: {len(data)} of {size} bytes read at {offset}")
        return data
