"""Shared by the benchmarks: a local server in a child process, per-window figures, and the
removal of a run's big files (inputs, outputs, caches: gigabytes at the larger sizes).

The server runs in its own process so that its CPU does not count against the client's and its
clock judges the limits exactly as a remote server would. At the end it hands back its log of
accepted requests (arrival time, tokens) and its status counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import shutil
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sfembed import testing


@dataclass
class ServerReport:
    """What the server saw: accepted (time, tokens) pairs and answers by status; and every
    request it received, of which ``resets`` were cut mid-answer and ``stalls`` held."""

    accepted: list[tuple[float, int]]
    by_status: Counter[int]
    rate_limited: int
    requests: int = 0
    resets: int = 0
    stalls: int = 0
    first_request_at: float | None = None  # time.monotonic() of the first request


def _report(stats: testing.ServerStats) -> ServerReport:
    limited = stats.rate_limited_tpm + stats.rate_limited_rpm
    return ServerReport(
        list(stats.accepted),
        Counter(stats.by_status),
        limited,
        stats.requests,
        stats.resets,
        stats.stalls,
        stats.first_request_at,
    )


def _serve(config: testing.ServerConfig, conn: Connection) -> None:
    async def run() -> None:
        async with testing.LocalServer(config) as server:
            conn.send(server.url)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            conn.send(_report(server.stats))

    asyncio.run(run())


@contextmanager
def server_process(
    config: testing.ServerConfig, serve: Callable[[testing.ServerConfig, Connection], None] = _serve
) -> Iterator[tuple[str, list[Any]]]:
    """Yield (url, box); after the block the box holds what ``serve`` sent back at the end (by
    default a ServerReport). ``serve`` runs in a spawned process: it sends the URL, waits for
    "stop", then sends its report."""
    parent, child = mp.Pipe()
    process = mp.get_context("spawn").Process(target=serve, args=(config, child), daemon=True)
    process.start()
    box: list[Any] = []
    try:
        yield parent.recv(), box
        parent.send("stop")
        box.append(parent.recv())
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


def _serve_until_killed(config: testing.ServerConfig, conn: Connection) -> None:
    """Like ``_serve``, but on "kill" the report goes first and then the event loop is held (no
    request is read or answered any more) until the parent kills the process."""

    async def run() -> None:
        async with testing.LocalServer(config) as server:
            conn.send(server.url)
            command = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            conn.send(_report(server.stats))
            if command == "kill":
                # Blocks the loop on purpose: nothing is answered after the report.
                time.sleep(3600)  # noqa: ASYNC251

    asyncio.run(run())


class KillableServer:
    """The local server in a child process that can be killed mid-run (SIGKILL: every connection
    and request in flight dies with it) and started again in a new process on the same port, as
    a crash and a supervisor's restart would do. A context manager; ``reports`` holds what each
    process saw, its last moment included, in order."""

    def __init__(self, config: testing.ServerConfig) -> None:
        self.config = config
        self.url = ""
        self.reports: list[ServerReport] = []
        self.down_s = 0.0  # from the kill until the new process listened
        self._process: Any = None
        self._conn: Connection | None = None

    def __enter__(self) -> KillableServer:
        self._start(self.config)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end("stop")

    def kill_and_restart(self) -> None:
        """Kill the server process and start a new one on its port. Blocks: call it from a
        thread while a job runs."""
        started = time.monotonic()
        self._end("kill")
        port = urlsplit(self.url).port
        self._start(dataclasses.replace(self.config, port=port or 0))
        self.down_s = time.monotonic() - started

    def _start(self, config: testing.ServerConfig) -> None:
        self._conn, child = mp.Pipe()
        context = mp.get_context("spawn")
        self._process = context.Process(
            target=_serve_until_killed, args=(config, child), daemon=True
        )
        self._process.start()
        self.url = self._conn.recv()

    def _end(self, command: str) -> None:
        assert self._conn is not None
        try:
            self._conn.send(command)
            self.reports.append(self._conn.recv())
        finally:
            if command == "kill":
                self._process.kill()
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()


def windows(accepted: list[tuple[float, int]], window_s: float) -> list[tuple[int, int]]:
    """(tokens, requests) per consecutive window from the first accepted request; the last,
    partial window (the job ran out of work in it) is left out."""
    if not accepted:
        return []
    start = accepted[0][0]
    count = int((accepted[-1][0] - start) // window_s)
    totals = [[0, 0] for _ in range(count)]
    for when, tokens in accepted:
        index = int((when - start) // window_s)
        if index < count:
            totals[index][0] += tokens
            totals[index][1] += 1
    return [(t, r) for t, r in totals]


def max_sliding(accepted: list[tuple[float, int]], window_s: float) -> tuple[int, int]:
    """The most tokens and requests the server accepted in any window of ``window_s``."""
    best_tokens = best_requests = tokens = 0
    left = 0
    for right, (when, size) in enumerate(accepted):
        tokens += size
        while accepted[left][0] <= when - window_s:
            tokens -= accepted[left][1]
            left += 1
        best_tokens = max(best_tokens, tokens)
        best_requests = max(best_requests, right - left + 1)
    return best_tokens, best_requests


def table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def tidy(folder: Path, keep: Collection[str] = ()) -> bool:
    """Delete ``folder`` with what a run made in it, but the files named in ``keep`` (small
    logs): the folder stays only to hold those. True when something was kept."""
    if not folder.exists():
        return False
    kept = False
    for entry in folder.iterdir():
        if entry.name in keep:
            kept = True
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if not kept:
        folder.rmdir()
    return kept


_MARK = ".sfembed-benchmark"  # in a work folder a benchmark made, and may empty again


def fresh_workdir(folder: Path) -> None:
    """Make ``folder`` an empty work folder. A folder that exists is emptied only when a
    benchmark made it (it holds the mark) or it is empty: ``--workdir`` pointed at a folder of
    the user's files exits with a message instead of deleting them."""
    if folder.exists() and any(folder.iterdir()) and not (folder / _MARK).exists():
        raise SystemExit(
            f"--workdir {folder} holds files no benchmark made: name a new or empty folder"
        )
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / _MARK).touch()


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if nothing is left in it (a work folder the runs have tidied)."""
    # Not when something is kept in it (logs, or files not the benchmark's), or it is gone.
    with contextlib.suppress(OSError):
        folder.rmdir()
