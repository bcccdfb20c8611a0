"""The local server's HTTP answers: headers, error bodies, and the faults' answers."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
import uuid
from typing import cast

from aiohttp import web

from .bodies import broken_body
from .calls import batch_size
from .errors import JSON, REDIRECT_TO, STATIC, batch_too_large
from .faults import FaultPlan
from .settings import TRACE_HEADER, ServerConfig, ServerStats


class Answers:
    """The server's HTTP answers: headers (trace id, Retry-After), the provider's error bodies,
    and the faults' answers (a reset, a trickle, a body that never ends, a broken 200)."""

    __slots__ = ("_config", "_plan", "_stats")

    def __init__(self, config: ServerConfig, stats: ServerStats, plan: FaultPlan) -> None:
        self._config = config
        self._stats = stats
        self._plan = plan

    async def fault(self, kind: str, request: web.BaseRequest, raw: bytes) -> web.StreamResponse:
        if kind in STATIC:
            status, body, content_type = STATIC[kind]
            self.count_refusal(kind)
            return self.answer(status, body, content_type, kind)
        if kind == "reset":
            return await self.reset(request)
        if kind == "endless":
            return await self.endless(request)
        if kind == "413":
            reject = batch_too_large(batch_size(raw), self._config.max_batch_items)
            return self.answer(413, reject.body)
        return self.answer(200, broken_body(kind, raw))

    def count_refusal(self, kind: str) -> None:
        if kind in ("429-tpm", "429-hour", "429-date"):
            self._stats.rate_limited_tpm += 1
        elif kind == "429-rpm":
            self._stats.rate_limited_rpm += 1

    async def trickle(self, request: web.BaseRequest, answer: web.Response) -> web.StreamResponse:
        """``answer`` one byte at a time, until done or the client leaves."""
        response = web.StreamResponse(status=answer.status, headers=answer.headers)
        body = bytes(cast(bytes, answer.body))
        response.content_length = len(body)
        await response.prepare(request)
        for offset in range(len(body)):
            if request.transport is None or request.transport.is_closing():
                break  # the client gave up: the answer is never completed
            await response.write(body[offset : offset + 1])
            await asyncio.sleep(self._plan.faults.trickle_s)
        return response

    async def endless(self, request: web.BaseRequest) -> web.StreamResponse:
        """A 200 whose body never ends (up to 256 MiB), until the client leaves."""
        response = web.StreamResponse(headers=self.headers(200, JSON))
        await response.prepare(request)
        await response.write(b'{"object":"list","data":[')
        blanks = b" " * (1 << 20)
        for _ in range(256):
            if request.transport is None or request.transport.is_closing():
                break
            try:
                await response.write(blanks)
            except ConnectionError:
                break
        return response

    async def reset(self, request: web.BaseRequest) -> web.StreamResponse:
        """Headers and a part of the body, then an aborted connection: the client must see an
        error, not a short answer."""
        self._stats.resets += 1
        response = web.StreamResponse(headers=self.headers(200, JSON))
        response.content_length = 4096
        await response.prepare(request)
        await response.write(b'{"object":"list","data":[{"object":"embedding","embedding":')
        if request.transport is not None:
            request.transport.abort()
        return response

    def headers(self, status: int, content_type: str, kind: str = "") -> dict[str, str]:
        headers = {"Content-Type": content_type, TRACE_HEADER: uuid.uuid4().hex}
        if kind == "redirect":
            headers["Location"] = REDIRECT_TO
        elif kind == "429-hour":
            headers["Retry-After"] = "3600"
        elif kind == "429-date":
            headers["Retry-After"] = email.utils.formatdate(time.time() + 3600, usegmt=True)
        wait_s = self._plan.faults.retry_after_s
        if wait_s is not None and status in (429, 503):
            headers["Retry-After"] = str(math.ceil(wait_s))  # the header takes whole seconds
            headers["retry-after-ms"] = str(round(wait_s * 1000))
        return headers

    def answer(
        self, status: int, body: bytes, content_type: str = JSON, kind: str = ""
    ) -> web.Response:
        headers = self.headers(status, content_type, kind)
        return web.Response(status=status, body=body, headers=headers)
