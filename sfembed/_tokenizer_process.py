"""The exact tokenizer in a process of its own, so that loading it never stalls sending.

Building XLM-R's tokenizer holds the interpreter lock for most of a second (the Rust side of its
construction runs under it, as does parsing a ``tokenizer.json``), and the event loop sends
nothing meanwhile. So the intake stage loads and runs an exact tokenizer in a child process,
started the first time a text may be over the limit: ``python -m sfembed._tokenizer_process``, a
fresh interpreter (no fork of a process with an event loop and threads). Parent and child talk
over the child's standard input and output, one request at a time, each way a frame of an 8-byte
length and a pickle: first the model's spec, then ``("count", texts)`` or ``("spans", text)``,
answered ``("ok", value)`` or ``("error", exception)``.

The child ignores SIGINT and SIGTERM (the job decides when it ends: a first Ctrl-C lets the
requests in flight finish) and exits when its input closes, so it never outlives the job, even a
killed one. :meth:`ExactCounting.aclose` kills it. When no child can be started, or one dies,
counting goes on in this process, on executor threads, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ._models import ModelSpec
    from ._tokenizers import TokenCounter
    from ._types import IntArray, Span

__all__ = ["ExactCounting"]

log = logging.getLogger("sfembed")

_LENGTH = struct.Struct("!Q")
_MODULE = "sfembed._tokenizer_process"
#: The folder holding this sfembed, first on the child's path: it runs the same code as the job.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ERROR_TAIL = 2000  # characters of a dead child's standard error quoted in the warning


class _ChildGone(Exception):
    """The child could not be started, or its pipes closed mid-request."""


class ExactCounting:
    """Exact token counts and token offsets for ``spec``, off this process (see the module
    docstring); ``in_process`` counts on executor threads instead. Not thread-safe: use it from
    one event loop. Raises what the tokenizer's loading raises (ConfigError for a bad
    ``tokenizer.json`` path)."""

    def __init__(self, spec: ModelSpec, *, in_process: bool = False) -> None:
        self.spec = spec
        self._lock = asyncio.Lock()
        self._child: asyncio.subprocess.Process | None = None
        self._killed: list[asyncio.subprocess.Process] = []
        self._local: asyncio.Future[TokenCounter] | None = None
        # A model without a tokenizer is estimated: cheap, nothing to keep off the loop.
        self.in_process = in_process or spec.tokenizer is None or not sys.executable

    async def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, special tokens included."""
        if not texts:
            return []
        if not self.in_process:
            with contextlib.suppress(_ChildGone):
                return cast(list[int], await self._ask("count", list(texts)))
        from ._tokenizers import count_async

        return await count_async(await self._counter(), texts)

    async def spans(self, text: str) -> list[Span]:
        """(start, end) character offsets of each token of ``text`` (see ``TokenCounter``)."""
        loop = asyncio.get_running_loop()
        if not self.in_process:
            with contextlib.suppress(_ChildGone):
                offsets = cast("IntArray", await self._ask("spans", text))
                # Millions of tuples for a text of megabytes: built beside the loop.
                return await loop.run_in_executor(None, _as_spans, offsets)
        counter = await self._counter()
        return await loop.run_in_executor(None, counter.spans, text)

    async def aclose(self) -> None:
        """Stop the child (at once: it holds nothing worth waiting for) and reap it."""
        if self._child is not None:
            self._discard_child()
        killed, self._killed = self._killed, []
        for child in killed:
            await child.wait()

    async def _counter(self) -> TokenCounter:
        """The counter in this process, loaded once on an executor thread."""
        from ._tokenizers import counter_for

        if self._local is None:
            self._local = asyncio.get_running_loop().run_in_executor(None, counter_for, self.spec)
        return await asyncio.shield(self._local)

    async def _ask(self, op: str, payload: object) -> object:
        """The child's answer to one request; raises _ChildGone (and from then on counts in
        this process) when there is no child to answer."""
        async with self._lock:
            try:
                child = self._child or await self._start()
                answer = await _exchange(child, (op, payload))
            except _ChildGone as gone:
                await self._fall_back(gone)
                raise
            except BaseException:  # cancelled mid-request: its answer would answer the next one
                self._discard_child()
                raise
        status, value = answer
        if status == "error":
            raise value
        return value

    async def _start(self) -> asyncio.subprocess.Process:
        path = os.pathsep.join([_PACKAGE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                _MODULE,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": path},
            )
        except OSError as error:
            raise _ChildGone(f"the tokenizer's process could not start: {error}") from None
        self._child = child
        await _send(child, self.spec)  # it loads the tokenizer while the first texts come
        return child

    def _discard_child(self) -> None:
        """Kill the child now; it is reaped by ``aclose``."""
        child, self._child = self._child, None
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            self._killed.append(child)

    async def _fall_back(self, gone: _ChildGone) -> None:
        child = self._child
        said = str(gone)
        if child is not None:
            self._discard_child()
            await child.wait()
            if child.stderr is not None:
                tail = (await child.stderr.read())[-_ERROR_TAIL:]
                said += f" (exit code {child.returncode}): {tail.decode(errors='replace')}"
        log.warning("%s; counting tokens in this process from now on", said.strip())
        self.in_process = True


async def _exchange(child: asyncio.subprocess.Process, request: object) -> tuple[str, Any]:
    await _send(child, request)
    assert child.stdout is not None
    try:
        size = _LENGTH.unpack(await child.stdout.readexactly(_LENGTH.size))[0]
        answer = await child.stdout.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        raise _ChildGone("the tokenizer's process ended") from None
    return cast(tuple[str, Any], pickle.loads(answer))


async def _send(child: asyncio.subprocess.Process, message: object) -> None:
    assert child.stdin is not None
    frame = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        child.stdin.write(_LENGTH.pack(len(frame)))
        child.stdin.write(frame)
        await child.stdin.drain()
    except ConnectionError:
        raise _ChildGone("the tokenizer's process ended") from None


def _as_spans(offsets: IntArray) -> list[Span]:
    return list(zip(offsets[:, 0].tolist(), offsets[:, 1].tolist(), strict=True))


# --- the child ---------------------------------------------------------------------------------


def _read(stream: IO[bytes]) -> Any:
    """The next message, or None when the parent has closed the pipe."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(header)
    body = stream.read(size)
    return pickle.loads(body) if len(body) == size else None


def _write(stream: IO[bytes], message: object) -> None:
    try:
        frame = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:  # an exception that does not pickle: its words do
        frame = pickle.dumps(("error", RuntimeError(str(error))))
    stream.write(_LENGTH.pack(len(frame)) + frame)
    stream.flush()


def _serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer the parent's requests until it closes the pipe."""
    import numpy as np

    from ._tokenizers import counter_for

    spec = _read(requests)
    if spec is None:
        return
    try:
        counter: TokenCounter | None = counter_for(spec)
        failure: Exception | None = None
    except Exception as error:  # said in answer to each request, where the parent can raise it
        counter, failure = None, error
    while (request := _read(requests)) is not None:
        op, payload = request
        try:
            if counter is None:
                raise cast(Exception, failure)
            if op == "count":
                answer: object = counter.count(payload)
            else:
                answer = np.array(counter.spans(payload), dtype=np.int64).reshape(-1, 2)
            _write(answers, ("ok", answer))
        except Exception as error:
            _write(answers, ("error", error))


def main() -> None:
    """The child. The job decides when it ends, not a signal to the terminal's process group;
    what a library might print goes to standard error, not into the answers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
