"""The own HTTP/1.1 front end (`--http httptools`, the default): an asyncio protocol over llhttp.

llhttp (through httptools, the parser uvicorn uses) does the framing and rejects
the request-smuggling shapes: Content-Length together with Transfer-Encoding,
differing or repeated Content-Lengths, a Transfer-Encoding whose last coding is
not chunked, invalid characters, obsolete line folding. This module owns the
rest of a server's duties, per connection:

- requests are answered in order, pipelined or not; a request is handed to the
  request path (`Pipeline.handle`) once it is complete, body included (bodies
  are read and discarded up to `--max-body-bytes`, else 413);
- keep-alive as the request asks (HTTP/1.0 closes unless it asks for keep-alive),
  `Expect: 100-continue`, HEAD (no body), absolute-form targets;
- limits: the request target (414), one header field and the whole head (431),
  the header count (431), a missing or repeated Host (400); a malformed request
  gets its 4xx after the responses before it and the connection is closed;
- timeouts, from a clock the server ticks (no timer per request): a request head
  must complete within `--request-timeout-s` of its first byte, a body may not
  stall longer than that between reads (408 either way); an idle keep-alive
  connection is closed after `--keepalive-timeout-s`;
- `--max-connections` (503 and close beyond it) and the graceful drain;
- a lingering close when the connection ends with more of the client's input on its way (a
  request refused before its end, an upgrade, an upstream that answered before the body was
  sent): the write side closes first and the rest is read and dropped, so the kernel does not
  reset the connection, and lose the answer, before the client has read it (RFC 9112 9.6);
- backpressure: reading pauses while the socket's write buffer is above its
  high-water mark, while too many responses wait in order, or while too many
  held bytes wait for a flush;
- held responses (batched, `--batch-ack flush`): the connection is the holder; its
  response bytes stay here, in order, until the flush holding the increments
  settles (`release`). A client that leaves meanwhile is still counted.

The hot path is one callback per parser event and no task, future or timer for
a request that is answered at once; a request that waits for Redis costs the
future it waits on (and a task only for a backend that needs one). Answers are
written at the end of the loop iteration, with the other connections'
(`gateway.outbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools

from ..holding import Commit
from ..outbox import WRITE_NOW, Deferred, Outbox, outbox
from ..pipeline import Pending, Response, request_path
from . import BACKLOG, FrontEnd, listen_error
from .rules import MAX_FIELD, MAX_HEAD, MAX_HEADERS, MAX_TARGET, refusal, version_refusal

access_log = logging.getLogger("gateway.access")

# Responses waiting in order (pipelining) before reading pauses, and responses held
# (batched) before reading pauses until the flush settles. Held responses are the gateway's
# own (a redirect, a 200, an error), each a few hundred bytes: a count bounds their bytes.
MAX_QUEUED = 64
MAX_HELD = 1024
# A read larger than this is parsed in slices of it, checking those bounds in between.
SLICE = 4096
# A lingering close (see `_Connection._close`) reads and drops the client's input for at most
# this long (and no longer than the request timeout) and this many bytes, then closes.
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024 * 1024

# Header fields the front end reads, by name as sent most often and in lower case.
(
    _HOST,
    _XFF,
    _CONTENT_LENGTH,
    _TRANSFER_ENCODING,
    _EXPECT,
    _UPGRADE,
    _WEBSOCKET_KEY,
    _REFERER,
    _USER_AGENT,
    _CONNECTION,
    _PROXY_CONNECTION,
) = range(11)
_FIELDS = {
    name: kind
    for lower, kind in {
        b"host": _HOST,
        b"x-forwarded-for": _XFF,
        b"content-length": _CONTENT_LENGTH,
        b"transfer-encoding": _TRANSFER_ENCODING,
        b"expect": _EXPECT,
        b"upgrade": _UPGRADE,
        b"sec-websocket-key": _WEBSOCKET_KEY,
        b"referer": _REFERER,
        b"user-agent": _USER_AGENT,
        b"connection": _CONNECTION,
        # Read for nothing but `rare`: llhttp takes its keep-alive for Connection's (see
        # on_headers_complete).
        b"proxy-connection": _PROXY_CONNECTION,
    }.items()
    for name in (lower, lower.title(), lower.upper())
}

# What the connection is doing, for its timeouts.
IDLE, HEAD, BODY = 0, 1, 2

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = frozenset((204, 304))


def _plain(status: int, reason: str = "") -> bytes:
    """A complete error response that closes the connection."""
    phrase = HTTPStatus(status).phrase
    body = f"{reason or phrase}\n".encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _quoted(field: bytes) -> bytes:
    """A client's text as it may appear inside a quoted access-log field."""
    if b'"' in field or b"\\" in field:
        field = field.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return field


_INTERNAL_ERROR = Response(500, "Internal Server Error", (), b"internal error\n")


class _Reject(Exception):
    """Raised from a parser callback: answer `status` and close."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


class _Stop(Exception):
    """Raised from a parser callback: ignore the rest of the input (the connection is closing)."""


def closing(data: bytes) -> bytes:
    """A response this gateway wrote (head first, at most one Connection field, its own), made
    to end its connection: its Connection field says close (RFC 9112 9.6)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data  # not a whole head: nothing to rewrite
    head = data[: end + 2]
    if b"\r\nConnection: close\r\n" in head:
        return data
    head = head.replace(b"\r\nConnection: keep-alive\r\n", b"\r\n")
    return head + b"Connection: close\r\n" + data[end + 2 :]


class _Slot:
    """A response waiting its turn: requests on one connection are answered in order.

    It also runs the request path's coroutine when the backend needs no task of its own
    (`Backend.task_free`): each step is resumed straight from the done callback of the
    future it waits on, which spares a Task and two loop callbacks per request.
    """

    __slots__ = ("close", "conn", "coro", "data", "info", "variant")

    def __init__(self, conn: _Connection, data: bytes | None, close: bool) -> None:
        self.conn = conn
        self.data = data
        self.close = close
        self.variant = 0
        self.info: tuple[bytes, bytes, bool, bytes, bytes] | None = None
        self.coro: Coroutine[Any, Any, Response] | None = None

    def __call__(self, task: asyncio.Task[Response]) -> None:
        """The request path's task finished: encode its answer and send what is ready."""
        try:
            answer = task.result()
        except BaseException as exc:  # the request path catches errors; this is a last resort
            self.conn._settled(self, None, exc)
        else:
            self.conn._settled(self, answer, None)

    def answered(self, answer: Response) -> None:
        """The request path's answer, from a `Pending` (its reply came)."""
        self.conn._settled(self, answer, None)

    def step(self, _: object = None) -> None:
        """Run the coroutine to its next wait (a future), or to its end."""
        coro = self.coro
        assert coro is not None
        try:
            waited = coro.send(None)
        except StopIteration as stop:
            self.coro = None
            self.conn._settled(self, stop.value, None)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self.coro = None
            self.conn._settled(self, None, exc)
            return
        self.wait(waited)

    def wait(self, waited: Any) -> None:
        """Resume the coroutine once what it yielded is done."""
        if waited is None:  # a bare yield (asyncio.sleep(0)): go on in the next loop turn
            loop = self.conn.server.loop
            assert loop is not None
            loop.call_soon(self.step)
        else:
            waited._asyncio_future_blocking = False  # what a Task does with the future it is given
            waited.add_done_callback(self.step)


class HttpToolsFrontEnd(FrontEnd):
    name = "httptools"

    def __init__(self, pipeline: Any, config: Any) -> None:
        super().__init__(pipeline, config)
        c = config
        self.request_timeout = c.request_timeout_s
        self.keepalive_timeout = c.keepalive_timeout_s
        self.max_connections = c.max_connections
        self.max_body = c.max_body_bytes
        self.access_log = c.access_log == "combined"
        self.target = c.target
        self.target_bytes = c.target.encode()
        self.connections: set[_Connection] = set()
        self.servers: list[asyncio.Server] = []
        self.head_timeouts = 0
        self.rejected = 0
        self.bad_requests = 0
        self.draining = False
        # The clock every connection's timeouts read: ticked, not called per request.
        # Timeouts then fire within one tick of their nominal time.
        self.tick = min(1.0, max(0.02, min(self.request_timeout, self.keepalive_timeout) / 5))
        self.now = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None
        # Where connections defer their writes to: the loop's outbox once started (start).
        self.outbox: Outbox = WRITE_NOW
        self._shared = (pipeline.redirect, pipeline.target_ok, pipeline.denied)
        self._ticker: asyncio.TimerHandle | None = None
        self._date = b""
        self._date_second = -1
        # The shared responses' bytes, per variant (see encode); rebuilt when the Date changes.
        self.wire: dict[Response, list[bytes | None]] = {}
        # Request targets seen often -> their paths.
        self.paths: dict[bytes, str] = {}
        self._update_date()

    # -- listening -------------------------------------------------------------

    async def start(self, where: tuple[str, int] | str, reuse_port: bool = False) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self.outbox = outbox(loop)
        self.now = loop.time()
        try:
            if isinstance(where, str):
                server = await loop.create_unix_server(self._connection, where, backlog=BACKLOG)
            else:
                server = await loop.create_server(
                    self._connection, where[0], where[1], backlog=BACKLOG, reuse_port=reuse_port or None
                )
        except OSError as exc:
            raise listen_error(where, exc) from exc
        self.servers.append(server)
        if self._ticker is None:
            self._ticker = loop.call_later(self.tick, self._on_tick)

    def _connection(self) -> _Connection:
        if self.pipeline.proxy is not None:
            from .httptools_proxy import ProxyConnection  # the proxy action's client side

            return ProxyConnection(self)
        return _Connection(self)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self.servers:
            for sock in cast(Any, server).sockets:  # a list under uvloop, a tuple in the stubs
                name = sock.getsockname()
                if isinstance(name, tuple):
                    out.append((name[0], name[1]))
        return out

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close idle connections; cut the rest
        after the shutdown timeout."""
        self.draining = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.drain()
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers.clear()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def stats(self) -> dict[str, Any]:
        return {
            "open": len(self.connections),
            "max": self.max_connections,
            "head_timeouts": self.head_timeouts,
            "rejected": self.rejected,
            "bad_requests": self.bad_requests,
        }

    # -- the clock ---------------------------------------------------------------

    def _on_tick(self) -> None:
        assert self.loop is not None
        now = self.now = self.loop.time()
        self._update_date()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        self._ticker = self.loop.call_later(self.tick, self._on_tick)

    def _update_date(self) -> None:
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self._date = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
            self.wire = {r: [None] * 8 for r in self._shared}

    # -- encoding ----------------------------------------------------------------

    def encode(self, response: Response, variant: int) -> bytes:
        """Bytes of `response`. `variant`: 1 keep-alive (else close), 2 HTTP/1.0 keep-alive, 4 HEAD.
        The shared responses' bytes are kept per variant until the Date changes."""
        entry = self.wire.get(response)
        if entry is None:
            return self._encode(response, variant)
        data = entry[variant]
        if data is None:
            data = entry[variant] = self._encode(response, variant)
        return data

    def path_of(self, url: bytes) -> str:
        path = request_path(url.decode("latin-1"))
        if len(self.paths) >= 1024:
            self.paths.clear()  # a cache of the targets seen lately, not of every target ever seen
        self.paths[url] = path
        return path

    def _encode(self, response: Response, variant: int) -> bytes:
        lines = [f"HTTP/1.1 {response.status} {response.reason}\r\n".encode(), self._date]
        for name, value in response.headers:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if response.status not in _NO_BODY_STATUS:
            lines.append(b"Content-Length: %d\r\n" % len(response.body))
        if not variant & 1:
            lines.append(b"Connection: close\r\n")
        elif variant & 2:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        if not variant & 4:
            lines.append(response.body)
        return b"".join(lines)


class _Connection(Deferred, asyncio.Protocol):
    """One client connection: parser callbacks, the response order, holding, timeouts."""

    # Slots, not an instance dict: a connection has more fields than Python 3.11 keeps in an
    # instance's compact (shared-key) layout, and past that every field read and store of the
    # parser callbacks, which run for every request, takes the slow generic path.
    __slots__ = (
        "abort_at", "backlog", "body_bytes", "chunked", "chunks", "close_when_released", "closing", "commit",
        "connection", "content_length", "ended", "expect", "fields", "framing", "head_bytes", "head_size",
        "headers", "held", "host", "hosts", "http10", "linger", "linger_until", "lingered", "parser",
        "paused_since", "peer",
        "phase", "pipeline", "queue", "rare", "read_paused", "referer", "resume_scheduled", "served", "server",
        "since", "transfer_encoding", "upgrade", "url", "user_agent", "waiting", "websocket_key",
        "write_paused", "xff",
    )  # fmt: skip

    def __init__(self, server: HttpToolsFrontEnd) -> None:
        self.server = server
        self.pipeline = server.pipeline
        self.transport: asyncio.Transport | None = None
        # Responses are written at the end of the loop iteration, together (gateway.outbox).
        self.outbox = server.outbox
        self.out: list[bytes] | None = None
        self.out_bytes = 0
        self.shut = False  # the write side is closed (a lingering close)
        self.parser = httptools.HttpRequestParser(self)
        self.peer: str | None = None
        # The head's fields, in order, for a front end that passes the head on (None: not kept).
        self.fields: list[tuple[bytes, bytes]] | None = None
        self.phase = IDLE
        self.since = server.now
        self.served = False  # a request was answered: the idle timeout is the keep-alive one
        self.closing = False  # answer what is queued, then close; ignore further requests
        # The request being parsed.
        self.url = b""
        self.xff: list[bytes] | None = None
        self.headers = 0
        self.hosts = 0
        self.head_bytes = 0  # bytes read while a head is incomplete (what the parser may buffer)
        self.head_size = 0  # the size of the header fields parsed
        self.body_bytes = 0
        self.expect: bytes | None = None
        self.content_length = -1
        self.chunked = False
        self.http10 = False
        self.rare = False  # the request set a field or took a turn the common case does not
        # Rare header fields that call for the checks in gateway.http.rules.
        self.host: bytes | None = None
        self.upgrade: bytes | None = None
        self.websocket_key = False
        self.transfer_encoding: bytes | None = None
        self.referer = b""
        self.user_agent = b""
        # Responses waiting for an earlier one (pipelining with a request waiting for Redis).
        self.queue: deque[_Slot] | None = None
        self.waiting = 0  # requests whose response is not written yet (or held)
        # Held responses (batched, --batch-ack flush).
        self.commit: Commit | None = None
        self.held: list[bytes] = []
        self.close_when_released = False
        # Why reading is paused: the socket's buffer, the order queue, held bytes.
        self.write_paused = False
        self.read_paused = False
        self.paused_since = 0.0
        # Input not parsed yet because the answers owed reached their bound.
        self.backlog: bytes | None = None
        self.resume_scheduled = False
        # Body-phase bytes read and chunks seen, to bound chunk framing and trailer fields.
        self.framing = 0
        self.chunks = 0
        self.connection: bytes | None = None
        self.abort_at = 0.0
        # The close is to linger: the client may still be sending (see _close). Once lingering
        # (`shut`), until when, and the bytes dropped so far.
        self.linger = False
        self.linger_until = 0.0
        self.lingered = 0
        self.ended = False  # the client ended its side (EOF): nothing more will come

    # -- connection events ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        server = self.server
        if len(server.connections) >= server.max_connections or server.draining:
            server.rejected += 1
            transport.write(_plain(503, "too many connections"))
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and peer:
            self.peer = str(peer[0])
        elif isinstance(transport.get_extra_info("sockname"), tuple):
            # A TCP connection without a peer was reset before it was accepted: nobody to answer,
            # and nothing to count its requests under.
            transport.abort()
            return
        server.connections.add(self)
        self.since = server.now

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.out = None
        self.held.clear()
        self.queue = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            # A request asked to close, or a malformed one was answered: nothing more is parsed.
            if self.shut:
                self.lingered += len(data)
                if self.lingered > LINGER_BYTES and self.transport is not None:
                    self.transport.close()
            return
        if self.backlog is not None:
            self.backlog += data  # reading was paused while a read was on its way
            return
        if len(data) <= SLICE:
            self._feed(data)
            return
        # A read with many pipelined requests is parsed a slice at a time, so that when the
        # answers owed reach their bound the rest waits here, unparsed, with reading paused.
        view = memoryview(data)
        for start in range(0, len(data), SLICE):
            if self.closing:
                return
            if self._saturated():
                self.backlog = bytes(view[start:])
                self._update_reading()
                return
            self._feed(view[start : start + SLICE])

    def _saturated(self) -> bool:
        return (self.queue is not None and len(self.queue) >= MAX_QUEUED) or len(self.held) > MAX_HELD

    def _resume_input(self) -> None:
        """Parse what waited while the connection was saturated (called from the loop)."""
        self.resume_scheduled = False
        backlog = self.backlog
        if backlog is None or self.read_paused or self.transport is None or self.transport.is_closing():
            return
        self.backlog = None
        self.data_received(backlog)
        if self.ended and self.backlog is None:
            self._finish()  # the client's end came while this waited

    def _feed(self, data: bytes | memoryview) -> None:
        if self.phase == BODY:
            self.since = self.server.now
            # Chunk framing and trailer fields are not body: bound them like a head.
            self.framing += len(data)
        else:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status, cause.reason)
            elif not isinstance(cause, _Stop):
                raise
        except httptools.HttpParserUpgrade:
            # The request before the upgrade was answered as any other; the gateway speaks no other
            # protocol, so the connection ends after the answers (and the other protocol's bytes).
            self.linger = True
            self._finish()
        except httptools.HttpParserInvalidURLError:
            self._reject(400, "invalid request target")
        except httptools.HttpParserInvalidMethodError:
            self._reject(400, "invalid method")
        except httptools.HttpParserError as exc:
            self._reject(400, str(exc))
        if self.closing:
            return
        if self.phase == HEAD and self.head_bytes > MAX_HEAD:
            # Mostly target bytes so far: the request line is what is too long.
            self._reject(414 if len(self.url) * 2 > self.head_bytes else 431)
        elif self.phase == BODY and self.framing - self.body_bytes > MAX_HEAD + 32 * self.chunks:
            self._reject(431, "chunk framing or trailer fields too large")

    def eof_received(self) -> bool | None:
        self.ended = True  # the client sent all it will: a close has nothing to wait for
        if self.shut:
            if self.transport is not None:
                self.transport.close()  # the end of a lingering close
            return True
        # A half-closed client still gets the answers to the requests it completed, those waiting
        # unparsed in the backlog too (a pipeline past the answers owed): the connection then
        # finishes once the backlog is parsed (`_resume_input`).
        if self.backlog is None:
            self._finish()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.shut:
            return  # lingering reads on, whatever else is paused
        pause = self.write_paused or self._saturated()
        if pause != self.read_paused:
            self.read_paused = pause
            if pause:
                self.paused_since = self.server.now
                transport.pause_reading()
            else:
                transport.resume_reading()
                if self.backlog is not None and not self.resume_scheduled:
                    # Not from here: this may run inside a parser callback.
                    self.resume_scheduled = True
                    loop = self.server.loop
                    assert loop is not None
                    loop.call_soon(self._resume_input)

    # -- parser callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop
        self.phase = HEAD
        self.since = self.server.now
        self.url = b""
        self.host = None
        self.headers = self.hosts = self.head_size = 0
        if self.rare:
            # Fields only some requests set: reset only after one did.
            self.rare = False
            self.xff = self.expect = self.upgrade = self.transfer_encoding = None
            self.content_length = -1
            self.body_bytes = 0
            self.chunked = self.http10 = self.websocket_key = False
            self.referer = self.user_agent = b""
            self.connection = None
        if self.framing:
            self.framing = self.chunks = 0

    def on_url(self, url: bytes) -> None:
        if self.url:
            url = self.url + url
        if len(url) > MAX_TARGET:
            raise _Reject(414)
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase == BODY:
            return  # a trailer field (after a chunked body): never a request header, never counted
        self.headers += 1
        size = len(name) + len(value)
        self.head_size += size + 4
        if size > MAX_FIELD or self.head_size + len(self.url) > MAX_HEAD or self.headers > MAX_HEADERS:
            raise _Reject(431, "too many header fields" if self.headers > MAX_HEADERS else "request head too large")
        fields = self.fields
        if fields is not None:
            fields.append((name, value))  # kept for a front end that passes the head on (the proxy's)
        kind = _FIELDS.get(name)
        if kind is None:
            kind = _FIELDS.get(name.lower())
            if kind is None:
                return
        if kind == _HOST:
            self.hosts += 1
            self.host = value
            return
        self.rare = True
        if kind == _XFF:
            if self.xff is None:
                self.xff = [value]
            else:
                self.xff.append(value)
        elif kind == _CONTENT_LENGTH:
            self.content_length = int(value)  # llhttp has checked it is digits
        elif kind == _TRANSFER_ENCODING:
            self.chunked = True  # llhttp accepts it only with chunked last
            # Field lines make one list (RFC 9110 5.3): `gzip` then `chunked` on two lines is
            # `gzip, chunked`, refused as one line is, not forwarded as if only chunked.
            te = self.transfer_encoding
            self.transfer_encoding = value if te is None else te + b", " + value
        elif kind == _EXPECT:
            self.expect = value.lower()
        elif kind == _UPGRADE:
            self.upgrade = value
        elif kind == _WEBSOCKET_KEY:
            self.websocket_key = True
        elif kind == _REFERER:
            self.referer = value
        elif kind == _USER_AGENT:
            self.user_agent = value
        elif kind == _CONNECTION:
            self.connection = value

    def on_headers_complete(self) -> None:
        self.phase = BODY
        self.head_bytes = 0
        # HTTP/1.1 without asking for the version string (a tenth of the cost): of the versions
        # llhttp accepts (0.9, 1.0, 1.1, 2.0), it keeps a connection alive without a Connection
        # (or Proxy-Connection) field, which would make the request `rare`, only for 1.1.
        parser = self.parser
        if (self.rare or not parser.should_keep_alive()) and parser.get_http_version() != "1.1":
            self._not_http11()
        elif self.hosts != 1:
            raise _Reject(400, "a request needs exactly one Host header")
        url = self.url
        if self.rare or url[0] != 47 or 35 in url:  # not "/" first, or a "#"
            self._check_rare(url)

    def _not_http11(self) -> None:
        version = self.parser.get_http_version()
        if version != "1.0":
            major, _, minor = version.partition(".")
            raise _Reject(*(version_refusal(int(major), int(minor)) or (400, "")))
        if self.hosts > 1:
            raise _Reject(400, "a request needs at most one Host header")
        self.http10 = self.rare = True

    def _check_rare(self, url: bytes) -> None:
        """The checks only requests with uncommon fields or targets need."""
        self.since = self.server.now  # a body may follow: it must not stall
        if self.content_length > self.server.max_body:
            raise _Reject(413)
        refused = refusal(
            url.decode("latin-1"),
            self.host.decode("latin-1") if self.host is not None else None,
            self.upgrade.decode("latin-1") if self.upgrade is not None else None,
            self.websocket_key,
            self.transfer_encoding.decode("latin-1") if self.transfer_encoding is not None else None,
        )
        if refused is not None:
            raise _Reject(*refused)
        if self.expect is not None:
            if self.expect != b"100-continue":
                raise _Reject(417)
            if not self.http10 and (self.content_length > 0 or self.chunked):
                self._send_ready(_CONTINUE, False)

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.server.max_body:
            raise _Reject(413)

    def on_message_complete(self) -> None:
        self.phase = IDLE
        parser = self.parser
        server = self.server
        keep_alive = parser.should_keep_alive() and not server.draining
        method = parser.get_method()
        url = self.url
        path = server.paths.get(url)
        if path is None:
            path = server.path_of(url)
        xff = None
        info = None
        if method == b"HEAD":
            head = 4
        elif method == b"CONNECT":
            self.linger = True  # the client may send what it meant for the tunnel
            self._send_ready(_plain(405, "CONNECT is not supported"), True)
            self._finish()
            return
        else:
            head = 0
        if self.rare:
            if self.http10 and keep_alive and (self.chunked or b"close" in (self.connection or b"").lower()):
                # HTTP/1.0: a chunked body ends the connection (RFC 9112 6.1), and close wins over
                # keep-alive in one Connection field.
                keep_alive = False
            if self.xff is not None and self.pipeline.uses_forwarded_for:
                xff = [value.decode("latin-1") for value in self.xff]
            variant = (3 if self.http10 else 1) if keep_alive else 0
        else:
            variant = 1 if keep_alive else 0
        variant |= head
        if server.access_log:
            info = (method, url, self.http10, self.referer, self.user_agent)
        answer = self.pipeline.handle(path, self.peer, xff, self)
        waited = None
        pending = None
        if type(answer) is Pending:
            # Its reply will call us back (or came already: an increment that failed at once).
            if answer.response is not None:
                answer = answer.response
            else:
                pending = answer
        elif type(answer) is not Response and self.pipeline.task_free:
            # Run the request path up to its first wait now: it may not wait at all
            # (batched with --batch-ack none), and then the answer goes out like any other.
            try:
                waited = answer.send(None)  # type: ignore[union-attr]
            except StopIteration as stop:
                answer = stop.value
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                logging.getLogger("gateway").error("request path failed", exc_info=exc)
                answer = _INTERNAL_ERROR
                keep_alive = False
                variant &= 4
        if type(answer) is Response:
            # encode()'s cache lookup, inlined: this line runs for every request.
            entry = server.wire.get(answer)
            data = entry[variant] if entry is not None else None
            if data is None:
                data = server.encode(answer, variant)
            if info is not None:
                self._log(info, answer, len(data))
            if keep_alive and not self.queue and self.transport is not None:
                # The common cases: nothing before it waits, and nothing holds it or a flush does.
                if self.commit is None:
                    self.queue_write(data)
                    self.served = True
                    self.since = server.now
                else:
                    held = self.held
                    held.append(data)
                    if len(held) > MAX_HELD:
                        self._update_reading()
                return
            self._send_ready(data, not keep_alive)
        else:
            self.waiting += 1
            slot = _Slot(self, None, not keep_alive)
            slot.variant = variant
            slot.info = info
            queue = self.queue
            if queue is None:
                queue = self.queue = deque()
            queue.append(slot)
            if pending is not None:
                pending.notify = slot.answered
            elif self.pipeline.task_free:
                slot.coro = answer  # type: ignore[assignment]
                slot.wait(waited)
            else:
                server.loop.create_task(answer).add_done_callback(slot)  # type: ignore[arg-type,union-attr]
            if len(queue) >= MAX_QUEUED:
                self._update_reading()
        if not keep_alive:
            self._finish()

    # -- answering, in order ---------------------------------------------------------

    def _send_ready(self, data: bytes, close: bool) -> None:
        """An answer (final, interim or an error) that is ready now: write it, or queue it
        behind earlier ones."""
        self.waiting += 1
        queue = self.queue
        if queue:
            queue.append(_Slot(self, data, close))
            self._update_reading()
        else:
            self._write(data, close)

    def _settled(self, slot: _Slot, answer: Response | None, exc: BaseException | None) -> None:
        if self.queue is None:
            return  # the client is gone; the request was counted all the same
        if answer is None:
            logging.getLogger("gateway").error("request path failed", exc_info=exc)
            answer = _INTERNAL_ERROR
            slot.close = True
            self.closing = True
        data = self.server.encode(answer, slot.variant & 4 if slot.close else slot.variant)
        if slot.info is not None:
            self._log(slot.info, answer, len(data))
        slot.data = data
        queue = self.queue
        if (
            len(queue) == 1
            and queue[0] is slot
            and self.commit is None
            and not (slot.close or self.closing or self.server.draining)
            and self.transport is not None
        ):
            # The common case: the only answer owed on this connection.
            queue.popleft()
            self.waiting -= 1
            self.queue_write(data)
            self.served = True
            self.since = self.server.now
            return
        full = len(queue) >= MAX_QUEUED
        while queue and queue[0].data is not None:
            head = queue.popleft()
            assert head.data is not None
            self._write(head.data, head.close)
        if full or self.read_paused:
            self._update_reading()

    def _write(self, data: bytes, close: bool) -> None:
        self.waiting -= 1
        if self.commit is not None:
            held = self.held
            held.append(data)
            if close:
                self.close_when_released = True
            if len(held) > MAX_HELD:
                self._update_reading()
            return
        transport = self.transport
        if transport is None:
            return
        self.queue_write(data)
        self.served = True
        if self.waiting == 0:
            self.since = self.server.now
            if self.closing or (self.server.draining and self.phase == IDLE):
                close = True
        if close:
            self._close()

    def _finish(self) -> None:
        """Answer what was asked, then close: no further request is read."""
        if self.closing:
            return
        self.closing = True
        if self.waiting == 0 and self.commit is None and self.transport is not None:
            self._close()

    def _reject(self, status: int, reason: str = "", bad: bool = True) -> None:
        if bad:
            self.server.bad_requests += 1
            # The rest of what was refused (a body, the bytes after a malformed head) may be on
            # its way. Not after a timeout: that client is slow or gone, and waits no longer.
            self.linger = True
        if self.closing:
            return
        self._send_ready(_plain(status, reason), True)
        self.closing = True
        self.phase = IDLE

    # -- holding (gateway.holding.Holder) ------------------------------------------------

    def hold(self, commit: Commit) -> None:
        """Keep what is written from now on until `commit` is released."""
        if self.commit is not commit:
            self.commit = commit
            commit.holders.append(self)

    def release(self, commit: Commit) -> None:
        if self.commit is not commit:
            return  # holding for a later commit now, which releases everything
        self.commit = None
        transport = self.transport
        held = self.held
        if transport is None or transport.is_closing() or self.shut:
            held.clear()
            return
        if held:
            # Released by a flush reply with the others it held: they leave in a burst already,
            # so they are written at once (write_now, inlined: this runs for every request held).
            if self.out is not None:
                self.flush_out()
            transport.writelines(held)
            held.clear()
            self.served = True
            if self.read_paused:
                self._update_reading()
        if self.waiting == 0:
            self.since = self.server.now
            if self.close_when_released or self.closing or (self.server.draining and self.phase == IDLE):
                self._close()

    # -- timeouts and the drain -----------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.is_closing():
            # Closing waits for the write buffer; a client that never reads would hold it forever.
            if not self.abort_at:
                self.abort_at = now + self.server.request_timeout
            elif now >= self.abort_at:
                transport.abort()
            return
        if self.shut:
            if now >= self.linger_until:
                transport.close()  # the client had its time to finish sending and read the answer
            return
        if self.read_paused:
            # Reading stopped because the client does not read its answers: no head timer runs
            # (the rest of the request is unread on our side), but the client gets only the
            # keep-alive timeout to start reading again.
            if now - self.paused_since >= self.server.keepalive_timeout:
                transport.abort()
            return
        phase = self.phase
        if phase == IDLE:
            if self.waiting or self.commit is not None or self.closing:
                return  # answers are on their way (Redis has its own timeouts)
            limit = self.server.keepalive_timeout if self.served else self.server.request_timeout
            if now - self.since >= limit:
                if self.served:
                    self._close()  # an idle keep-alive connection: nothing is owed
                else:
                    self._timed_out()
        elif now - self.since >= self.server.request_timeout:
            self._timed_out()

    def _timed_out(self) -> None:
        self.server.head_timeouts += 1
        self._reject(408, bad=False)

    def drain(self) -> None:
        """Shutdown: close now if nothing is owed; else the connection closes after its last
        answer, which says so (Connection: close): the request being read is answered so as it
        completes (`draining`), and an answer already made is rewritten, waiting or held. A
        lingering close ends now."""
        if self.shut and self.transport is not None:
            self.transport.close()
            return
        if self.phase != IDLE or self.transport is None:
            return
        if not self.waiting and self.commit is None:
            self._close()
            return
        queue = self.queue
        if queue:
            last = queue[-1]
            last.close = True  # encoded so once it settles (_settled)
            if last.data is not None:
                last.data = closing(last.data)
        elif self.held:
            self.held[-1] = closing(self.held[-1])
            self.close_when_released = True
        else:
            return
        # That answer is the last: no request after it is read (it would be counted, then lost
        # in the close, or answered after a Connection: close the client no longer reads).
        self._finish()

    def _close(self) -> None:
        """Close once what is written (pending in the outbox too) went out."""
        self.flush_out()
        transport = self.transport
        if transport is None or self.shut:
            return  # lingering already: it ends on the client's EOF or its bounds
        if (
            self.linger
            and not self.ended
            and not self.server.draining
            and not transport.is_closing()
            and transport.can_write_eof()
        ):
            # More of the client's input may be on its way. Closed now, the socket would answer
            # it with a reset, which can discard the last answer at the client before it is read
            # (RFC 9112 9.6). So the write side closes first (after the answer), what still comes
            # is read and dropped, and the connection closes when the client ends its side, or
            # after LINGER_S (the request timeout if shorter) or LINGER_BYTES.
            self.linger = False
            # From the loop's clock, not the ticked one (up to a tick old: a second by default,
            # half the linger); the ticker then closes within a tick after the deadline.
            loop = self.server.loop
            now = loop.time() if loop is not None else self.server.now
            self.linger_until = now + min(LINGER_S, self.server.request_timeout)
            transport.write_eof()
            self.shut = True  # nothing is written after this (an answer settling late is dropped)
            if self.read_paused:
                self.read_paused = False
                transport.resume_reading()
            return
        transport.close()

    def abort(self) -> None:
        self.out = None
        if self.transport is not None:
            self.transport.abort()

    def _cut(self) -> None:
        """End a response that broke off: what of it was written goes out, then the connection
        is aborted, so the client sees it end early rather than complete."""
        self.flush_out()
        if self.transport is not None:
            self.transport.abort()

    # -- access log -------------------------------------------------------------------

    def _log(self, info: tuple[bytes, bytes, bool, bytes, bytes], answer: Response, size: int) -> None:
        method, url, http10, referer, agent = info
        url, referer, agent = _quoted(url), _quoted(referer), _quoted(agent)
        stamp = time.strftime("[%d/%b/%Y:%H:%M:%S %z]")
        version = "1.0" if http10 else "1.1"
        access_log.info(
            '%s - - %s "%s %s HTTP/%s" %d %d "%s" "%s"',
            self.peer or "-",
            stamp,
            method.decode("latin-1"),
            url.decode("latin-1"),
            version,
            answer.status,
            size,
            referer.decode("latin-1") or "-",
            agent.decode("latin-1") or "-",
        )
