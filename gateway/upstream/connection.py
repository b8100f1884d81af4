"""One HTTP/1.1 client connection to an upstream server, pooled by `gateway.pool.Pool`.

Owns the socket and the response parser (llhttp through httptools). It carries
one exchange at a time: `begin(sink)` hands it the exchange whose response it
parses, and the parser's events go straight to that sink (head, body chunks,
end, failure). Writing the request and every deadline belong to the exchange
(`gateway.actions.proxy`).

Invariants:

- `pending` is 1 from `begin` until the response has been read whole; the pool
  never puts a pending connection back (an unread or partly read response would
  be handed to the next request).
- Discard on doubt: a parse error, bytes nobody asked for, a response that asks to
  close, a cut, an exchange abandoned (`abort`) or a response to HEAD (whose body
  length llhttp cannot be told to skip) make the connection unusable for good.
- It is also unusable, and so discarded by the pool at checkout, once idle longer
  than the idle timeout, older than the maximum lifetime, or used for the maximum
  number of requests: the upstream must never be the one closing a connection we
  are about to reuse, as far as we can help it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools

from ..errors import AccountingError
from ..outbox import Deferred, outbox

# How the response body is delimited.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3

# Content-Length, and the hop-by-hop fields (RFC 9110 7.6.1; Transfer-Encoding among them).
_FRAMING_OR_HOP = frozenset(
    (b"content-length", b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
     b"upgrade")
)  # fmt: skip

# Bounds on an upstream's response head, as on a client's request head.
MAX_HEADERS = 100
MAX_HEAD = 64 * 1024


def field_pairs(fields: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of a flat field list: name, b": ", value, b"\r\n" per field."""
    return list(zip(fields[0::4], fields[2::4], strict=True))


def llhttp_reads_chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether llhttp frames the body as chunked: the last element of the last Transfer-Encoding
    field line is `chunked`, give or take spaces and tabs before it and spaces after it. (Checked
    against llhttp itself on every list of up to three elements from chunked, gzip, empty, spaces
    and tabs: tests/unit/test_proxy_rules.py.)"""
    last = b""
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            last = value
    return last.rsplit(b",", 1)[-1].lstrip(b" \t").rstrip(b" ").lower() == b"chunked"


def transfer_codings(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The Transfer-Encoding codings, in order, lowercased (every field line joined)."""
    return [
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"transfer-encoding"
        for token in value.split(b",")
        if token.strip()
    ]


class ResponseSink(Protocol):
    """Who receives the events of the response being read (the exchange)."""

    def on_head(self, status: int, reason: bytes, fields: list[bytes], framing: int, plain: bool) -> None:
        """`fields`: the head's field lines, flat (`field_pairs`); `plain`: no hop-by-hop field
        among them (nor Connection)."""

    def on_body(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...

    def on_fail(self, kind: str, detail: str) -> None: ...

    def cork(self) -> None:
        """Events of one read follow: gather their output."""

    def uncork(self) -> None:
        """The read's events are over: send what was gathered in one write."""


class _NoBody(Exception):
    """Raised from on_headers_complete for a HEAD response: the message ends with its head."""


class _Unexpected(Exception):
    """Raised from a parser callback: a response nobody asked for."""


class UpstreamConnection(Deferred, asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # Requests are written at the end of the loop iteration, together (gateway.outbox).
        self.outbox = outbox(self.loop)
        self.out: list[bytes] | None = None
        self.out_bytes = 0
        self.shut = False
        self.parser = httptools.HttpResponseParser(self)
        self.last_activity = self.loop.time()
        self.requests = 0
        self.pending = 0
        self.doubt = False  # never reuse (set too when the connection closes)
        self.closed = False
        # What the pool asks: not doubt nor pending. Kept as a field, set wherever one of them
        # changes, since the pool reads it at every checkout and release. Idle time,
        # lifetime and the number of requests are the pool's (its Lifecycle): an upstream
        # connection is retired by the same rules as a Redis one.
        self.usable = True
        # What the pool's connect backoff asks (`gateway.backoff`): an upstream connect is
        # judged by the connect alone, its responses by the server's passive health.
        self.proven = True
        self.dud: AccountingError | None = None
        self.sink: ResponseSink | None = None
        # The response being parsed.
        self.head_method = False
        self.got_bytes = False  # any byte of the response arrived
        self.interim = False
        self.framing = NO_BODY
        self.reason = b""
        # The head's fields, flat and ready to be sent on (name, b": ", value, b"\r\n" per
        # field), and what they say about the head: told apart as they arrive, not in a second pass.
        self.fields: list[bytes] = []
        self.length = False  # a Content-Length field
        self.hop = False  # a hop-by-hop field (Transfer-Encoding among them)
        self.coded = False  # a Transfer-Encoding field
        self.reading = 0  # the size of the read being parsed
        self.head_done = False
        # Bytes received since the last body byte: a head, a chunk's framing or a trailer section.
        # httptools buffers a header field whole before calling on_header, so this is what
        # bounds an upstream that sends one endless field (or status line, or trailer).
        self.unframed = 0
        self.body_seen = False
        # Flow control.
        self.write_paused = False
        self.read_paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- what the pool asks ---------------------------------------------------------

    def abort(self) -> None:
        self.doubt = True
        self.usable = False
        self.sink = None
        self.out = None
        if self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        self.doubt = True
        self.usable = False
        self.flush_out()
        if self.transport is not None:
            self.transport.close()

    # -- one exchange ---------------------------------------------------------------

    def begin(self, sink: ResponseSink, head_method: bool) -> None:
        """Start an exchange: the next response belongs to `sink`."""
        self.sink = sink
        self.pending = 1
        self.usable = False
        self.requests += 1
        self.head_method = head_method
        self.got_bytes = self.interim = self.head_done = False
        self.framing = NO_BODY
        self.reason = b""
        self.fields = []
        self.length = self.hop = self.coded = False
        self.unframed = 0
        self.last_activity = self.loop.time()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.queue_write(data)  # at the end of the loop iteration (gateway.outbox)

    async def drain(self) -> None:
        """Wait while the socket's write buffer is above its high-water mark."""
        self.flush_out()  # a body streams up: its flow control must see what was written
        if self.closed:
            raise ConnectionResetError("upstream connection closed")
        if not self.write_paused:
            return
        fut = self._drained = self.loop.create_future()
        await fut

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.last_activity = self.loop.time()
            self.transport.resume_reading()

    def _finished(self) -> None:
        """The response was read whole: the connection may be reused (if nothing says otherwise)."""
        sink = self.sink
        self.sink = None
        self.pending = 0
        self.usable = not self.doubt
        if sink is not None:
            sink.on_end()

    def _fail(self, kind: str, detail: str) -> None:
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.on_fail(kind, detail)

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.doubt = True
        self.usable = False
        self.out = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("upstream connection closed"))
        sink = self.sink
        if sink is None:
            return
        if self.head_done and self.framing == UNTIL_CLOSE:
            self._finished()  # the close is the end of this body
        else:
            self.sink = None
            detail = "the upstream closed the connection" + ("" if self.got_bytes else " before answering")
            sink.on_fail("closed", detail)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.sink is None:
            # A response nobody asked for (or after one that ended): never trust this connection again.
            self._fail("protocol", "unexpected bytes from the upstream")
            return
        self.got_bytes = True
        sink = self.sink
        sink.cork()  # a head and a body in one read leave in one write to the client
        self.body_seen = False
        self.reading = len(data)
        try:
            self.parser.feed_data(data)
            if self.sink is sink and not self.body_seen:
                # Still reading this response and not one body byte came: whatever is being
                # parsed (head, chunk framing, trailers) is buffered by the parser. One read is
                # at most 256 KiB, so this bounds the memory an upstream can make us hold.
                self.unframed += len(data)
                if self.unframed > MAX_HEAD:
                    self._fail("protocol", "upstream response head or trailer section too large")
            else:
                self.unframed = 0
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _NoBody):
                self.doubt = True  # whatever follows the head cannot be framed: no reuse
                self.usable = False
                self._finished()
            else:
                self._fail("protocol", f"malformed upstream response: {exc.__context__ or exc}")
        except httptools.HttpParserError as exc:
            self._fail("protocol", f"malformed upstream response: {exc}")
        finally:
            sink.uncork()

    def eof_received(self) -> bool | None:
        return False  # close; connection_lost decides what the close means

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_activity = self.loop.time()
        fut = self._drained
        if fut is not None and not fut.done():
            fut.set_result(None)
        self._drained = None

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.sink is None:
            raise _Unexpected

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer field: not forwarded
        fields = self.fields
        fields += (name, b": ", value, b"\r\n")
        if len(fields) > 4 * MAX_HEADERS:
            raise ValueError("response head too large")
        lower = name.lower()
        if lower in _FRAMING_OR_HOP:
            if lower == b"content-length":
                self.length = True
            else:
                self.hop = True
                if lower == b"transfer-encoding":
                    self.coded = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise ValueError(f"status {status} outside 100..599")  # RFC 9110 15: invalid
        fields = self.fields
        # The head is at most what came since the last body byte, this read included (`unframed`
        # bounds the earlier reads): its size needs counting only when that could be over the
        # bound. The count takes 4 bytes per field, the wire at least 3: one more per field.
        if self.unframed + self.reading + len(fields) // 4 > MAX_HEAD and (
            len(self.reason) + sum(map(len, fields)) > MAX_HEAD
        ):
            raise ValueError("response head too large")
        if status < 200:
            if status == 101:
                raise ValueError("101 Switching Protocols to a request that asked no upgrade")
            # An interim response (100 Continue, 103 Early Hints): not forwarded; the final one follows.
            self.interim = True
            self.reason = b""
            self.fields = []
            self.length = self.hop = self.coded = False
            return
        self.head_done = True
        framing = UNTIL_CLOSE
        if self.head_method or status in (204, 304):
            framing = NO_BODY
            if status == 204 and (self.length or self.coded):
                # RFC 9110 8.6: a 204 has no length. The bytes it announced may still come and
                # would be read as the next request's response: never reuse this connection.
                self.doubt = True
        elif self.coded and (codings := transfer_codings(field_pairs(fields))):
            # RFC 9112 6.3: chunked last delimits the body; any other last coding (gzip alone)
            # means the body runs until the close, as llhttp reads it.
            framing = CHUNKED if codings[-1] == b"chunked" else UNTIL_CLOSE
            if framing == CHUNKED and not llhttp_reads_chunked(field_pairs(fields)):
                # "chunked, " (an empty last element, which RFC 9110 5.6.1 says to ignore) or a
                # tab after it: llhttp then reads the body until the close, chunk lines and all,
                # and the client would get them as content. Refused rather than passed on.
                raise ValueError("ambiguous Transfer-Encoding (chunked, then an empty element or a tab)")
        elif self.length:
            framing = LENGTH
        self.framing = framing
        sink = self.sink
        if sink is not None:
            sink.on_head(status, self.reason, fields, framing, not self.hop)
        if self.head_method:
            raise _NoBody

    def on_body(self, body: bytes) -> None:
        if self.interim:
            # RFC 9110 15.2: a 1xx ends with its head. llhttp reads a body for a 1xx other than
            # 100, 102 and 103 that announces one; it must not reach the client (502, discarded).
            raise ValueError(f"a {self.parser.get_status_code()} interim response with content")
        self.body_seen = True
        sink = self.sink
        if sink is not None:
            sink.on_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.parser.should_keep_alive():
            self.doubt = True  # the upstream asked to close (or spoke HTTP/1.0 without keep-alive)
        # _finished(), inlined: once per response.
        sink = self.sink
        self.sink = None
        self.pending = 0
        self.usable = not self.doubt
        if sink is not None:
            sink.on_end()
