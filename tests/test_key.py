"""The API key: sent only to the configured base URL, never over plain http beyond this machine
unless allowed, and never written anywhere: not in the output, the sidecar, the errors file, the
manifest, the cache, the progress line, the logs or an error message."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from sfembed import (
    APIStatusError,
    AuthenticationError,
    ConfigError,
    EmbeddingClient,
    load_settings,
)
from sfembed._engine import embed
from sfembed.testing import Faults, LocalServer, ServerConfig

SECRET = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


async def run_cli(*args: str, key: str = SECRET) -> tuple[int, bytes]:
    """``sfembed embed ...`` in a child process with the key in its environment; (code, output)."""
    env = {**os.environ, "SFEMBED_SECRET": key, "PYTHONWARNINGS": "error"}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sfembed",
        "embed",
        *args,
        "--api-key-env",
        "SFEMBED_SECRET",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await child.communicate()
    assert child.returncode is not None
    return child.returncode, output


def every_byte_written(folder: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
async def keyed_server() -> AsyncIterator[LocalServer]:
    faults = Faults(rate_503=0.1, rate_reset=0.05, seed=3)
    async with LocalServer(ServerConfig(api_key=SECRET, faults=faults)) as server:
        yield server


async def test_no_file_a_job_writes_and_nothing_it_prints_holds_the_key(
    keyed_server: LocalServer, tmp_path: Path
) -> None:
    lines = [orjson.dumps({"id": f"d{n}", "text": f"text {n}"}) for n in range(300)]
    lines[5] = b'{"id": "d5", "text": '  # an errors file is written too
    lines[9] = orjson.dumps({"id": "d9", "text": SECRET[:12]})  # a text that looks like a key
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out" / "vectors.npy"
    out.parent.mkdir()
    (tmp_path / "wrong").mkdir()
    base = ["--out", str(out), "--base-url", keyed_server.url, "--batch-size", "8"]
    code, printed = await run_cli(str(tmp_path / "in.jsonl"), *base)  # with the progress bar
    assert code == 1, printed.decode()  # the bad line
    code_again, printed_again = await run_cli(str(tmp_path / "in.jsonl"), *base, "--resume")
    wrong = ["--out", str(tmp_path / "wrong" / "vectors.npy"), "--base-url", keyed_server.url]
    code_wrong, printed_wrong = await run_cli(str(tmp_path / "in.jsonl"), *wrong, key=SECRET[::-1])
    assert code_again == 1
    assert code_wrong == 1
    assert b"401" in printed_wrong or b"Invalid token" in printed_wrong
    written = every_byte_written(tmp_path)
    assert {Path(name).name for name in written} >= {
        "vectors.npy",
        "vectors.ids.jsonl",
        "vectors.npy.errors.jsonl",
        "vectors.npy.manifest.json",
        "sfembed-cache.sqlite",
    }
    secret = SECRET.encode()
    for name, data in {**written, "output": printed + printed_again + printed_wrong}.items():
        assert secret not in data, name
        assert SECRET[::-1].encode() not in data, name
    assert keyed_server.stats.resets > 0  # retries happened (and were logged) along the way


async def test_an_authentication_error_does_not_carry_the_key(keyed_server: LocalServer) -> None:
    wrong = SECRET[::-1]
    settings = load_settings(base_url=keyed_server.url)
    async with EmbeddingClient(api_key=wrong, base_url=keyed_server.url) as client:
        with pytest.raises(AuthenticationError) as raised:
            await embed(["a"], model="BAAI/bge-m3", settings=settings, client=client)
    error: APIStatusError = raised.value
    text = repr(error) + str(error) + repr(vars(error)) + repr(error.__context__)
    assert wrong not in text
    assert SECRET not in text


async def test_a_redirect_is_not_followed_with_the_key(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"data": []})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://localhost:{other_port}/v1/embeddings")

    other = web.Application()
    other.router.add_post("/v1/embeddings", elsewhere)
    first = web.Application()
    first.router.add_post("/v1/embeddings", redirect)
    runners = [web.AppRunner(app) for app in (other, first)]
    for runner in runners:
        await runner.setup()
    try:
        sites = [web.TCPSite(runner, "127.0.0.1", 0) for runner in runners]
        for site in sites:
            await site.start()
        other_port = runners[0].addresses[0][1]
        url = f"http://127.0.0.1:{runners[1].addresses[0][1]}/v1"
        async with EmbeddingClient(api_key=SECRET, base_url=url) as client:
            with pytest.raises(APIStatusError) as raised:
                await client.embed("a", model="BAAI/bge-m3")
        assert raised.value.status == 307
        assert seen == []  # the other host never heard from us
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://embeddings.example.com/v1", False),
        ("http://10.0.0.7:8080/v1", False),
        ("http://127.0.0.1:9/v1", True),
        ("http://localhost:9/v1", True),
        ("http://[::1]:9/v1", True),
        ("https://embeddings.example.com/v1", True),
    ],
)
def test_plain_http_beyond_this_machine_needs_explicit_consent(url: str, allowed: bool) -> None:
    if allowed:
        EmbeddingClient(api_key=SECRET, base_url=url)
    else:
        with pytest.raises(ConfigError) as raised:
            EmbeddingClient(api_key=SECRET, base_url=url)
        assert SECRET not in str(raised.value)
        EmbeddingClient(api_key=SECRET, base_url=url, allow_insecure_http=True)


async def test_the_cli_refuses_plain_http_to_a_remote_host_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "a"}\n')
    out = str(tmp_path / "out.npy")
    remote = "http://192.0.2.1:9/v1"  # TEST-NET-1: never routed
    code, printed = await run_cli(str(tmp_path / "in.jsonl"), "--out", out, "--base-url", remote)
    assert code == 2
    assert b"http" in printed
    assert SECRET.encode() not in printed
    assert not (tmp_path / "out.npy").exists()  # refused before anything was written


async def test_an_error_body_that_echoes_the_key_is_redacted() -> None:
    async def echo(request: web.Request) -> web.Response:
        # A misconfigured proxy answering with the request it received, headers included.
        echoed = f"bad gateway: got Authorization: {request.headers['Authorization']}"
        return web.json_response({"code": 50000, "message": echoed}, status=502)

    app = web.Application()
    app.router.add_post("/v1/embeddings", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        async with EmbeddingClient(api_key=SECRET, base_url=url) as client:
            with pytest.raises(APIStatusError) as raised:
                await client.embed("a", model="BAAI/bge-m3")
    finally:
        await runner.cleanup()
    assert "[redacted]" in str(raised.value)
    assert SECRET not in str(raised.value) + repr(vars(raised.value))
