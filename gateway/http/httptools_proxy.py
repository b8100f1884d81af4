"""The own front end's client connection when the action is the proxy (`--upstream`).

A `_Connection` (gateway.http.httptools_impl) that hands each request to the
proxy at the end of its head instead of answering it once complete: the body is
then streamed to the upstream while it arrives. Everything before that point is
the plain front end's: its limits, timeouts and refusals (smuggling shapes, bad
Host, oversized heads) apply unchanged, so nothing it refuses reaches an upstream.

Owns, per client connection: the exchanges in request order (`exchanges`; only
the oldest runs, a pipelined one waits with reading paused), the request body's
backpressure (reading pauses while an exchange holds `BODY_BUFFER` bytes not yet
sent upstream), the response's (the upstream pauses while the client's socket
buffer is full), and how the connection ends after each exchange. Answers of the
front end's own (a 4xx, 100 Continue) wait behind the exchanges before them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ..actions.proxy import BODY_BUFFER, Exchange
from ..pipeline import Response
from ..stepper import Stepper
from .httptools_impl import IDLE, HttpToolsFrontEnd, _Connection, _Reject, closing

log = logging.getLogger("gateway")


class ProxyConnection(_Connection):
    __slots__ = ("after", "exchanges", "log_info", "preambles", "task_free", "tasks")

    def __init__(self, server: HttpToolsFrontEnd) -> None:
        super().__init__(server)
        self.fields = []  # the base on_header keeps the head's fields here
        self.exchanges: deque[Exchange] = deque()
        # The accounting steps under way that wait (a Redis round trip), by exchange.
        self.tasks: dict[Exchange, asyncio.Task[None] | Stepper] = {}
        # The accounting step needs a Task only with a backend that awaits in a Task's context.
        pipeline = self.pipeline
        self.task_free = pipeline.task_free or pipeline.holds or not pipeline.backend.uses_redis
        # Own answers (bytes, close) owed after the exchanges before them.
        self.after: list[tuple[bytes, bool]] = []
        self.preambles: dict[Exchange, list[tuple[bytes, bool]]] = {}
        self.log_info: dict[Exchange, tuple[bytes, bytes, bool, bytes, bytes]] = {}

    # -- parser callbacks -------------------------------------------------------------

    # The base's per-request hooks are called by name, not through super(): Python 3.11 builds a
    # super object for each call, which cost more than the call itself.

    def on_headers_complete(self) -> None:
        _Connection.on_headers_complete(self)
        if self.upgrade is not None:
            raise _Reject(501, "protocol upgrades (WebSocket) are not supported by the proxy")
        method = self.parser.get_method()
        if method == b"CONNECT":
            raise _Reject(405, "CONNECT is not supported")
        fields = self.fields or []
        ex = Exchange(self, method, self.url, fields, self.peer, self.http10, self.content_length, self.chunked)
        if self.xff is not None and self.pipeline.uses_forwarded_for:
            ex.forwarded_for = [value.decode("latin-1") for value in self.xff]
        if self.server.access_log:
            self.log_info[ex] = (method, self.url, self.http10, self.referer, self.user_agent)
        self.fields = []
        if self.after:
            # Queued behind the exchanges before this one (its 100 Continue): sent as it starts.
            self.preambles[ex] = self.after
            self.after = []
        self.exchanges.append(ex)
        self.waiting += 1
        if len(self.exchanges) > 1:
            self._update_reading()  # pipelined: read nothing more until the ones before are answered
        elif ex.has_body:
            # Forwarded while its body arrives; not from inside this parser callback.
            loop = self.server.loop
            assert loop is not None
            loop.call_soon(self._start_first, ex)
        # Else it starts once its request is whole (on_message_complete), a moment from now.

    def on_body(self, body: bytes) -> None:
        _Connection.on_body(self, body)
        if not self.exchanges:
            return  # answered and closing already: the rest of the body is not read
        ex = self.exchanges[-1]
        ex.feed(body)
        if ex.buffered > BODY_BUFFER:
            self._update_reading()

    def on_message_complete(self) -> None:
        self.phase = IDLE
        keep_alive = self.parser.should_keep_alive() and not self.server.draining
        if self.http10 and keep_alive and (self.chunked or b"close" in (self.connection or b"").lower()):
            keep_alive = False  # as the plain front end decides (RFC 9112 6.1)
        if not keep_alive:
            self.closing = True  # read no further request
        exchanges = self.exchanges
        if exchanges:
            ex = exchanges[-1]
            if ex.has_body:
                ex.feed_end(keep_alive)
            else:
                ex.keep_alive = keep_alive  # all feed_end does for a request without a body
                if len(exchanges) == 1:
                    self._start(ex)

    # -- exchanges, in order --------------------------------------------------------------

    def _start_first(self, ex: Exchange) -> None:
        if self.exchanges and self.exchanges[0] is ex and not ex.abandoned and self.transport is not None:
            self._start(ex)

    def _start(self, ex: Exchange) -> None:
        """The exchange's turn: account it and forward it (gateway.pipeline.Pipeline.forward)."""
        ex.client_paused = self.write_paused
        ex.on_done = self._exchange_done
        if self.preambles:
            for data, close in self.preambles.pop(ex, ()):
                self.waiting += 1
                self._write(data, close)
        try:
            rest = self.pipeline.forward(ex, self.peer, ex.forwarded_for)
        except Exception as exc:  # a bug must not leave the client waiting
            self._exchange_done(ex, exc)
            return
        if rest is None:
            return  # under way on callbacks, or answered
        loop = self.server.loop
        assert loop is not None

        def accounted(exc: BaseException | None) -> None:
            self.tasks.pop(ex, None)
            if exc is not None:
                self._exchange_done(ex, exc)

        if self.task_free:
            runner = self.tasks[ex] = Stepper(loop, rest, accounted)
            runner.start()
        else:
            task = self.tasks[ex] = loop.create_task(rest)
            task.add_done_callback(lambda t: accounted(None if t.cancelled() else t.exception()))

    def _exchange_done(self, ex: Exchange, exc: BaseException | None) -> None:
        transport = self.transport
        if transport is None or not self.exchanges or self.exchanges[0] is not ex:
            return  # the client is gone (its exchanges were cancelled)
        self.exchanges.popleft()
        self.waiting -= 1
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            log.error("proxy exchange failed", exc_info=exc)
            ex.fail(502, "bad gateway")
            ex.close_after = True
        self.served = True
        self.since = self.server.now
        if self.log_info:
            info = self.log_info.pop(ex, None)
            if info is not None:
                self._log(info, Response(ex.status or 502, ""), ex.sent)
        if ex.cut:
            self._cut()
            return
        if ex.close_after or not ex.keep_alive or not ex.body_done:
            self.closing = True
            self.exchanges.clear()
            if not ex.body_done:
                self.linger = True  # answered before its body was read: the rest may be on its way
            self._close()
            return
        if self.exchanges:
            # The response goes out now, not at the end of the iteration: if the client is gone,
            # the write is what finds out (reading is paused while requests wait behind this one).
            self.flush_out()
            if transport.is_closing():
                # A write to the client failed (it is gone; connection_lost comes a moment later
                # and abandons what is left): forward nothing more for it. An exchange ends on an
                # upstream read now, so this runs before connection_lost did.
                return
            self._start(self.exchanges[0])
        else:
            after = self.after
            if after:
                self.after = []
                for data, close in after:
                    self.waiting += 1
                    self._write(data, close)
            # Draining, a request still being read is answered before the close (as the plain
            # front end does): the client sent it before it could know.
            if (
                (self.closing or (self.server.draining and self.phase == IDLE))
                and not self.waiting
                and not transport.is_closing()
            ):
                self._close()
            if not after and not self.read_paused:
                return  # nothing paused reading, and nothing left that could pause it
        self._update_reading()

    # -- what the exchange calls (gateway.actions.proxy.ClientSide) ------------------------

    def write(self, data: bytes) -> None:
        """At the end of the loop iteration (gateway.outbox); a transport closed meanwhile gets nothing."""
        self.queue_write(data)

    def body_drained(self) -> None:
        """The exchange passed its buffered body on: read the client again if that paused it."""
        if self.read_paused:
            self._update_reading()

    # -- the plain front end's hooks ------------------------------------------------------------

    def _saturated(self) -> bool:
        exchanges = self.exchanges
        if exchanges and (len(exchanges) > 1 or exchanges[-1].buffered > BODY_BUFFER):
            return True
        return _Connection._saturated(self)

    def _send_ready(self, data: bytes, close: bool) -> None:
        if self.exchanges:
            self.after.append((data, close))  # after the responses owed before it
            return
        super()._send_ready(data, close)

    def _drop_partial(self) -> Exchange | None:
        """The request being read will never be whole: end its exchange (its upstream
        connection is discarded), and return it; None if no request is being read."""
        exchanges = self.exchanges
        if not exchanges or exchanges[-1].body_done:
            return None
        ex = exchanges.pop()
        self.waiting -= 1
        self.log_info.pop(ex, None)
        self.preambles.pop(ex, None)
        self._abandon(ex)
        return ex

    def _abandon(self, ex: Exchange) -> None:
        """Nothing more is forwarded for `ex`. Stopped only once forwarding: an accounting step
        under way is let finish (cancelled mid-command, its increment could land in Redis neither
        counted nor failed); the exchange then stops before the proxy."""
        ex.abandoned = True
        proxy = self.pipeline.proxy
        if ex.forwarding and proxy is not None:
            proxy.abandon(ex)

    def _reject(self, status: int, reason: str = "", bad: bool = True) -> None:
        ex = self._drop_partial()
        if ex is not None:
            # The request being read is refused mid-body (413, 408, bad chunk framing): its
            # exchange cannot go on; the client gets the status if no response began, else a cut.
            if ex.started and self.transport is not None:
                if bad:
                    self.server.bad_requests += 1
                self._cut()
                return
            if self.closing:
                # Nothing more will be answered (the plain front end's reject sends nothing once
                # closing): close after what the exchanges before it owe, or the connection,
                # half-read, would be "timed out" again at every tick and never closed.
                self.phase = IDLE
                self._close_if_done()
                return
        super()._reject(status, reason, bad)

    def eof_received(self) -> bool | None:
        if self.shut:
            return _Connection.eof_received(self)  # the end of a lingering close
        self.ended = True
        ex = self._drop_partial()
        if ex is None:
            return super().eof_received()
        # The client half-closed mid-body: that request can never be whole, so its exchange ends
        # now (not at the request timeout, holding an upstream connection meanwhile). The
        # requests it completed before are still answered.
        self.phase = IDLE
        self.closing = True
        if ex.started and self.transport is not None:
            self._cut()  # its response began: there is no way to finish it
            return True
        self._close_if_done()
        return True

    def drain(self) -> None:
        """Shutdown: as the plain front end's, for the exchanges: the last one owed ends the
        connection and says so, in its head if that is not on the wire yet."""
        exchanges = self.exchanges
        if self.phase != IDLE or not exchanges or self.transport is None:
            _Connection.drain(self)
            return
        self._finish()  # no request after the ones owed is read (it would be lost in the close)
        if self.after:
            data, _ = self.after[-1]  # an answer of our own is the last: it says close now
            self.after[-1] = (closing(data), True)
            return
        ex = exchanges[-1]
        ex.close_after = True  # a head still to come says close; the connection closes after it
        if ex.started and ex.commit is not None and ex.held and ex.sent == ex.held_bytes:
            ex.held[0] = closing(ex.held[0])  # the head is held still (batched flush), first

    def _close_if_done(self) -> None:
        transport = self.transport
        if not self.exchanges and not self.waiting and transport is not None and not transport.is_closing():
            self._close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.exchanges:
            self.exchanges[0].set_client_paused(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.exchanges:
            self.exchanges[0].set_client_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.transport = None
        exchanges = list(self.exchanges)
        self.exchanges.clear()
        self.after.clear()
        self.preambles.clear()
        self.log_info.clear()
        for ex in exchanges:
            self._abandon(ex)  # the exchange's upstream connection is discarded (gateway.actions.proxy)
