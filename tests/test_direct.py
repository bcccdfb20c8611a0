"""Appender: bytes appended through an aligned stage land in the file exactly as given, whether
written directly or (refused) through the page cache, across stage boundaries, flushes in the
middle of a page, patches before the end, and a reopen in the middle of a page."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from sfembed._direct import ALIGN, Appender, aligned_buffer, refused


def _chunks(seed: int, sizes: list[int]) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]


def _appender(path: Path, end: int = 0) -> tuple[int, Appender]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    return fd, Appender(path, fd, end, stage_bytes=2 * ALIGN)


def test_appended_bytes_land_as_given_across_stages_flushes_and_patches(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd, appender = _appender(path)
    expected = bytearray()
    try:
        for number, chunk in enumerate(_chunks(1, [100, 5000, 3, 9000, 4096, 1, 7777])):
            appender.write(memoryview(chunk))
            expected += chunk
            if number % 2:  # a flush ends in the middle of a page: the file holds it all
                appender.flush()
                assert path.read_bytes() == expected
            assert appender.end == len(expected)
        appender.patch(10, b"head")  # long written: in the file only
        expected[10:14] = b"head"
        appender.patch(len(expected) - 3, b"xyz")  # still staged: in both
        expected[-3:] = b"xyz"
        appender.flush()
    finally:
        appender.close()
        os.close(fd)
    assert path.read_bytes() == expected


def test_a_reopened_file_goes_on_after_its_last_partial_page(tmp_path: Path) -> None:
    path = tmp_path / "out"
    first, second = _chunks(2, [ALIGN + 123, 3 * ALIGN + 5])
    path.write_bytes(first + b"torn tail, cut by the caller")
    os.truncate(path, len(first))
    fd, appender = _appender(path, len(first))
    try:
        appender.write(memoryview(second))
        appender.flush()
    finally:
        appender.close()
        os.close(fd)
    assert path.read_bytes() == first + second


def test_a_direct_write_refused_goes_through_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd, appender = _appender(path)
    appender.stage = aligned_buffer(2 * ALIGN + 1)[1:]  # an address direct writes refuse
    data = _chunks(3, [3 * ALIGN])[0]
    try:
        appender.write(memoryview(data))
        appender.flush()
        assert appender.direct == -1  # given up on for this file
    finally:
        appender.close()
        os.close(fd)
    assert path.read_bytes() == data


def test_a_direct_write_failing_otherwise_goes_through_the_page_cache(tmp_path: Path) -> None:
    # A file system may take O_DIRECT at open and fail the write itself with an error other
    # than EINVAL (EOPNOTSUPP, say): here a descriptor that cannot write (EBADF) stands for it.
    path = tmp_path / "out"
    fd, appender = _appender(path)
    if appender.direct >= 0:
        os.close(appender.direct)
    appender.direct = os.open(path, os.O_RDONLY)
    data = _chunks(4, [5 * ALIGN + 17])[0]
    try:
        appender.write(memoryview(data))
        appender.flush()
        assert appender.direct == -1
    finally:
        appender.close()
        os.close(fd)
    assert path.read_bytes() == data


def test_a_full_disk_ends_the_write_naming_the_file() -> None:
    path = Path("/dev/full")  # every write to it fails with ENOSPC
    fd = os.open(path, os.O_WRONLY)
    appender = Appender(path, fd, 0, stage_bytes=2 * ALIGN)
    try:
        with pytest.raises(OSError, match="No space left") as raised:
            appender.write(memoryview(bytes(3 * ALIGN)))  # a full stage is written at once
    finally:
        appender.close()
        os.close(fd)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO])
def test_errors_the_page_cache_would_meet_too_are_not_taken_for_a_refusal(code: int) -> None:
    assert not refused(OSError(code, os.strerror(code)))
    assert refused(OSError(errno.EINVAL, os.strerror(errno.EINVAL)))
    assert refused(OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)))
