"""The proxy's pure parts: header rules, target form, balancing, upstream URLs; and the upstream
connection's response parsing in memory, at every split point."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import httptools
import pytest

from gateway.actions.proxy import (
    HOP_BY_HOP,
    connection_tokens,
    origin_form,
    plain_head,
    request_fields,
    request_head,
    target_authority,
)
from gateway.config import ConfigError, UpstreamServer, parse_upstream, parse_upstreams
from gateway.upstream.balancer import Balancer
from gateway.upstream.connection import (
    CHUNKED,
    LENGTH,
    MAX_HEAD,
    MAX_HEADERS,
    NO_BODY,
    UNTIL_CLOSE,
    UpstreamConnection,
    field_pairs,
    llhttp_reads_chunked,
    transfer_codings,
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a/b?c=d", b"/a/b?c=d"),
        (b"*", b"*"),
        (b"http://example.test/x?y", b"/x?y"),
        (b"http://example.test", b"/"),
        (b"http://example.test?q=1", b"/?q=1"),
    ],
)
def test_origin_form(target: bytes, expected: bytes) -> None:
    assert origin_form(target) == expected


def test_connection_tokens() -> None:
    headers = [(b"Connection", b"keep-alive, X-A"), (b"connection", b" x-b ,"), (b"X-A", b"1")]
    assert connection_tokens(headers) == {b"keep-alive", b"x-a", b"x-b"}


def _fields(headers: list[tuple[bytes, bytes]], peer: str | None, trusted: bool) -> dict[bytes, bytes]:
    lines, host = request_fields(headers, peer, trusted)
    out = {}
    for line in lines:
        name, _, value = line.rstrip(b"\r\n").partition(b": ")
        assert name.lower() not in out, name  # every field once
        out[name.lower()] = value
    if host is not None:
        out[b"(host)"] = host
    return out


def test_request_fields_strip_hop_by_hop_and_named() -> None:
    headers = [
        (b"Host", b"h.test"),
        (b"Connection", b"close, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"5"),
        (b"Proxy-Connection", b"x"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Content-Length", b"3"),
        (b"Expect", b"100-continue"),
        (b"Accept", b"*/*"),
    ]
    out = _fields(headers, "192.0.2.1", trusted=False)
    assert set(out) == {b"accept", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"(host)"}
    assert out[b"(host)"] == b"h.test" and out[b"x-forwarded-host"] == b"h.test"


@pytest.mark.parametrize("trusted", [False, True])
def test_client_address_claims_pass_only_from_trusted_proxies(trusted: bool) -> None:
    # Forwarded and X-Real-IP name the client's address like X-Forwarded-For: from an untrusted
    # peer they would let any client tell an upstream that trusts them who it is.
    headers = [(b"Host", b"h.test"), (b"Forwarded", b"for=203.0.113.9"), (b"X-Real-IP", b"203.0.113.9")]
    out = _fields(headers, "192.0.2.1", trusted)
    if trusted:
        assert out[b"forwarded"] == b"for=203.0.113.9" and out[b"x-real-ip"] == b"203.0.113.9"
    else:
        assert b"forwarded" not in out and b"x-real-ip" not in out
    assert out[b"x-forwarded-for"].endswith(b"192.0.2.1")


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_fields_follow_the_trusted_proxy_rule(trusted: bool) -> None:
    headers = [
        (b"Host", b"h.test"),
        (b"X-Forwarded-For", b"198.51.100.1, 10.0.0.2"),
        (b"x-forwarded-for", b"10.0.0.3"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"front.test"),
    ]
    out = _fields(headers, "10.0.0.9", trusted)
    if trusted:
        assert out[b"x-forwarded-for"] == b"198.51.100.1, 10.0.0.2, 10.0.0.3, 10.0.0.9"
        assert out[b"x-forwarded-proto"] == b"https" and out[b"x-forwarded-host"] == b"front.test"
    else:
        assert out[b"x-forwarded-for"] == b"10.0.0.9"
        assert out[b"x-forwarded-proto"] == b"http" and out[b"x-forwarded-host"] == b"h.test"


def test_parse_upstream() -> None:
    assert parse_upstream("http://a.test") == UpstreamServer("a.test", 80, 1)
    assert parse_upstream("http://10.0.0.1:8080/?weight=3") == UpstreamServer("10.0.0.1", 8080, 3)
    assert parse_upstream("http://[::1]:81") == UpstreamServer("::1", 81, 1)
    assert parse_upstreams(["http://a:1,http://b:2", " http://c:3 "]) == (
        UpstreamServer("a", 1),
        UpstreamServer("b", 2),
        UpstreamServer("c", 3),
    )


@pytest.mark.parametrize(
    "url",
    ["https://a", "http://", "http://a/path", "http://a?weight=0", "http://a?weight=x", "http://a?w=1", "a:80"],
)
def test_parse_upstream_refuses(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_upstream(url)


class _S:
    """A stand-in server for the balancer (only what it reads)."""

    def __init__(self, name: str, weight: int = 1) -> None:
        self.name = name
        self.weight = weight
        self.current_weight = 0
        self.inflight = 0
        self.ok = True

    def available(self, now: float) -> bool:
        return self.ok


def test_smooth_weighted_roundrobin() -> None:
    a, b, c = _S("a", 5), _S("b"), _S("c")
    bal = Balancer([a, b, c], "roundrobin", lambda: 0.0)  # type: ignore[list-item]
    order = "".join(bal.pick(()).name for _ in range(7))  # type: ignore[union-attr]
    assert order == "aabacaa"  # spread, not aaaaabc
    b.ok = False
    assert Counter(bal.pick(()).name for _ in range(12)) == Counter({"a": 10, "c": 2})  # type: ignore[union-attr]
    assert bal.pick([a, c]) is None  # type: ignore[list-item]


def test_leastconn_by_weight() -> None:
    a, b = _S("a", 2), _S("b")
    bal = Balancer([a, b], "leastconn", lambda: 0.0)  # type: ignore[list-item]
    a.inflight, b.inflight = 2, 1
    assert bal.pick(()) is a  # (2+1)/2 < (1+1)/1
    a.inflight = 4
    assert bal.pick(()) is b
    a.ok = b.ok = False
    assert bal.pick(()) is None


class _Sink:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_head(self, status: int, reason: bytes, fields: list[bytes], framing: int, plain: bool) -> None:
        headers = field_pairs(fields)
        self.events.append(("head", status, reason, headers, framing))
        # `plain` promises no hop-by-hop field: the sink then copies every field as it is.
        assert plain == all(name.lower() not in HOP_BY_HOP for name, _ in headers)

    def on_body(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def on_end(self) -> None:
        self.events.append(("end",))

    def on_fail(self, kind: str, detail: str) -> None:
        self.events.append(("fail", kind))

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", LENGTH, b"hello", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n", CHUNKED, b"hello", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX: y\r\n\r\n", NO_BODY, b"", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", LENGTH, b"ok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", LENGTH, b"ok", False),
]


@pytest.mark.parametrize(("response", "framing", "body", "reusable"), RESPONSES)
async def test_response_parsed_at_every_split_point(response: bytes, framing: int, body: bytes, reusable: bool) -> None:
    for split in range(1, len(response)):
        conn = UpstreamConnection()
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        sink = _Sink()
        conn.begin(sink, head_method=False)
        assert conn.pending and not conn.usable
        conn.data_received(response[:split])
        conn.data_received(response[split:])
        kinds = [e[0] for e in sink.events]
        assert kinds == (["head", "body", "end"] if body else ["head", "end"]), (split, sink.events)
        assert sink.events[0][4] == framing
        if body:
            assert sink.events[1][1] == body
        assert conn.pending == 0
        assert conn.usable is reusable


async def test_read_until_close_ends_with_the_close() -> None:
    conn = UpstreamConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    sink = _Sink()
    conn.begin(sink, head_method=False)
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\nabc")
    conn.data_received(b"def")
    conn.connection_lost(None)
    assert sink.events == [("head", 200, b"OK", [], UNTIL_CLOSE), ("body", b"abcdef"), ("end",)]
    assert not conn.usable


@pytest.mark.parametrize(
    "data",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"HTTP/1.1 200 OK\r\n", b""],
    ids=["mid-body", "mid-head", "nothing"],
)
async def test_a_cut_response_fails_and_is_never_reused(data: bytes) -> None:
    conn = UpstreamConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    sink = _Sink()
    conn.begin(sink, head_method=False)
    if data:
        conn.data_received(data)
    conn.connection_lost(None)
    assert sink.events[-1] == ("fail", "closed")
    assert conn.got_bytes == bool(data)
    assert not conn.usable


async def test_unasked_bytes_and_head_responses_are_never_reused() -> None:
    conn = UpstreamConnection()
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")  # nobody asked
    assert transport.aborted and not conn.usable
    conn = UpstreamConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    sink = _Sink()
    conn.begin(sink, head_method=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert [e[0] for e in sink.events] == ["head", "end"] and sink.events[0][4] == NO_BODY
    assert not conn.usable


@pytest.mark.parametrize("fields", [100, 101])
async def test_response_field_count_is_bounded(fields: int) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(fields - 1))
    response = head + b"Content-Length: 2\r\n\r\nok"
    conn = UpstreamConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    sink = _Sink()
    conn.begin(sink, head_method=False)
    conn.data_received(response)
    if fields <= MAX_HEADERS:
        assert [e[0] for e in sink.events] == ["head", "body", "end"] and conn.usable
    else:
        assert sink.events == [("fail", "protocol")] and not conn.usable


@pytest.mark.parametrize("split", [0, 1000, 65000, 65536, 70000])
async def test_response_head_bytes_are_bounded_whatever_the_reads(split: int) -> None:
    # A head over the bound fails however it arrives: in one read with its body (its size
    # then counted at the end of the head), or over several (each read without a body byte
    # counted as it comes).
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\nContent-Length: 2\r\n\r\n"
    response = head + b"ok"
    conn = UpstreamConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    sink = _Sink()
    conn.begin(sink, head_method=False)
    for part in (response[:split], response[split:]):
        if part and sink.events == []:
            conn.data_received(part)
    assert sink.events == [("fail", "protocol")] and not conn.usable
    # Just under the bound, in one read with its body: answered, and reused.
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD - 100) + b"\r\nContent-Length: 2\r\n\r\n"
    conn = UpstreamConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    sink = _Sink()
    conn.begin(sink, head_method=False)
    conn.data_received(head + b"ok")
    assert [e[0] for e in sink.events] == ["head", "body", "end"] and conn.usable


async def test_response_head_bound_counts_fields_as_the_rules_do() -> None:
    # Fields sent without the space after the colon take a byte less on the wire than the head's
    # count gives them: a head over the bound by that count is refused even when its bytes, with
    # the body in the same read, are within it.
    names = [b"X-%02d" % i for i in range(99)] + [b"Content-Length"]
    values = [b"v"] * 99 + [b"2"]
    counted = len(b"OK") + sum(len(n) + len(v) + 4 for n, v in zip(names, values, strict=True))
    values[0] = b"v" * (MAX_HEAD + 4 - counted + 1)  # counted now MAX_HEAD + 4
    response = b"HTTP/1.1 200 OK\r\n" + b"".join(n + b":" + v + b"\r\n" for n, v in zip(names, values, strict=True))
    response += b"\r\nok"
    assert len(response) <= MAX_HEAD
    conn = UpstreamConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    sink = _Sink()
    conn.begin(sink, head_method=False)
    conn.data_received(response)
    assert sink.events == [("fail", "protocol")] and not conn.usable


async def test_a_connection_is_usable_until_in_doubt() -> None:
    # Idle time, lifetime and use limits are the pool's (gateway.lifecycle, tested there and in
    # tests/integration/test_proxy.py); the connection itself says whether it is clean.
    conn = UpstreamConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    assert conn.usable
    sink = _Sink()
    conn.begin(sink, head_method=False)
    assert not conn.usable  # a response outstanding
    conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert conn.usable and conn.requests == 1
    conn.abort()
    assert not conn.usable


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://good.example/p?q", b"good.example"),
        (b"HTTP://H:8080?x", b"H:8080"),
        (b"http://h", b"h"),
        (b"http://user:secret@h:81/p", b"h:81"),  # never the userinfo
        (b"/p", None),
        (b"*", None),
    ],
)
def test_target_authority(target: bytes, expected: bytes | None) -> None:
    assert target_authority(target) == expected


# The plain request head is a shortcut: for every request it takes, it must give the bytes the
# general rules give, trusted peer or not; every other request it must leave to them.
_HEADS = [
    (b"GET", b"/", [(b"Host", b"h")]),
    (b"GET", b"/a?b=c", [(b"host", b"h:8080"), (b"Accept", b"*/*"), (b"User-Agent", b"wrk")]),
    (b"DELETE", b"/x", []),
    (b"GET", b"/", [(b"Host", b"")]),
    (b"GET", b"/", [(b"X-Custom", b"1"), (b"HOST", b"h"), (b"x-other", b"2")]),
    (b"GET", b"/", [(b"Host", b"a"), (b"Host", b"b")]),
    (b"GET", b"/", [(b"Host", b"h"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"s")]),
    (b"GET", b"/", [(b"Host", b"h"), (b"X-Forwarded-For", b"1.2.3.4")]),
    (b"GET", b"/", [(b"Host", b"h"), (b"x-forwarded-host", b"evil")]),
    (b"GET", b"/", [(b"Host", b"h"), (b"Forwarded", b"for=1.2.3.4")]),
    (b"GET", b"/", [(b"Host", b"h"), (b"X-Real-IP", b"1.2.3.4")]),
    (b"GET", b"/", [(b"Host", b"h"), (b"TE", b"trailers"), (b"Keep-Alive", b"5")]),
    (b"POST", b"/", [(b"Host", b"h"), (b"Content-Length", b"3")]),
    (b"GET", b"http://abs.example/p", [(b"Host", b"h")]),
    (b"OPTIONS", b"*", [(b"Host", b"h")]),
]


@pytest.mark.parametrize(("method", "target", "headers"), _HEADS)
@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("peer", ["10.0.0.1", None])
def test_plain_head_is_the_general_head(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], trusted: bool, peer: str | None
) -> None:
    content_length = next((int(v) for n, v in headers if n.lower() == b"content-length"), -1)
    general = request_head(method, target, headers, peer, "up:80", trusted, False, content_length)
    plain = plain_head(method, target, headers, peer, "up:80")
    special = {name.lower() for name, _ in headers} - {b"host", b"accept", b"user-agent", b"x-custom", b"x-other"}
    hosts = sum(name.lower() == b"host" for name, _ in headers)
    if target.startswith(b"/") and not special and hosts <= 1:
        assert plain == general
    else:
        assert plain is None


def _llhttp_framing(lines: list[bytes]) -> tuple[str, list[tuple[bytes, bytes]]]:
    """How llhttp frames a response with these Transfer-Encoding field lines, and the fields
    as the connection sees them."""

    class Sink:
        def __init__(self) -> None:
            self.done = 0
            self.fields: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.fields.append((name, value))

        def on_message_complete(self) -> None:
            self.done += 1

    sink = Sink()
    head = b"".join(b"Transfer-Encoding: " + line + b"\r\n" for line in lines)
    try:
        httptools.HttpResponseParser(sink).feed_data(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    except httptools.HttpParserError:
        return "error", sink.fields
    return ("chunked" if sink.done else "until close"), sink.fields


def test_chunked_framing_is_decided_as_llhttp_decides_it() -> None:
    # The connection frames the body from the fields (transfer_codings: RFC 9110's list, empty
    # elements ignored) while llhttp frames it by its own rule. Where they differ the response
    # is refused (502), so the rule that tells them apart must be llhttp's exactly.
    elements = [b"chunked", b"gzip", b"", b" ", b"\t", b"chunked ", b"chunked\t", b" chunked", b"\tchunked", b"Chunked"]
    cases = [[b",".join(combo)] for n in (1, 2, 3) for combo in itertools.product(elements, repeat=n)]
    cases += [[a, b] for a in (b"chunked", b"gzip", b"chunked, ") for b in (b"chunked", b"gzip", b"", b"chunked, ")]
    seen = Counter()
    for lines in cases:
        framing, fields = _llhttp_framing(lines)
        if framing == "error":
            continue
        assert llhttp_reads_chunked(fields) == (framing == "chunked"), lines
        codings = transfer_codings(fields)
        ours = "chunked" if codings and codings[-1] == b"chunked" else "until close"
        # The RFC's reading is never narrower than llhttp's: a response llhttp reads as chunked
        # is chunked to us too; the others are the ambiguous ones, refused.
        assert not (framing == "chunked" and ours != "chunked"), lines
        seen[(framing, ours)] += 1
    assert seen[("chunked", "chunked")] > 100 and seen[("until close", "chunked")] > 100, seen
