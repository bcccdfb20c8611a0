"""Helpers of the hostile tests: `sfembed` in a child process, and the bytes of a folder."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from sfembed.testing import LocalServer

KEY = "sk-local-test"
KEY_ENV = "SFEMBED_HOSTILE_KEY"
WAIT_S = 50.0


@dataclass(slots=True)
class Done:
    code: int
    out: str
    err: str


def docs(count: int, *, prefix: str = "document") -> list[bytes]:
    return [orjson.dumps({"id": f"d{i}", "text": f"{prefix} number {i}"}) for i in range(count)]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (hidden ones too) and its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


#: The ``make_server`` fixture of conftest: ``await make_server(**ServerConfig fields)``.
MakeServer = Callable[..., Awaitable[LocalServer]]


async def start(
    *args: str, key: str | None = KEY, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``python -m sfembed ARGS`` started, every warning an error; the key in KEY_ENV."""
    environment = {**os.environ, "PYTHONWARNINGS": "error", **(env or {})}
    if key is not None:
        environment[KEY_ENV] = key
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-W", "error", "-m", "sfembed", *args),
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def sfembed(*args: str, key: str | None = KEY, env: dict[str, str] | None = None) -> Done:
    """``python -m sfembed ARGS`` run to its end (see ``start``)."""
    child = await start(*args, key=key, env=env)
    out, err = await asyncio.wait_for(child.communicate(), WAIT_S)
    assert child.returncode is not None
    return Done(child.returncode, out.decode(), err.decode())


def embed_args(url: str, source: Path | str, out: Path | str, *extra: str) -> list[str]:
    """``embed`` against the server at ``url``, with the key in KEY_ENV, quietly."""
    return [
        *("embed", str(source), "--out", str(out), "--base-url", url),
        *("--api-key-env", KEY_ENV, "--no-progress", "--batch-size", "8"),
        *extra,
    ]


def assert_clean(done: Done, *secrets: str) -> None:
    """No traceback, no warning, and no secret in what the command printed."""
    for sign in ("Traceback", "Exception ignored", "Warning", "nclosed"):
        assert sign not in done.err, done.err
    for secret in secrets:
        assert secret not in done.out + done.err, done.err


def nothing_listening() -> str:
    """The base URL of a local port nothing listens on: every connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
