"""The proxy action (`--upstream`): forward a counted request to an upstream server, stream the answer back.

Owns one exchange from the moment the request path lets it go on: choosing a
server (`gateway.upstream.balancer`), checking a connection out of its pool,
rewriting the head (hop-by-hop fields out, X-Forwarded-* in, Host kept),
streaming the request body up and the response body down, the deadlines, the
retries, and the 502/503/504 answers. The front end owns the client connection:
it parses the request, feeds its body here (`feed`, `feed_end`), and receives
bytes (`ClientSide.write`); the exchange reports when it is over through the
`forward` coroutine returning, with `close_after` / `cut` telling the front end
how the client connection must end.

Invariants:

- Nothing reaches an upstream before the front end accepted the whole head (the
  smuggling shapes are refused there) and the request was accounted.
- A connection goes back to its pool only after its response was read whole;
  any doubt (an error, a timeout, a cancelled exchange, a response that came
  before the request was sent whole) closes it (`UpstreamConnection.doubt`).
- A request is replayed only when that is safe: a connect failure is retried on
  another server (no byte was sent); a reused connection that closed before any
  response byte is retried once, on a fresh connection, and only for an
  idempotent method without a body (RFC 9112 9.3.1). Anything else gets 502.
  Every request tries each server at most once for connect failures: no storm.
- Bodies are never buffered whole: the request body waits here up to
  `BODY_BUFFER` bytes (the front end pauses reading the client beyond it), and
  the response body is passed on as it arrives, with the upstream paused while
  the client does not read (or while a batched flush holds the response).
- Once a response byte is on its way to the client, a failure can only cut the
  client connection (`cut`); before that, the client gets a clear status.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable
from functools import lru_cache
from http import HTTPStatus
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from .. import errors
from ..errors import AccountingError
from ..stepper import Stepper
from ..upstream.balancer import Balancer
from ..upstream.connection import LENGTH, NO_BODY, UpstreamConnection, field_pairs, transfer_codings
from ..upstream.health import HealthChecker
from ..upstream.server import Server, by_class

if TYPE_CHECKING:
    from ..client_ip import ClientIPResolver
    from ..config import Config
    from ..holding import Commit
    from ..pipeline import Response

log = logging.getLogger("gateway.proxy")

# Request body bytes waiting for the upstream before the client is paused; response bytes held
# (batched flush) before the upstream is paused.
BODY_BUFFER = 64 * 1024
HELD_BUFFER = 64 * 1024

# RFC 9110 9.2.2: methods a client may repeat; only these are ever replayed.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# RFC 9110 7.6.1, and the fields this proxy sets or frames itself.
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
)
# Fields in which a client names its own address, as X-Forwarded-For does: an upstream that trusts
# them could be told anything by an untrusted peer, so they pass only from trusted proxies.
_CLIENT_CLAIMS = frozenset((b"forwarded", b"x-real-ip"))
_REQUEST_OWN = frozenset((b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"))

# Error kinds, as counted in /stats (per server and for the proxy).
CONNECT = "connect"
QUEUE_TIMEOUT = "queue_timeout"
RESPONSE_TIMEOUT = "response_timeout"
BODY_TIMEOUT = "body_timeout"
CLOSED = "closed"
PROTOCOL = "protocol"
NO_SERVER = "no_server"

_FAILURE_STATUS = {RESPONSE_TIMEOUT: 504, BODY_TIMEOUT: 504, CLOSED: 502, PROTOCOL: 502}


# Fields the plain request head (Proxy._head) leaves to the general rules: any one of them, or a
# second Host, sends the request down the general path.
_NOT_PLAIN = HOP_BY_HOP | _CLIENT_CLAIMS | _REQUEST_OWN | {b"host"}


# Status lines sent, by (status, reason): an upstream repeats a few.
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _phrase(status: int) -> bytes:
    """The registered reason phrase; none for a code with no registration (299, say): the reason
    phrase may be empty (RFC 9112 4), and an unknown code is still a valid response."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# Every exchange's `held` until it holds: one shared empty list, never appended to.
_NOTHING_HELD: list[bytes] = []


def _nobody(ex: Exchange, exc: BaseException | None) -> None:
    """The default `Exchange.on_done`: nobody is told (an exchange made outside a front end)."""


class ClientSide(Protocol):
    """The client connection, as the exchange sees it (the front end's connection protocol)."""

    def write(self, data: bytes) -> None:
        """Send `data` at the end of the loop iteration (gateway.outbox)."""

    def write_now(self, data: bytes) -> None:
        """Send `data` at once, after anything written before (a burst of releases already)."""


class _Failed(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The field names listed in Connection (RFC 9110 7.6.1): hop-by-hop too."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


def origin_form(target: bytes) -> bytes:
    """The target as sent upstream: absolute form becomes origin form; `*` and `/...` stay."""
    if target.startswith(b"/") or target == b"*":
        return target
    _, sep, rest = target.partition(b"://")
    if not sep:
        return target
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
    if cut < 0:
        return b"/"
    return rest[cut:] if rest[cut : cut + 1] == b"/" else b"/" + rest[cut:]


def target_authority(target: bytes) -> bytes | None:
    """The host[:port] of an absolute-form target, userinfo excluded (RFC 9112 3.2.2); None
    for any other form."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    return rest[:end].rpartition(b"@")[2] or None


def request_fields(
    headers: list[tuple[bytes, bytes]], peer: str | None, trusted: bool, authority: bytes | None = None
) -> tuple[list[bytes], bytes | None]:
    """The request's header lines for the upstream (framing excluded), and its Host.

    Hop-by-hop fields and those named in Connection go; X-Forwarded-For gets the peer
    appended to what a trusted peer sent (an untrusted peer's chain is dropped: it could
    say anything), and so are its `Forwarded` and `X-Real-IP`; X-Forwarded-Proto and
    X-Forwarded-Host are a trusted peer's, else ours.
    An absolute-form target's `authority` replaces the Host field (RFC 9112 3.2.2).
    """
    named = connection_tokens(headers)
    lines: list[bytes] = []
    host: bytes | None = None
    chain: list[bytes] = []
    proto = forwarded_host = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            host = value  # the head carries it first
            continue
        if lower in HOP_BY_HOP or lower in named or lower in _REQUEST_OWN:
            if trusted:
                if lower == b"x-forwarded-for":
                    chain.append(value.strip())
                elif lower == b"x-forwarded-proto":
                    proto = value.strip()
                elif lower == b"x-forwarded-host":
                    forwarded_host = value.strip()
            continue
        if lower in _CLIENT_CLAIMS and not trusted:
            continue
        lines.append(name + b": " + value + b"\r\n")
    if authority is not None:
        host = authority
    chain.append((peer or "unknown").encode("latin-1"))
    lines.append(b"X-Forwarded-For: " + b", ".join(v for v in chain if v) + b"\r\n")
    lines.append(b"X-Forwarded-Proto: " + (proto or b"http") + b"\r\n")
    if forwarded_host or host:
        lines.append(b"X-Forwarded-Host: " + (forwarded_host or host or b"") + b"\r\n")
    return lines, host


def request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    peer: str | None,
    server_name: str,
    trusted: bool,
    chunked: bool,
    content_length: int,
) -> bytes:
    """The request head sent upstream, by the rules of `request_fields`."""
    # An absolute-form target names the host (RFC 9112 3.2.2): for an HTTP/1.0 request without
    # Host, it, not the upstream's address, is what the upstream must see.
    lines, host = request_fields(headers, peer, trusted, target_authority(target))
    out = [b"%s %s HTTP/1.1\r\n" % (method, origin_form(target))]
    out.append(b"Host: " + (host if host is not None else server_name.encode()) + b"\r\n")
    out += lines
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length >= 0:
        out.append(b"Content-Length: %d\r\n" % content_length)
    out.append(b"\r\n")
    return b"".join(out)


def plain_head(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], peer: str | None, server_name: str
) -> bytes | None:
    """`request_head` for the usual request, at half the cost: an origin-form target and no
    field the rules drop or rewrite (no body, no hop-by-hop field, no forwarding claims, one
    Host at most). None for any other request. Whether the peer is trusted changes nothing
    then: there is no chain of its to keep."""
    if target[:1] != b"/":
        return None
    out = [method, b" ", target, b" HTTP/1.1\r\nHost: ", b"", b"\r\n"]
    host = None
    for name, value in headers:
        lower = name.lower()
        if lower in _NOT_PLAIN:
            if lower != b"host" or host is not None:
                return None
            host = value
        else:
            out += (name, b": ", value, b"\r\n")
    out[4] = host if host is not None else server_name.encode()
    if host is None or len(host) <= 255:
        out.append(_forwarded_fields(peer, host))
    else:  # not kept: a Host may be 8 KiB, and the cache holds it twice
        out.append(_forwarded_fields.__wrapped__(peer, host))
    return b"".join(out)


@lru_cache(maxsize=1024)
def _forwarded_fields(peer: str | None, host: bytes | None) -> bytes:
    """The X-Forwarded-* fields, and the end of the head, of a plain request: the same for
    every request of a client to a host, so built once for each (for hosts of a usual length)."""
    forwarded = (peer or "unknown").encode("latin-1")
    if host:
        return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\n\r\n" % (forwarded, host)
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n\r\n" % forwarded


def plain_response(status: int, text: str, keep_alive: bool, http10: bool, head: bool) -> bytes:
    phrase = HTTPStatus(status).phrase
    body = f"{text}\n".encode()
    conn = (b"Connection: keep-alive\r\n" if http10 else b"") if keep_alive else b"Connection: close\r\n"
    extra = b"Retry-After: 1\r\n" if status == 503 else b""
    head_bytes = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s%s\r\n" % (
        status,
        phrase.encode(),
        len(body),
        extra,
        conn,
    )
    return head_bytes if head else head_bytes + body


class Exchange:
    """One proxied request: built by the front end at the end of the request head.

    Also a `gateway.holding.Holder`: with batched accounting and `--batch-ack flush`,
    the response bytes wait here until the flush holding the increment settles.
    """

    # Slots, not an instance dict: an exchange has more fields than Python 3.11 keeps in an
    # instance's compact (shared-key) layout, and past that every field read and store of a
    # per-request object takes the slow generic path. Slot reads and stores are the fastest.
    __slots__ = (
        "_body_wake", "_released", "abandoned", "body", "body_done", "body_taken", "buffered", "chunked",
        "chunked_out", "client", "client_paused", "close_after", "commit", "conn", "content_length", "corked",
        "cut", "done_fut", "extra_fields", "failure", "fast", "forwarded_for", "forwarding", "has_body",
        "head_fut", "headers", "held", "held_bytes", "http10", "keep_alive", "method", "on_done", "over",
        "peer", "progress", "proxy", "reused", "runner", "sent", "sent_at", "sent_whole", "server", "settling",
        "started", "status", "target", "timer", "waiting_client",
    )  # fmt: skip

    def __init__(
        self,
        client: ClientSide,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        peer: str | None,
        http10: bool,
        content_length: int,
        chunked: bool,
    ) -> None:
        self.client = client
        #: Called once when the exchange is over (the response sent, held or failed), with the
        #: exception of a bug if one ended it; never after the client left (`Proxy.abandon`).
        self.on_done: Callable[[Exchange, BaseException | None], None] = _nobody
        self.method = method
        self.target = target
        self.headers = headers
        self.peer = peer
        self.http10 = http10
        self.content_length = content_length
        self.chunked = chunked
        has_body = self.has_body = content_length > 0 or chunked
        self.body_done = not has_body
        # Request body, fed by the front end (`body` exists only for a request that has one).
        if has_body:
            self.body: deque[bytes] = deque()
        self.buffered = 0
        self.body_taken = False  # some body bytes went upstream: the request cannot be replayed
        self._body_wake: asyncio.Future[None] | None = None
        self.keep_alive = True  # known once the request ends (feed_end)
        self.close_after = False  # the client connection must close after this response
        self.cut = False  # the response broke off: the client connection must be aborted
        self.started = False  # response bytes were emitted (sent or held)
        # The client left (or its request was refused mid-body): nothing is forwarded any more.
        # Set by the front end, which stops the exchange only once it is `forwarding`: an
        # accounting step under way finishes, so the count stands as on the redirect path.
        self.abandoned = False
        self.forwarding = False
        self.status = 0  # the response's status, the upstream's or the gateway's own
        self.sent = 0  # response bytes emitted, for the access log
        #: The client's X-Forwarded-For values, for the client-IP rule (set by the front end).
        self.forwarded_for: list[str] | None = None
        #: Fields the gateway adds to the upstream's response (the RateLimit fields, --limit-headers).
        self.extra_fields: tuple[tuple[str, str], ...] = ()
        # Response side.
        self.proxy: Proxy | None = None
        self.server: Server | None = None
        self.conn: UpstreamConnection | None = None
        self.sent_at = 0.0  # perf_counter() when the request head went out: the latency histogram's clock
        self.reused = False
        # Forwarded on callbacks (`Proxy._send`), not by a coroutine (`runner`, the general path).
        self.fast = False
        self.runner: Stepper | None = None
        self.over = False  # the response was read whole (fast path)
        self.failure: tuple[str, str] | None = None  # how the attempt failed (fast path)
        self.settling = False  # over, but a batched flush still holds the response
        self.head_fut: asyncio.Future[None] | None = None
        self.done_fut: asyncio.Future[None] | None = None
        self.chunked_out = False
        self.client_paused = False
        # Holding (batched, --batch-ack flush): the commit held for, and what waits for it.
        self.commit: Commit | None = None
        self.held: list[bytes] = _NOTHING_HELD
        self.held_bytes = 0
        self._released: asyncio.Future[None] | None = None
        self.progress = 0.0
        self.sent_whole = False
        self.waiting_client = False
        self.timer: asyncio.TimerHandle | None = None
        self.corked: list[bytes] | None = None  # output gathered during one upstream read

    # -- the request body, from the front end -------------------------------------------

    def feed(self, data: bytes) -> None:
        self.body.append(data)
        self.buffered += len(data)
        self._wake()

    def feed_end(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.body_done = True
        if self._body_wake is not None:
            self._wake()

    def _wake(self) -> None:
        fut = self._body_wake
        if fut is not None and not fut.done():
            fut.set_result(None)

    @property
    def replayable(self) -> bool:
        return self.method in IDEMPOTENT and not self.has_body and not self.body_taken

    # -- holding (gateway.holding.Holder) ------------------------------------------------

    def hold(self, commit: Commit) -> None:
        if self.commit is not commit:
            self.commit = commit
            commit.holders.append(self)
            if self.held is _NOTHING_HELD:
                self.held = []  # its own, before anything is held

    def release(self, commit: Commit) -> None:
        if self.commit is not commit:
            return
        self.commit = None
        held = self.held
        if held:
            # Released by a flush reply with the others it held: they leave in a burst already.
            self.client.write_now(held[0] if len(held) == 1 else b"".join(held))
            self.held = _NOTHING_HELD  # a later hold (a retry's) takes a list of its own
            self.held_bytes = 0
        if self.conn is not None:  # else the response was read whole: no upstream to resume
            self._update_upstream_reading()
        fut = self._released
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self.settling:
            self.settling = False
            self.on_done(self, None)

    async def settled(self) -> None:
        """Wait until nothing is held (the flush holding the increment settled)."""
        if self.commit is not None:
            self._released = asyncio.get_running_loop().create_future()
            await self._released

    # -- output -----------------------------------------------------------------------

    def cork(self) -> None:
        self.corked = []

    def uncork(self) -> None:
        corked = self.corked
        self.corked = None
        if corked:
            self.client.write(corked[0] if len(corked) == 1 else b"".join(corked))
        if self.fast:
            proxy = self.proxy
            assert proxy is not None
            if self.over or self.failure is not None:
                proxy._end(self)  # after the read's output went out, never before it
            elif self.status and self.timer is None:
                proxy._watch_body(self)  # the body did not come whole with the head

    def emit(self, data: bytes) -> None:
        self.started = True
        self.sent += len(data)
        if self.commit is None:
            if self.corked is not None:
                self.corked.append(data)
            else:
                self.client.write(data)
            return
        self.held.append(data)
        self.held_bytes += len(data)
        if self.held_bytes > HELD_BUFFER:
            self._update_upstream_reading()

    def set_client_paused(self, paused: bool) -> None:
        """The client's socket buffer is full (or has room again): pause (resume) the upstream."""
        self.client_paused = paused
        self._update_upstream_reading()

    def _update_upstream_reading(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.client_paused or self.held_bytes > HELD_BUFFER:
            conn.pause_reading()
        else:
            conn.resume_reading()

    def answer(self, response: Response) -> None:
        """A complete answer of the gateway's own (the deny policy's 503)."""
        body = response.body
        self.status = response.status
        lines = [b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason.encode())]
        lines += [f"{n}: {v}\r\n".encode("latin-1") for n, v in response.headers]
        self._own_answer(lines, body)

    def fail(self, status: int, text: str) -> None:
        """An error answer: a clear status if nothing of a response was sent yet, else a cut."""
        if self.started:
            self.cut = True
            return
        body = f"{text}\n".encode()
        self.status = status
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
        lines.append(b"Content-Type: text/plain; charset=utf-8\r\n")
        if status == 503:
            lines.append(b"Retry-After: 1\r\n")
        self._own_answer(lines, body)

    def _own_answer(self, lines: list[bytes], body: bytes) -> None:
        # Keep-alive only when the request was read whole: else its unread body would be parsed
        # as the next request.
        keep = self.body_done and self.keep_alive and not self.close_after  # close_after: the drain's
        if not keep:
            self.close_after = True
        lines.append(b"Content-Length: %d\r\n" % len(body))
        if not keep:
            lines.append(b"Connection: close\r\n")
        elif self.http10:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        if self.method != b"HEAD":
            lines.append(body)
        self.emit(b"".join(lines))

    # -- ResponseSink (gateway.upstream.connection) ------------------------------------------

    def on_head(self, status: int, reason: bytes, fields: list[bytes], framing: int, plain: bool) -> None:
        """The response head: `fields` flat (gateway.upstream.connection.field_pairs); `plain`:
        it has no hop-by-hop field (Connection among them)."""
        self.status = status
        line = _STATUS_LINES.get((status, reason))
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason or _phrase(status))
            if len(_STATUS_LINES) < 256:  # an upstream's usual few; never grown without bound
                _STATUS_LINES[status, reason] = line
        lines = [line]
        if plain and (framing == LENGTH or (framing == NO_BODY and status != 204)):
            lines += fields  # every field stays
        else:
            headers = field_pairs(fields)
            named = connection_tokens(headers)
            for name, value in headers:
                lower = name.lower()
                if lower == b"content-length":
                    # Framing, not a hop-by-hop field, whatever Connection names: without it a length-
                    # delimited body on a kept-alive client connection runs into the next response.
                    if framing not in (LENGTH, NO_BODY) or status == 204:
                        continue  # a 204 has none (RFC 9110, 8.6): its body, if any, was dropped
                elif lower in HOP_BY_HOP or lower in named:
                    continue
                lines.append(name + b": " + value + b"\r\n")
        if framing not in (LENGTH, NO_BODY):
            # Chunked or read-until-close upstream: re-chunk for an HTTP/1.1 client; an HTTP/1.0
            # client gets a body delimited by the close.
            if self.http10:
                self.close_after = True
            else:
                self.chunked_out = True
                # Codings other than chunked (gzip) describe the bytes passed on: they stay, with
                # our chunked last; dropping them would hand the client coded bytes as plain ones.
                codings = [c for c in transfer_codings(field_pairs(fields)) if c != b"chunked"]
                lines.append(b"Transfer-Encoding: " + b", ".join([*codings, b"chunked"]) + b"\r\n")
        if not self.body_done:
            # The upstream answers before the request was sent whole: the rest of the client's
            # body will not be read, so the client connection cannot carry another request.
            self.close_after = True
        if self.extra_fields:
            lines += [f"{n}: {v}\r\n".encode("latin-1") for n, v in self.extra_fields]
        if self.close_after or (self.body_done and not self.keep_alive):
            lines.append(b"Connection: close\r\n\r\n")
        elif self.http10:
            lines.append(b"Connection: keep-alive\r\n\r\n")
        else:
            lines.append(b"\r\n")
        self.emit(b"".join(lines))
        server = self.server
        if server is not None:
            # Counted as the head comes, on either path (Histogram.observe, inlined: once per request).
            if self.fast and self.proxy is not None:
                self.proxy._awaiting.pop(self, None)
            latency = server.latency
            elapsed = perf_counter() - self.sent_at
            latency.counts[bisect_left(latency.bounds, elapsed)] += 1
            latency.sum += elapsed
            server.classes[status // 100] += 1  # 1..5: the connection refuses any other status
        fut = self.head_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def on_body(self, data: bytes) -> None:
        if self.chunked_out:
            self.emit(b"%x\r\n%s\r\n" % (len(data), data))
        elif self.commit is not None:
            # emit(), inlined for the usual held body (batched, --batch-ack flush)
            self.sent += len(data)
            self.held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes > HELD_BUFFER:
                self._update_upstream_reading()
        elif self.corked is not None:
            self.sent += len(data)  # emit(), inlined for the usual body: one read, nothing held
            self.corked.append(data)
        else:
            self.emit(data)

    def on_end(self) -> None:
        if self.chunked_out:
            self.emit(b"0\r\n\r\n")
        if self.fast:
            self.over = True
            if self.corked is None:  # else at uncork, once the read's output went out
                assert self.proxy is not None
                self.proxy._end(self)
            return
        fut = self.done_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def on_fail(self, kind: str, detail: str) -> None:
        if self.fast:
            if self.failure is None and not self.over:
                self.failure = (kind, detail)
                if self.corked is None:
                    assert self.proxy is not None
                    self.proxy._end(self)
            return
        for fut in (self.head_fut, self.done_fut):
            if fut is not None and not fut.done():
                fut.set_exception(_Failed(kind, detail))
                fut.exception()  # the other one is never awaited: mark it retrieved
                return


class Proxy:
    """The servers, their balancing and health, and the forwarding of one exchange."""

    def __init__(self, config: Config, resolver: ClientIPResolver) -> None:
        self.config = config
        self._resolver = resolver
        self.servers = [Server(spec, config) for spec in config.upstreams]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.balancer = Balancer(self.servers, config.balance, self._now)
        self.health: HealthChecker | None = None
        if config.health_check_path is not None:
            self.health = HealthChecker(
                self.servers,
                config.health_check_path,
                config.health_check_interval_s,
                config.health_check_rise,
                config.health_check_fall,
                config.health_check_timeout,
            )
        self._response_timeout = config.upstream_response_timeout_s
        self._body_timeout = config.upstream_body_timeout_s
        self.requests = 0
        self.retries = 0
        # Exchanges (attempts: a replay counts again) forwarded on callbacks (`_send`) and by the
        # general path's coroutine (`_run_slow`).
        self.on_callbacks = 0
        self.by_coroutine = 0
        self.errors: Counter[str] = Counter()
        # Fast exchanges waiting for their response head, oldest first, with their deadlines.
        self._awaiting: dict[Exchange, float] = {}
        self._heads_timer: asyncio.TimerHandle | None = None

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return self.loop or asyncio.get_running_loop()

    def _now(self) -> float:
        return (self.loop or asyncio.get_running_loop()).time()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for server in self.servers:
            server.pool.start()  # its lifecycle's sweeper (idle connections closed in time)
        if self.health is not None:
            self.health.start()

    async def close(self) -> None:
        if self._heads_timer is not None:
            self._heads_timer.cancel()
            self._heads_timer = None
        if self.health is not None:
            await self.health.close()
        for server in self.servers:
            await server.pool.close()

    # -- one exchange ---------------------------------------------------------------------

    def forward(self, ex: Exchange) -> None:
        """Take `ex` on (its request was accounted). It ends with `ex.on_done`, unless the client
        leaves first (`abandon`).

        Under steady traffic a request without a body finds an idle connection: it is then
        forwarded on callbacks alone (`_send`; the response's events end it). Anything else
        (a connect, a wait for a connection, a body to stream, a retry) takes the general
        path, a coroutine (`_slow`)."""
        ex.forwarding = True
        ex.proxy = self
        self.requests += 1
        server = self.balancer.pick(())
        if server is not None and not ex.has_body:
            conn = server.pool.try_acquire()
            if conn is not None:
                self._send(server, conn, ex)
                return
        self._run_slow(ex, server, False)

    def abandon(self, ex: Exchange) -> None:
        """The client is gone (or its request was refused mid-body): stop forwarding `ex`; its
        upstream connection, if it has one, is closed, and `ex.on_done` is not called."""
        runner = ex.runner
        if runner is not None:
            runner.cancel()  # the general path's cleanup closes its connection
            return
        conn = ex.conn
        if conn is None:
            return  # over already (a flush may hold its response: nobody to send it to now)
        server = ex.server
        assert server is not None
        ex.conn = None
        ex.fast = False
        self._awaiting.pop(ex, None)
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        server.inflight -= 1
        conn.abort()
        server.pool.release(conn)

    # -- the fast path: callbacks only ------------------------------------------------------

    def _send(self, server: Server, conn: UpstreamConnection, ex: Exchange) -> None:
        self.on_callbacks += 1
        server.inflight += 1
        server.requests += 1
        ex.server = server
        ex.conn = conn
        ex.fast = True
        ex.reused = conn.requests > 0
        ex.sent_whole = True
        conn.begin(ex, ex.method == b"HEAD")
        if ex.client_paused:
            conn.pause_reading()
        head = plain_head(ex.method, ex.target, ex.headers, ex.peer, server.name) or self._general_head(ex, server)
        conn.queue_write(head)  # an idle connection is open (`usable`); sent at the iteration's end
        ex.sent_at = perf_counter()
        # Every exchange waits as long for its head, so the oldest is always due first: one
        # timer, armed for it, serves them all.
        awaiting = self._awaiting
        awaiting[ex] = (self.loop or asyncio.get_running_loop()).time() + self._response_timeout
        if self._heads_timer is None:
            self._arm_heads()

    def _arm_heads(self) -> None:
        for deadline in self._awaiting.values():
            self._heads_timer = self._loop.call_at(deadline, self._heads_due)
            return
        self._heads_timer = None

    def _heads_due(self) -> None:
        now = self._loop.time()
        awaiting = self._awaiting
        while awaiting:
            ex, deadline = next(iter(awaiting.items()))
            if deadline > now:
                break
            del awaiting[ex]
            conn = ex.conn
            ex.on_fail(RESPONSE_TIMEOUT, "the upstream did not answer in time")
            if conn is not None:
                conn.abort()
        self._arm_heads()

    def _watch_body(self, ex: Exchange) -> None:
        """The fast path's body deadline: armed when a head came without its whole body, it
        fails the exchange once the upstream sent nothing for the body timeout."""
        ex.timer = None
        conn = ex.conn
        if conn is None or not ex.fast:
            return
        loop = self._loop
        now = loop.time()
        if conn.read_paused:
            # Paused by us (the client does not read, or a flush holds the response): not the upstream's fault.
            ex.timer = loop.call_at(now + self._body_timeout, self._watch_body, ex)
            return
        last = conn.last_activity
        if now - last >= self._body_timeout:
            ex.on_fail(BODY_TIMEOUT, "the upstream stalled in the response body")
            return
        ex.timer = loop.call_at(last + self._body_timeout, self._watch_body, ex)

    def _end(self, ex: Exchange) -> None:
        """A fast exchange is over: the response was read whole, or the attempt failed."""
        conn = ex.conn
        if conn is None:
            return
        server = ex.server
        assert server is not None
        ex.conn = None
        ex.fast = False
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        failure = ex.failure
        if failure is not None:
            self._awaiting.pop(ex, None)
        server.inflight -= 1
        if conn.pending or failure is not None:
            conn.abort()  # discard on doubt: never reuse a connection mid-exchange
        elif conn.read_paused:
            # Paused for this exchange (its client's buffer full, or its held bytes past HELD_BUFFER,
            # in the read that ended it): never idle paused, or the next exchange on it is not read.
            conn.resume_reading()
        server.pool.release(conn)
        if failure is None:
            if server.fails:
                server.succeeded()
        else:
            ex.failure = None
            kind, detail = failure
            if self._stale(server, kind, ex.reused, conn, ex):
                if ex.replayable:
                    # Closed by the upstream as we reused it: once more, on a fresh connection.
                    self.retries += 1
                    server.retries += 1
                    self._run_slow(ex, None, True)
                    return
                ex.fail(502, "the upstream closed the connection before answering")
            else:
                self._failed(server, kind)
                ex.fail(_FAILURE_STATUS.get(kind, 502), detail)
        if ex.commit is not None:
            ex.settling = True  # done once the flush holding its increment settles (Exchange.release)
            return
        ex.on_done(ex, None)

    # -- the general path: a coroutine --------------------------------------------------------

    def _run_slow(self, ex: Exchange, server: Server | None, fresh: bool) -> None:
        self.by_coroutine += 1

        def ended(exc: BaseException | None) -> None:
            ex.runner = None
            if isinstance(exc, asyncio.CancelledError):
                return  # abandoned: nobody to tell
            ex.on_done(ex, exc)

        runner = ex.runner = Stepper(self._loop, self._slow(ex, server, fresh), ended)
        runner.start()

    async def _slow(self, ex: Exchange, server: Server | None, fresh: bool) -> None:
        """Forward `ex` and stream its response; never raises but for cancellation."""
        try:
            await self._forward(ex, server, fresh)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not become a hung client: cut it, log it
            log.exception("proxy exchange failed")
            self.errors["internal"] += 1
            ex.fail(502, "bad gateway")
        await ex.settled()

    async def _forward(self, ex: Exchange, first: Server | None, fresh: bool) -> None:
        tried: list[Server] = []
        server = first
        while True:
            if server is None:
                server = self.balancer.pick(tried)
            if server is None:
                if tried:
                    ex.fail(502, "no upstream server could be reached")
                else:
                    self.errors[NO_SERVER] += 1
                    ex.fail(503, "no upstream server available")
                return
            server.inflight += 1
            try:
                outcome = await self._attempt(server, ex, fresh)
            finally:
                server.inflight -= 1
            if outcome == "done":
                return
            if outcome == CONNECT:
                tried.append(server)  # redispatch: another server, never this one again
            else:  # a reused connection closed before answering: once more, on a fresh one
                fresh = True
            self.retries += 1
            server.retries += 1
            server = None

    async def _checkout(self, server: Server, fresh: bool) -> UpstreamConnection:
        pool = server.pool
        conn = await pool.acquire()
        # A retry after a stale connection wants a new one: the idle ones were opened as long
        # ago and are as likely to be closing. Each one taken here is closed, so this ends.
        for _ in range(pool.max_size + 1):
            if not fresh or conn.requests == 0:
                return conn
            conn.abort()
            pool.release(conn)
            conn = await pool.acquire()
        return conn

    async def _attempt(self, server: Server, ex: Exchange, fresh: bool) -> str:
        """One try on one server: "done" (answered, well or not), CONNECT or "stale" (retry)."""
        try:
            conn = await self._checkout(server, fresh)
        except AccountingError as err:
            if err.kind == errors.POOL_TIMEOUT:
                self._count(server, QUEUE_TIMEOUT)
                ex.fail(503, "no upstream connection free in time")
                return "done"
            if err.kind == errors.UNAVAILABLE:
                ex.fail(503, "shutting down")
                return "done"
            self._failed(server, CONNECT)
            return CONNECT
        reused = conn.requests > 0
        server.requests += 1
        try:
            await self._exchange(server, conn, ex)
        except _Failed as failure:
            kind = failure.kind
            if self._stale(server, kind, reused, conn, ex):
                if ex.replayable and not fresh:
                    return "stale"
                ex.fail(502, "the upstream closed the connection before answering")
                return "done"
            self._failed(server, kind)
            ex.fail(_FAILURE_STATUS.get(kind, 502), str(failure))
            return "done"
        finally:
            ex.conn = None
            if conn.pending or not ex.sent_whole:
                conn.abort()  # discard on doubt: never reuse a connection mid-exchange
            elif conn.read_paused:
                conn.resume_reading()  # paused for this exchange: never idle paused (as in _end)
            server.pool.release(conn)
        server.succeeded()
        return "done"

    def _stale(self, server: Server, kind: str, reused: bool, conn: UpstreamConnection, ex: Exchange) -> bool:
        """Whether a failed attempt is the stale case (counted): a reused connection the upstream
        closed before any response byte, so the request may be replayed once if idempotent."""
        if kind != CLOSED or not reused or conn.got_bytes or ex.started:
            return False
        self.errors["stale_connection"] += 1
        server.errors["stale_connection"] += 1
        return True

    def _count(self, server: Server, kind: str) -> None:
        server.errors[kind] += 1
        self.errors[kind] += 1

    def _failed(self, server: Server, kind: str) -> None:
        self.errors[kind] += 1
        server.failed(kind)

    async def _exchange(self, server: Server, conn: UpstreamConnection, ex: Exchange) -> None:
        loop = self.loop or asyncio.get_running_loop()
        head = ex.head_fut = loop.create_future()
        done = ex.done_fut = loop.create_future()
        ex.sent_whole = False
        ex.conn = conn
        ex.server = server
        conn.begin(ex, ex.method == b"HEAD")
        if conn.closed:
            # Closed by the upstream after the pool handed it over (a queued request resumes a
            # loop turn after the hand-off): nothing was sent, so this is the stale case.
            conn.sink = None
            raise _Failed(CLOSED, "the upstream closed the connection before answering")
        if ex.client_paused:
            conn.pause_reading()
        conn.write(self._head(ex, server))
        ex.sent_at = perf_counter()  # the latency histogram's clock (the loop's is cached per iteration)
        started = loop.time()
        ex.progress = started
        sender = None
        if ex.has_body:
            sender = loop.create_task(self._send_body(conn, ex))
        else:
            ex.sent_whole = True
        first = min(self._response_timeout, self._body_timeout) if sender is not None else self._response_timeout
        ex.timer = loop.call_at(started + first, self._watch, ex, head, done)
        try:
            if sender is not None:
                # Until the body is sent, the upstream may answer early (then we stop sending) or
                # stall on reading (the body timeout, checked by the watchdog).
                await asyncio.wait((head, sender), return_when=asyncio.FIRST_COMPLETED)
                if sender.done() and not head.done():
                    sender.result()  # an upload error ends the exchange here
                    ex.progress = loop.time()
            await head  # counted as it came (Exchange.on_head)
            if not done.done():  # the body did not come with the head: its idleness is the deadline now
                if ex.timer is not None:
                    ex.timer.cancel()
                ex.timer = loop.call_at(conn.last_activity + self._body_timeout, self._watch, ex, head, done)
                await done
            else:
                done.result()  # raises if the body failed in the same read as the head
        finally:
            if ex.timer is not None:
                ex.timer.cancel()
                ex.timer = None
            if sender is not None:
                if not sender.done():
                    sender.cancel()
                elif not sender.cancelled():
                    sender.exception()  # retrieved: an upload error after the head changes nothing
            ex.head_fut = ex.done_fut = None

    def _watch(self, ex: Exchange, head: asyncio.Future[None], done: asyncio.Future[None]) -> None:
        """The exchange's one timer: response head after the request, then idleness of the body."""
        ex.timer = None
        if done.done() or head is not ex.head_fut:
            return  # the exchange (or this attempt of it) is over
        loop = self.loop or asyncio.get_running_loop()
        now = loop.time()
        conn = ex.conn
        if conn is None:
            return
        if not head.done():
            if not ex.sent_whole:
                if ex.waiting_client:
                    ex.progress = now  # the client is slow to send, not the upstream to read
                last = max(conn.last_activity, ex.progress)
                if now - last >= self._body_timeout:
                    ex.on_fail(BODY_TIMEOUT, "the upstream stopped reading the request body")
                    conn.abort()
                    return
                ex.timer = loop.call_at(last + self._body_timeout, self._watch, ex, head, done)
                return
            if now - ex.progress >= self._response_timeout:
                ex.on_fail(RESPONSE_TIMEOUT, "the upstream did not answer in time")
                conn.abort()
                return
            ex.timer = loop.call_at(ex.progress + self._response_timeout, self._watch, ex, head, done)
            return
        if conn.read_paused:
            # Paused by us (the client does not read, or a flush holds the response): not the upstream's fault.
            ex.timer = loop.call_at(now + self._body_timeout, self._watch, ex, head, done)
            return
        last = conn.last_activity
        if now - last >= self._body_timeout:
            ex.on_fail(BODY_TIMEOUT, "the upstream stalled in the response body")
            conn.abort()
            return
        ex.timer = loop.call_at(last + self._body_timeout, self._watch, ex, head, done)

    def _head(self, ex: Exchange, server: Server) -> bytes:
        head = plain_head(ex.method, ex.target, ex.headers, ex.peer, server.name)
        if head is not None:
            return head
        return self._general_head(ex, server)

    def _general_head(self, ex: Exchange, server: Server) -> bytes:
        trusted = self._resolver.trusts(ex.peer)
        return request_head(
            ex.method, ex.target, ex.headers, ex.peer, server.name, trusted, ex.chunked, ex.content_length
        )

    async def _send_body(self, conn: UpstreamConnection, ex: Exchange) -> None:
        loop = self.loop or asyncio.get_running_loop()
        while True:
            if ex.body:
                data = b"".join(ex.body)
                ex.body.clear()
                ex.buffered = 0
                ex.body_taken = True
                resume = getattr(ex.client, "body_drained", None)
                if resume is not None:
                    resume()
                conn.write(b"%x\r\n%s\r\n" % (len(data), data) if ex.chunked else data)
                try:
                    await conn.drain()
                except ConnectionError:
                    raise _Failed(CLOSED, "the upstream closed the connection while the request was sent") from None
                ex.progress = loop.time()
            elif ex.body_done:
                if ex.chunked:
                    conn.write(b"0\r\n\r\n")
                ex.sent_whole = True
                ex.progress = loop.time()
                return
            else:
                fut = ex._body_wake = loop.create_future()
                ex.waiting_client = True
                try:
                    await fut
                finally:
                    ex.waiting_client = False
                    ex._body_wake = None
                ex.progress = loop.time()

    # -- admin ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        now = self._now()
        return {
            "balance": self.config.balance,
            "requests": self.requests,
            "retries": self.retries,
            "forwarded": {"on_callbacks": self.on_callbacks, "by_coroutine": self.by_coroutine},
            "errors": dict(self.errors),
            "responses": by_class([sum(n) for n in zip(*(server.classes for server in self.servers), strict=True)]),
            "servers": {server.name: server.stats(now) for server in self.servers},
        }


__all__ = ["BODY_BUFFER", "ClientSide", "Exchange", "Proxy", "plain_head", "plain_response", "request_head"]
