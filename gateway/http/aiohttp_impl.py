"""The aiohttp front end (`--http aiohttp`): aiohttp's low-level `web.Server`.

One handler, no router, no middleware, because every request takes the same
path. `gateway.guard` adds the request-head timeout and the connection limit,
and, for batched with `--batch-ack flush`, wraps each transport in a
`HeldTransport` so responses can be held until their flush settles. Kept beside
the own front end as the comparison: it is the well-known library's cost per
request.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import hdrs, web

from ..guard import GuardedServer
from ..pipeline import Response
from . import BACKLOG, FrontEnd, listen_error
from .rules import MAX_HEAD, MAX_HEADERS, refusal, version_refusal

# The combined log format, with the TCP peer as the client address; aiohttp's byte
# count (%b) includes the response headers.
COMBINED_LOG_FORMAT = '%a - - %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"'


class AiohttpFrontEnd(FrontEnd):
    name = "aiohttp"

    def __init__(self, pipeline: Any, config: Any) -> None:
        super().__init__(pipeline, config)
        c = config
        self._use_xff = pipeline.uses_forwarded_for
        self._hold = pipeline.holds
        # Access logging is off by default: a log line per request costs more than the accounting.
        log_kwargs: dict[str, Any] = {"access_log": None}
        if c.access_log == "combined":
            log_kwargs = {"access_log": logging.getLogger("gateway.access"), "access_log_format": COMBINED_LOG_FORMAT}
        self.server = GuardedServer(
            self.handle,
            request_timeout=c.request_timeout_s,
            max_connections=c.max_connections,
            keepalive_timeout=c.keepalive_timeout_s,
            hold_responses=self._hold,
            **log_kwargs,
        )
        self._runner = web.ServerRunner(self.server, handle_signals=False, shutdown_timeout=c.shutdown_timeout_s)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        refused = self._refusal(request)
        if refused is not None:
            resp = web.Response(status=refused[0], text=refused[1] + "\n")
            resp.force_close()
            return resp
        # X-Forwarded-For's values, each occurrence as sent: the resolver walks them without a join.
        xff = request.headers.getall("X-Forwarded-For", None) if self._use_xff else None
        holder = request.transport if self._hold else None
        answer = self.pipeline.handle(request.path, request.remote, xff, holder)  # type: ignore[arg-type]
        if type(answer) is not Response:
            answer = await answer  # type: ignore[misc]
        assert isinstance(answer, Response)
        return web.Response(status=answer.status, headers=answer.headers or None, body=answer.body or None)

    @staticmethod
    def _refusal(request: web.BaseRequest) -> tuple[int, str] | None:
        """The checks aiohttp's parser leaves to the server, as the own front end makes them."""
        version = request.version
        if version.major != 1 or version.minor > 1:
            return version_refusal(version.major, version.minor)
        raw = request.raw_headers
        if len(raw) > MAX_HEADERS:
            return 431, "too many header fields"
        # The raw request target (absolute form included): aiohttp keeps it only on the parsed
        # message, whose public accessor is deprecated.
        target = request._message.path
        if len(target) + sum(len(k) + len(v) + 4 for k, v in raw) > MAX_HEAD:
            return 431, "request head too large"
        headers = request.headers
        upgrade = headers.get(hdrs.UPGRADE)
        te = headers.get(hdrs.TRANSFER_ENCODING)
        if target[:1] == "/" and "#" not in target and upgrade is None and te is None:
            return None
        return refusal(target, headers.get(hdrs.HOST), upgrade, hdrs.SEC_WEBSOCKET_KEY in headers, te)

    async def start(self, where: tuple[str, int] | str, reuse_port: bool = False) -> None:
        await self._runner.setup()
        site: web.BaseSite
        if isinstance(where, str):
            site = web.UnixSite(self._runner, where)
        else:
            site = web.TCPSite(self._runner, where[0], where[1], backlog=BACKLOG, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise listen_error(where, exc) from exc

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(a[0], a[1]) for a in self._runner.addresses if isinstance(a, tuple)]

    async def stop(self) -> None:
        await self._runner.cleanup()

    def stats(self) -> dict[str, Any]:
        return self.server.stats()
