"""The exact tokenizer in a process of its own, so that loading it never stalls sending.

Building XLM-R's tokenizer holds the interpreter lock for most of a second (the Rust side of its
construction runs under it, as does parsing a ``tokenizer.json``), and the event loop sends
nothing meanwhile. So the intake stage loads and runs an exact tokenizer in a child process,
started the first time a text may be over the limit: ``python -m sfembed._tokenizer_process``, a
fresh interpreter (no fork of a process with an event loop and threads). Parent and child talk
over the child's standard input and output, one request at a time, each way a frame of an 8-byte
length and a pickle: first the model's spec, then ``("count", texts)`` or ``("spans", text)``,
answered ``("ok", value)`` or ``("error", exception)``.

One child per model serves the whole process, as one loaded tokenizer used to: every job and
every ``embed`` call of a Ray actor after the first finds it loaded. An exchange runs on an
executor thread and always completes, even when the task that asked is cancelled, so that an
answer never goes to the wrong request. The child ignores SIGINT and SIGTERM (the job decides
when it ends: a first Ctrl-C lets the requests in flight finish) and exits when its input
closes: when this process closes it at exit (:func:`close_children`) or dies. When no child can
be started, or one dies, counting goes on in this process, on executor threads, with a warning.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ._models import ModelSpec
    from ._tokenizers import TokenCounter
    from ._types import IntArray, Span

__all__ = ["ExactCounting", "close_children"]

log = logging.getLogger("sfembed")

_LENGTH = struct.Struct("!Q")
_MODULE = "sfembed._tokenizer_process"
#: The folder holding this sfembed, first on the child's path: it runs the same code as the job.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ERROR_TAIL = 2000  # characters of a dead child's standard error quoted in the warning
_CLOSE_WAIT_S = 5.0  # a child asked to end (its input closed) is killed after this long


class _ChildGone(Exception):
    """The child could not be started, or its pipes closed mid-request."""


class ExactCounting:
    """Exact token counts and token offsets for ``spec``, from the process-wide child of its
    model (see the module docstring); ``in_process`` counts on executor threads instead.
    Raises what the tokenizer's loading raises (ConfigError for a bad ``tokenizer.json``
    path)."""

    def __init__(self, spec: ModelSpec, *, in_process: bool = False) -> None:
        self.spec = spec
        # A model without a tokenizer is estimated: cheap, nothing to keep off the loop. A frozen
        # application's executable would run the application again, not this module.
        frozen = getattr(sys, "frozen", False)
        self.in_process = in_process or spec.tokenizer is None or not sys.executable or frozen

    async def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, special tokens included."""
        if not texts:
            return []
        if not self.in_process:
            answer = await self._ask("count", list(texts))
            if answer is not None:
                return cast(list[int], answer)
        from ._tokenizers import count_async

        return await count_async(await self._counter(), texts)

    async def spans(self, text: str) -> list[Span]:
        """(start, end) character offsets of each token of ``text`` (see ``TokenCounter``)."""
        loop = asyncio.get_running_loop()
        if not self.in_process:
            offsets = await self._ask("spans", text)
            if offsets is not None:
                # Millions of tuples for a text of megabytes: built beside the loop.
                return await loop.run_in_executor(None, _as_spans, offsets)
        counter = await self._counter()
        return await loop.run_in_executor(None, counter.spans, text)

    async def _counter(self) -> TokenCounter:
        """The counter in this process, loaded once per process, on an executor thread."""
        from ._tokenizers import counter_for

        return await asyncio.get_running_loop().run_in_executor(None, counter_for, self.spec)

    async def _ask(self, op: str, payload: object) -> Any:
        """The child's answer, or None (and counting in this process from then on) when there
        is no child to give one."""
        loop = asyncio.get_running_loop()
        try:
            status, value = await loop.run_in_executor(_exchanges, _ask, self.spec, (op, payload))
        except _ChildGone as gone:
            log.warning("%s; counting tokens in this process from now on", str(gone).strip())
            self.in_process = True
            return None
        if status == "error":
            raise value
        return value


class _Child:
    """One tokenizer process and the lock that keeps its exchanges whole."""

    def __init__(self, spec: ModelSpec) -> None:
        path = os.pathsep.join([_PACKAGE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", _MODULE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": path},
            )
        except OSError as error:
            raise _ChildGone(f"the tokenizer's process could not start: {error}") from None
        self.pid = os.getpid()  # the process that started it: a fork must start its own
        self.lock = threading.Lock()
        with self.lock:
            self._send(spec)  # it loads the tokenizer while the first texts come

    def ask(self, request: object) -> tuple[str, Any]:
        """Send ``request`` and read its answer. Raises _ChildGone."""
        with self.lock:
            self._send(request)
            stdout = cast(IO[bytes], self.process.stdout)
            header = stdout.read(_LENGTH.size)
            answer = stdout.read(_LENGTH.unpack(header)[0]) if len(header) == _LENGTH.size else b""
            if not answer:
                raise _ChildGone(self._death())
            return cast(tuple[str, Any], pickle.loads(answer))

    def _send(self, message: object) -> None:
        frame = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        stdin = cast(IO[bytes], self.process.stdin)
        try:
            stdin.write(_LENGTH.pack(len(frame)))
            stdin.write(frame)
            stdin.flush()
        except (BrokenPipeError, ValueError):
            raise _ChildGone(self._death()) from None

    def _death(self) -> str:
        """Why the child is gone, once it is: its exit code and last words."""
        self.close()
        said = f"the tokenizer's process ended (exit code {self.process.returncode})"
        stderr = self.process.stderr
        tail = stderr.read()[-_ERROR_TAIL:].decode(errors="replace") if stderr else ""
        if stderr is not None:
            stderr.close()
        return f"{said}: {tail}" if tail.strip() else said

    def close(self) -> None:
        """Close its input (it ends), and kill it if it has not within a few seconds."""
        process = self.process
        if process.stdin is not None and not process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        try:
            process.wait(_CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


_children: dict[ModelSpec, _Child] = {}
_children_lock = threading.Lock()
#: The thread that waits on the children's answers, out of the way of the loop's own executor.
_exchanges = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfembed:tokenizer")


def _ask(spec: ModelSpec, request: object) -> tuple[str, Any]:
    """``request`` answered by the child of ``spec``, started if need be (on a worker thread).
    A child found dead is forgotten, so that a later job may start another. Raises _ChildGone."""
    with _children_lock:
        child = _children.get(spec)
        if child is None or child.pid != os.getpid():
            child = _children[spec] = _Child(spec)
    try:
        return child.ask(request)
    except _ChildGone:
        with _children_lock:
            if _children.get(spec) is child:
                del _children[spec]
        raise


@atexit.register
def close_children() -> None:
    """End every child this process started (they would end anyway when it exits)."""
    with _children_lock:
        children = [c for c in _children.values() if c.pid == os.getpid()]
        _children.clear()
    for child in children:
        with child.lock:
            child.close()
        if child.process.stderr is not None:
            child.process.stderr.close()


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
