"""How soon does `sfembed embed` send? From process start to the first request, as a user runs it.

    python benchmarks/bench_startup.py [--scenario demo,tpm,rpm,big,lance,help] [--repeat 5]

The clock starts just before the job's process is spawned and stops when its first request
arrives at the server, so interpreter start-up, imports, settings, the job's files, the cache and
the first reading of the input all count. Each scenario runs ``--repeat`` times; the table gives
the median, min and max.

* ``demo``: ``make demo``'s command (``--local``: the server starts inside the job's process, so
  its start counts too; the 40 long records need the exact XLM-R tokenizer). Runs to the end and
  also gives the summary's "TPM utilisation" and wall time.
* ``tpm``, ``rpm``: the TPM-bound and RPM-bound inputs of ``bench_pacing.py``, the command line
  with its defaults (cache on, progress bar on) against the local server in another process;
  stopped once the first request has arrived.
* ``big``: 1,000,000 short documents (about 90 MB), as ``tpm`` otherwise: the cost of reading,
  counting or hashing the whole input before the first request.
* ``lance``: as ``tpm``, into a new LanceDB table (``--out DIR/db/vectors.lance``): the cost of
  importing lancedb and opening the table before the first request.
* ``help``: ``sfembed --help``, the whole process's wall time (imports alone).

The job runs through a wrapper that calls the same entry point as the ``sfembed`` script and
marks the client's first send, with the CPU seconds the process has used until then (every
thread, interpreter start included): on a busy machine the wall time varies with the load, the
CPU much less. In ``demo`` the server is inside the job's process: the first request's arrival
is when the server's handler gets it, marked by the same wrapper.

``--instructions`` counts instead, once per scenario (``demo``, ``tpm``, ``rpm``, ``big``), the
instructions the job's process runs until its client first sends, every thread and interpreter
start included: the same command under valgrind's cachegrind, stopped at that send. The count
does not move with the load (to about 0.1%), so it compares two versions on a busy machine; it
leaves out what is waited for (a disk's fsync, the server), and two threads' overlap.

sfembed's bytecode is compiled first, as an installed package's is (a process that may not write
``__pycache__``, as with PYTHONDONTWRITEBYTECODE, would compile every module at each start:
some 80 ms more here). ``--no-bytecode`` measures that case.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from _harness import table
from bench_pacing import PROFILES, WINDOW_S, documents

import sfembed
from sfembed import testing

KEY = "sk-local-test"
# Every command runs in the folder of the sfembed measured, as `make demo` does: `-c` and `-m`
# put the working folder first on the path.
ROOT = Path(sfembed.__file__).parent.parent

# Runs the command line as the `sfembed` script does, and appends to the file named by the first
# argument a line per mark: "client MONOTONIC CPU" when the client first sends (CPU: this
# process's user and system seconds so far, every thread, interpreter start included) and
# "server MONOTONIC" when a local server in this process first receives. An audit hook patches
# the two methods once their modules are imported; it imports nothing itself, and looks a class up
# in its module's namespace without raising: a failed getattr on every audit event while aiohttp's
# client module loads cost some 6 M instructions, more or fewer as the two threads interleaved.
_MARKED = r"""
import os, sys, time
mark = sys.argv.pop(1)
todo = {"sfembed._testing.server": ("LocalServer", "_respond", "server"),
        "aiohttp.client": ("ClientSession", "_request", "client")}
def patch(cls, name, what):
    real, done = getattr(cls, name), []
    async def first(self, *args, **kwargs):
        if not done:
            done.append(True)
            cpu = f" {time.process_time()!r}" if what == "client" else ""
            with open(mark, "a") as out:
                out.write(f"{what} {time.monotonic()!r}{cpu}\n")
            if what == "client" and os.environ.get("SFEMBED_BENCH_STOP_AT_SEND"):
                os._exit(0)
        return await real(self, *args, **kwargs)
    setattr(cls, name, first)
def hook(event, args):
    for module in [m for m in todo if m in sys.modules]:
        cls = vars(sys.modules[module]).get(todo[module][0])
        if cls is not None:
            patch(cls, *todo.pop(module)[1:])
sys.addaudithook(hook)
sys.argv[0] = "sfembed"
from sfembed._cli import main
sys.exit(main())
"""


def _marks(path: Path) -> dict[str, list[float]]:
    marks = {}
    for line in path.read_text().splitlines():
        what, *values = line.split()
        marks[what] = [float(value) for value in values]
    return marks


def _serve_first(config: testing.ServerConfig, conn: Connection) -> None:
    """The server for a stopped-early run: sends its URL, then the time of the first request
    as soon as it arrives, then waits to be told to stop."""

    async def run() -> None:
        async with testing.LocalServer(config) as server:
            conn.send(server.url)
            while server.stats.first_request_at is None:  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(0.001)
            conn.send(server.stats.first_request_at)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(run())


def _write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": f"d{i}", "text": text}, ensure_ascii=False) + "\n")


def _big_texts() -> list[str]:
    rng = random.Random(3)
    words = ["data", "model", "vector", "search", "index", "query", "token", "window", "limit"]
    return [f"record {i} on {' '.join(rng.choices(words, k=12))}." for i in range(1_000_000)]


def first_request_external(name: str, source: Path, workdir: Path) -> tuple[float, float]:
    """Seconds from spawning the job to its first request at a server in another process, and
    the job's CPU seconds until it sent it."""
    parent, server = _server(name)
    try:
        url = parent.recv()
        mark = workdir / "marks"
        command = [sys.executable, "-c", _MARKED, str(mark), *_job(name, source, workdir, url)]
        env = {**os.environ, "SILICONFLOW_API_KEY": KEY}
        started = time.monotonic()
        job = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            arrived = parent.recv() if parent.poll(60) else float("nan")
        finally:
            job.send_signal(signal.SIGKILL)
            job.wait()
        parent.send("stop")
        return float(arrived) - started, _marks(mark)["client"][1]
    finally:
        server.join(timeout=10)
        if server.is_alive():
            server.kill()


#: The pacing profile of each scenario that runs against a server in another process.
_PROFILE = {"tpm": "tpm", "rpm": "rpm", "big": "tpm", "lance": "tpm"}


def _server(name: str) -> tuple[Connection, BaseProcess]:
    """A started local server process for scenario ``name`` (see ``_serve_first``), and the
    pipe that gives its URL."""
    profile = PROFILES[_PROFILE[name]]
    limits = testing.ModelLimits(rpm=profile.rpm, tpm=profile.tpm)
    config = testing.ServerConfig(window_s=WINDOW_S, default_limits=limits)
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve_first, args=(config, child))
    server.start()
    return parent, server


def _job(name: str, source: Path, workdir: Path, url: str = "") -> list[str]:
    """The command line's arguments of scenario ``name``: ``make demo``'s, or the pacing
    profile's defaults against ``url``."""
    if name == "demo":
        return [
            *("embed", "--local", str(ROOT / "sfembed/data/sample.jsonl")),
            *("--out", str(workdir / "demo.npy"), "--model", "BAAI/bge-m3"),
            *("--rpm", "600", "--tpm", "300000", "--window-s", "6", "--no-cache"),
        ]
    profile = PROFILES[_PROFILE[name]]
    out = workdir / ("db/vectors.lance" if name == "lance" else "out.npy")
    return [
        *("embed", str(source), "--out", str(out), "--base-url", url),
        *("--model", profile.model, "--rpm", str(profile.rpm), "--tpm", str(profile.tpm)),
        *("--window-s", str(WINDOW_S)),
    ]


def instructions(name: str, source: Path, workdir: Path) -> int:
    """Instructions the job's process runs until its client first sends (every thread and the
    interpreter's start), counted by valgrind's cachegrind."""
    parent, server = (None, None) if name == "demo" else _server(name)
    try:
        url = parent.recv() if parent is not None else ""
        command = [
            *("valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"),
            *(
                sys.executable,
                "-c",
                _MARKED,
                str(workdir / "marks"),
                *_job(name, source, workdir, url),
            ),
        ]
        env = {
            **os.environ,
            "SILICONFLOW_API_KEY": KEY,
            "SFEMBED_BENCH_STOP_AT_SEND": "1",
            "PYTHONHASHSEED": "0",
        }
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    finally:
        if server is not None:
            server.kill()
            server.join()
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None or "client" not in _marks(workdir / "marks"):
        raise RuntimeError(f"no count for {name}: {done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def demo(workdir: Path) -> tuple[float, float, float, float]:
    """(first request s, CPU s before it, wall s, TPM utilisation) of ``make demo``'s command."""
    mark = workdir / "marks"
    command = [sys.executable, "-c", _MARKED, str(mark), *_job("demo", Path(), workdir)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    wall = time.monotonic() - started
    found = re.search(r"TPM utilisation\s+([\d.]+)%", done.stdout)
    utilisation = float(found.group(1)) / 100 if found else float("nan")
    marks = _marks(mark)
    return marks["server"][0] - started, marks["client"][1], wall, utilisation


def help_wall() -> float:
    started = time.monotonic()
    command = [sys.executable, "-m", "sfembed", "--help"]
    subprocess.run(command, capture_output=True, check=True, cwd=ROOT)
    return time.monotonic() - started


def spread(values: list[float], show: Callable[[float], str]) -> str:
    return f"{show(statistics.median(values))} ({show(min(values))}-{show(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="demo,tpm,rpm,big,lance,help", help="comma-separated")
    parser.add_argument("--repeat", type=int, default=5, help="runs per scenario")
    parser.add_argument("--no-bytecode", action="store_true", help="leave sfembed uncompiled")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the instructions until the first send, once per scenario (valgrind)",
    )
    args = parser.parse_args()
    package = Path(sfembed.__file__).parent
    if args.no_bytecode:
        for cached in package.glob("__pycache__/*.pyc"):
            cached.unlink()
    else:
        compileall.compile_dir(package, quiet=1)
    load = os.getloadavg()[0]
    rows = []
    seconds: Callable[[float], str] = lambda s: f"{s:.2f} s"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="sfembed-startup-") as folder:
        base = Path(folder)
        for name in args.scenario.split(","):
            firsts: list[float] = []
            cpus: list[float] = []
            extra: list[tuple[float, float]] = []
            source = base / f"{name}.jsonl"
            if name in ("tpm", "rpm", "lance"):
                _write_jsonl(source, documents(PROFILES[_PROFILE[name]]))
            elif name == "big":
                _write_jsonl(source, _big_texts())
            if args.instructions and name == "help":
                continue  # no first send
            if args.instructions:
                workdir = base / "run"
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir()
                count = instructions(name, source, workdir)
                rows.append((name, "instructions to the first send", f"{count / 1e6:,.1f} M"))
                continue
            for _ in range(args.repeat):
                workdir = base / "run"
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir()
                if name == "demo":
                    first, cpu, wall, utilisation = demo(workdir)
                    extra.append((wall, utilisation))
                    cpus.append(cpu)
                elif name == "help":
                    first = help_wall()
                else:
                    first, cpu = first_request_external(name, source, workdir)
                    cpus.append(cpu)
                firsts.append(first)
                print(f"{name}: {first:.3f} s", file=sys.stderr, flush=True)
            label = "whole process (--help)" if name == "help" else "first request"
            rows.append((name, label, spread(firsts, seconds)))
            if cpus:
                rows.append((name, "CPU before the first request", spread(cpus, seconds)))
            if extra:
                walls, shares = [w for w, _ in extra], [u for _, u in extra]
                rows.append((name, "wall", spread(walls, seconds)))
                rows.append((name, "TPM utilisation", spread(shares, lambda u: f"{u:.1%}")))
    print(f"sfembed from {package}; load average at the start: {load:.1f}")
    if not args.instructions:
        print(f"median (min-max) of {args.repeat} runs")
    print(table(rows, ("scenario", "figure", "value")))


if __name__ == "__main__":
    main()
