"""Connection guards for the HTTP front end: a request-head timeout and a connection limit.

aiohttp's low-level server keeps a connection with an incomplete request head
until its keep-alive timeout, so a client trickling header bytes (slowloris)
holds a connection for as long as that timeout allows. This module owns two
limits on top of aiohttp, and nothing else:

- a request head must be complete within `request_timeout` of its first byte
  (or of the connection opening, for the first request); otherwise the client
  gets `408` and the connection is closed. Bytes of a request's body are not the
  start of a head and start no timer;
- at most `max_connections` client connections are open; a connection beyond
  that gets `503` and is closed at once.

With `hold_responses`, each connection's transport is a `HeldTransport`, so a
response can be held until the Redis flush holding its increment is confirmed
(`gateway.holding`).

The fast path costs one integer comparison per read: a timer is armed only
when a read ends with a request head still incomplete.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .holding import HeldTransport

_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_BUSY_RESPONSE = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class GuardedServer(web.Server):
    def __init__(
        self,
        handler: Any,
        *,
        request_timeout: float,
        max_connections: int,
        hold_responses: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.hold_responses = hold_responses
        self.head_timeouts = 0
        self.rejected = 0

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)

    def stats(self) -> dict[str, int]:
        return {
            "open": len(self.connections),
            "max": self.max_connections,
            "head_timeouts": self.head_timeouts,
            "rejected": self.rejected,
        }


class _GuardedHandler(RequestHandler):
    # The attributes below are this subclass's own; aiohttp's are left alone.
    _guard: GuardedServer
    _head_since: float | None
    _head_timer: asyncio.TimerHandle | None
    _seen_requests: int
    _body: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard = self._manager  # type: ignore[assignment]
        self._head_timer = None
        self._seen_requests = 0
        self._body = None
        if self._guard.hold_responses:
            transport = HeldTransport(transport)  # type: ignore[arg-type]
        super().connection_made(transport)
        if len(self._guard.connections) > self._guard.max_connections:
            self._guard.rejected += 1
            transport.write(_BUSY_RESPONSE)  # type: ignore[attr-defined]
            self.force_close()
            return
        self._head_since = self._loop.time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        body = self._body
        # Bytes that continue the body of the last request parsed are not the start of a head.
        in_body = body is not None and not body.is_eof()
        super().data_received(data)
        count = self._request_count
        if count != self._seen_requests:
            # A head completed in this read. Bytes after it start the next head;
            # they are timed from the next read that leaves a head incomplete.
            self._seen_requests = count
            self._head_since = None
            self._body = self._messages[-1][1] if self._messages else None
        elif self._head_since is None and data and not in_body:
            self._head_since = self._loop.time()
            self._arm()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # A malformed request is the client's error, answered with a 4xx: a traceback per bad
        # request would let any client flood the log. Real handler errors are still logged.
        if isinstance(kw.get("exc_info"), HttpProcessingError):
            self.logger.debug(*args, **kw)
        else:
            super().log_exception(*args, **kw)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's contract: True keeps writing open
        if self._waiter is not None and not self._waiter.done() and not self._messages:
            # Idle between requests: nothing is owed, so the connection ends here.
            self.force_close()
            return False
        # A half-closed client still gets the answer to the request in progress: keep the
        # transport open for writing and close once it is written.
        body = self._body
        if body is not None and not body.is_eof():
            # The rest of its body can no longer come. Without the end of the body, aiohttp
            # would keep reading it after the answer for its lingering time (10 s), and a
            # drain would wait that long for this connection.
            body.feed_eof()
        self.close()
        return True

    def _arm(self) -> None:
        if self._head_timer is None and self._head_since is not None:
            self._head_timer = self._loop.call_at(self._head_since + self._guard.request_timeout, self._check)

    def _check(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None or self.transport is None:
            return
        if self._loop.time() - since >= self._guard.request_timeout:
            self._guard.head_timeouts += 1
            self.transport.write(_TIMEOUT_RESPONSE)
            self.force_close()
        else:
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)
