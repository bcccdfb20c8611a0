"""The local server: its lifecycle (start, stop, restart on the same port) and the flow of a
request through faults, authorisation, parsing, quota and answer."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .answers import Answers
from .bodies import altered_body, success_body
from .calls import parse_call
from .errors import NOT_FOUND, OVER_RPM, OVER_TPM, TEXT, Reject
from .faults import ALTERED, ANSWERED, FaultPlan
from .quota import Quota
from .settings import Faults, ServerConfig, ServerStats

_PATH = "/v1/embeddings"
_SHUTDOWN_S = 0.1  # stop() is a crash, not a drain: in-flight handlers get this long, then cancel


class _Server(web.Server):
    """aiohttp's low-level server, remembering every connection it makes so that a stop can
    close them all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handlers: set[RequestHandler] = set()

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        self._handlers.add(handler)
        return handler

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._handlers.discard(handler)
        super().connection_lost(handler, exc)

    def close_all(self) -> None:
        for handler in list(self._handlers):
            handler.force_close()
        self._handlers.clear()


class LocalServer:
    """A SiliconFlow-compatible server on real HTTP; an async context manager (start/stop).

    ``url`` is the base URL to give a client (``http://127.0.0.1:PORT/v1``); ``stats`` counts what
    happened. Faults can be changed while running with :meth:`set_faults` and scripted per request
    with :meth:`inject`.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.stats = ServerStats()
        self._plan = FaultPlan(self.config.faults)
        self._quota = Quota(self.config, self.stats)
        self._answers = Answers(self.config, self.stats, self._plan)
        self._in_flight = 0
        self._runner: web.ServerRunner | None = None
        self._port: int | None = None  # the bound port, kept so restart() comes back on it

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The base URL, ``http://HOST:PORT/v1``. Raises RuntimeError before the first start."""
        if self._port is None:
            raise RuntimeError("the server has not been started")
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self._port}/v1"

    @property
    def faults(self) -> Faults:
        """The faults in force."""
        return self._plan.faults

    async def start(self) -> str:
        """Listen (on the port of an earlier start, if any) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        runner = web.ServerRunner(
            _Server(self._handle, access_log=None), shutdown_timeout=_SHUTDOWN_S
        )
        await runner.setup()
        port = self.config.port if self._port is None else self._port
        try:
            await web.TCPSite(runner, self.config.host, port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        """Close the port and every connection; requests still in flight are dropped."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        server = runner.server
        await runner.cleanup()
        # aiohttp's shutdown closes only the connections it knew when it began; one accepted
        # meanwhile would stay open until collected (a ResourceWarning). Close every one made.
        if isinstance(server, _Server):
            server.close_all()
        await asyncio.sleep(0)  # closing completes on the next turn of the loop

    async def restart(self) -> None:
        """Stop, then start again on the same port (a crash a retrying client can survive)."""
        await self.stop()
        await self.start()

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults in force; the random draws restart from ``faults.seed``."""
        self._plan.replace(faults)

    def inject(self, kind: str, count: int = 1) -> None:
        """Give the next ``count`` requests to /v1/embeddings the outcome ``kind``, in order.

        Kinds: ``400`` (code 20015), ``model`` (400, code 20012), ``401``, ``403``, ``404``,
        ``413``, ``429-tpm``, ``429-rpm``, ``503``, ``504``, ``reset``, ``stall`` (then a normal
        answer), ``bad-json`` (200 with truncated JSON), ``no-data`` (200 JSON without ``data``).

        Gateways and proxies: ``405``; ``redirect`` (301 to another host); ``html-502`` and
        ``html-200`` (an HTML error page); ``error-200`` (a 503's error JSON with status 200);
        ``429-hour`` and ``429-date`` (a 429 asking to wait an hour, in seconds or as an HTTP
        date); ``gzip`` (a normal answer, gzip-encoded); ``trickle`` (a normal answer sent one
        byte every ``Faults.trickle_s`` seconds); ``endless`` (a 200 whose body never ends); ``bom``
        (a normal answer after a UTF-8 byte-order mark).

        A valid request answered with a damaged success body: ``no-usage``, ``negative-usage``,
        ``huge-usage`` (a million tokens per item), ``zero-usage``, ``tiny-usage`` (one
        token per item); ``nan`` and ``inf`` in the
        first vector (``null`` and ``1e39`` in a float answer, as JSON has neither);
        ``string-floats`` and ``bool-floats`` (a float vector holding strings or booleans);
        ``missing-item``, ``extra-item``, ``duplicate-index`` (two vectors share an index; a
        lone one gets index 1), ``wrong-dims`` (the first vector one value short) and
        ``other-model`` (right vectors, named as another model's).
        """
        self._plan.inject(kind, count)

    # --- request handling ---

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.stats.requests += 1
        self._in_flight += 1
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, self._in_flight)
        try:
            response = await self._respond(request)
            if not response.prepared:  # a reset (prepared, then aborted) is no answer
                # Latency follows the decision, so admission and rate limits act at arrival
                # time; the answer counts only after it, as a stop may still drop the request.
                if self._plan.faults.latency_s > 0:
                    await asyncio.sleep(self._plan.faults.latency_s)
                self.stats.by_status[response.status] += 1
            return response
        finally:
            self._in_flight -= 1

    async def _respond(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "POST" or request.path != _PATH:
            return self._answers.answer(404, NOT_FOUND, TEXT)
        if self.stats.first_request_at is None:
            self.stats.first_request_at = time.monotonic()
        raw = await request.content.read()  # not request.read(): no 1 MiB cap for image inputs
        injected = self._plan.injected()
        if injected is not None and injected not in ANSWERED:
            return await self._answers.fault(injected, request, raw)
        if not self._authorized(request.headers.get("Authorization", "")):
            return self._answers.answer(401, b'"Invalid token"')
        fault = injected or self._plan.draw(self._in_flight)
        if fault is not None and fault not in ANSWERED:
            return await self._answers.fault(fault, request, raw)
        response = await self._embed(raw, fault)
        if fault == "trickle" and response.status == 200:
            return await self._answers.trickle(request, response)
        return response

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return self.config.api_key is None or token == self.config.api_key

    async def _embed(self, raw: bytes, fault: str | None = None) -> web.Response:
        try:
            call = parse_call(raw, self.config)
        except Reject as reject:
            return self._answers.answer(reject.status, reject.body)
        limit = self._quota.refusal(call)
        if limit is not None:
            self._answers.count_refusal(f"429-{limit.lower()}")
            return self._answers.answer(429, OVER_TPM if limit == "TPM" else OVER_RPM)
        if fault == "stall":  # counted at arrival, as a limit acts at arrival, then held
            self.stats.stalls += 1
            await asyncio.sleep(self._plan.faults.stall_s)
        # The model's time, after admission: a limit acts at arrival, as the provider's does.
        work_s = self._plan.work_s(call.tokens)
        if work_s > 0:
            await asyncio.sleep(work_s)
        if fault in ALTERED:
            return self._answers.answer(200, altered_body(call, fault))
        response = self._answers.answer(200, success_body(call))
        if fault == "gzip":
            response.body = gzip.compress(cast(bytes, response.body))
            response.headers["Content-Encoding"] = "gzip"
        elif fault == "bom":
            response.body = b"\xef\xbb\xbf" + cast(bytes, response.body)
        return response


async def serve(config: ServerConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Run a :class:`LocalServer` until cancelled; ``on_ready(url)`` is called once listening."""
    async with LocalServer(config) as server:
        if on_ready is not None:
            on_ready(server.url)
        await asyncio.Event().wait()
