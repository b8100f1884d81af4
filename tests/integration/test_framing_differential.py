"""Differential framing: the same raw bytes sent to both front ends and to HAProxy.

A corpus of request byte sequences (valid, malformed, request-smuggling shapes,
some delivered in pieces) goes to the gateway (`raw` mode, real Redis) with each
front end and to the bundled reference's calibration listener (real haproxy).
For every case the statuses of all responses are recorded, and for the gateway
the requests counted in Redis (each case connects from its own loopback address,
so each has its own counter).

HAProxy is the yardstick for what a request is: the gateway must never count
more requests than HAProxy accepted (answered 2xx/3xx) and never answer 2xx/3xx
where HAProxy refused. The gateway may be stricter; every case where it is
appears in EXPLAINED with the reason, and a difference not listed fails the test.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator

import pytest

from ..helpers import HAProxyReference, RedisServer, make_config, running_gateway

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")

H = b"Host: x\r\n"


def _req(method: bytes = b"GET", target: bytes = b"/", version: bytes = b"HTTP/1.1", headers: bytes = H) -> bytes:
    return method + b" " + target + b" " + version + b"\r\n" + headers + b"\r\n"


def _corpus() -> dict[str, list[bytes]]:
    """Case name -> the pieces written, in order (most cases are one piece)."""
    c: dict[str, list[bytes]] = {}
    # -- valid requests ---------------------------------------------------------------
    for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"PROPFIND", b"MKCOL"):
        c[f"method-{m.decode()}"] = [_req(m, headers=H + b"Content-Length: 0\r\n")]
    for name, target in {
        "root": b"/",
        "target": b"/ok",
        "query": b"/a?b=c&d",
        "pct": b"/%6Fk",
        "long-ok": b"/" + b"a" * 4000,
        "utf8-pct": b"/%E2%9C%93",
        "dots": b"/a/../b/./c",
    }.items():
        c[f"target-{name}"] = [_req(target=target)]
    c["target-absolute"] = [_req(target=b"http://example.test/ok", headers=b"Host: example.test\r\n")]
    c["target-absolute-port"] = [_req(target=b"http://example.test:8080/x?y", headers=b"Host: example.test:8080\r\n")]
    c["target-absolute-host-differs"] = [_req(target=b"http://example.test/ok")]
    c["options-star"] = [_req(b"OPTIONS", b"*")]
    c["http10"] = [_req(version=b"HTTP/1.0", headers=b"")]
    c["http10-keepalive"] = [_req(version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n") + _req()]
    c["http10-host"] = [_req(version=b"HTTP/1.0")]
    c["connection-close"] = [_req(headers=H + b"Connection: close\r\n") + _req()]
    c["pipelined-2"] = [_req() * 2]
    c["pipelined-10"] = [_req(target=b"/p") * 10]
    c["pipelined-mixed"] = [
        _req() + _req(b"HEAD", b"/ok") + _req(b"POST", headers=H + b"Content-Length: 3\r\n") + b"abc"
    ]
    c["body-cl"] = [_req(b"POST", headers=H + b"Content-Length: 5\r\n") + b"hello" + _req()]
    c["body-cl-zero"] = [_req(b"POST", headers=H + b"Content-Length: 0\r\n") + _req()]
    c["body-chunked"] = [_req(b"POST", headers=H + b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n"]
    c["body-chunked-ext"] = [
        _req(b"POST", headers=H + b"Transfer-Encoding: chunked\r\n") + b"5;a=b\r\nhello\r\n0\r\n\r\n"
    ]
    c["body-chunked-trailer"] = [
        _req(b"POST", headers=H + b"Transfer-Encoding: chunked\r\n") + b"1\r\nx\r\n0\r\nT: v\r\n\r\n" + _req()
    ]
    c["body-chunked-upper-hex"] = [
        _req(b"POST", headers=H + b"Transfer-Encoding: chunked\r\n") + b"A\r\n0123456789\r\n0\r\n\r\n"
    ]
    c["body-te-case"] = [_req(b"POST", headers=H + b"transfer-encoding: Chunked\r\n") + b"0\r\n\r\n"]
    c["expect-continue"] = [_req(b"POST", headers=H + b"Expect: 100-continue\r\nContent-Length: 2\r\n"), b"hi"]
    c["header-case"] = [_req(headers=b"hOsT: x\r\nuser-AGENT: t\r\n")]
    c["header-empty-value"] = [_req(headers=H + b"X-Empty:\r\n")]
    c["header-spaces"] = [_req(headers=H + b"X-A:    spaced   \r\n")]
    c["header-tab"] = [_req(headers=H + b"X-A:\tv\r\n")]
    c["header-latin1"] = [_req(headers=H + b"X-A: caf\xe9\r\n")]
    c["header-many-ok"] = [_req(headers=H + b"".join(b"X-%d: v\r\n" % i for i in range(50)))]
    c["cookie-big-ok"] = [_req(headers=H + b"Cookie: " + b"c" * 6000 + b"\r\n")]
    c["xff"] = [_req(headers=H + b"X-Forwarded-For: 10.1.2.3\r\n")]
    c["leading-crlf"] = [b"\r\n" + _req()]
    c["double-space-target"] = [b"GET  / HTTP/1.1\r\n" + H + b"\r\n"]
    c["upgrade-websocket"] = [_req(headers=H + b"Upgrade: websocket\r\nConnection: Upgrade\r\n")]
    c["upgrade-h2c"] = [
        _req(headers=H + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMA\r\n")
    ]
    # Valid requests delivered in pieces.
    whole = _req(b"POST", b"/split", headers=H + b"Content-Length: 4\r\n") + b"data" + _req()
    for cut in (1, 5, 17, 30, 45, len(whole) - 1):
        c[f"split-{cut}"] = [whole[:cut], whole[cut:]]
    c["split-3"] = [whole[:3], whole[3:20], whole[20:]]
    chunked = _req(b"POST", headers=H + b"Transfer-Encoding: chunked\r\n") + b"3\r\nabc\r\n0\r\n\r\n"
    for cut in (len(chunked) - 12, len(chunked) - 6, len(chunked) - 2):
        c[f"split-chunked-{cut}"] = [chunked[:cut], chunked[cut:]]
    # -- malformed request lines ------------------------------------------------------
    c["garbage"] = [b"GARBAGE\r\n\r\n"]
    c["binary"] = [bytes(range(256))]
    c["tls-hello"] = [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40]
    c["h2-preface"] = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
    c["lowercase-method"] = [_req(b"get")]
    c["unknown-method"] = [_req(b"FOO")]
    c["method-with-ctl"] = [_req(b"GE\x01T")]
    c["no-version"] = [b"GET /\r\n" + H + b"\r\n"]
    c["http09"] = [b"GET /\r\n\r\n"]
    c["version-2"] = [_req(version=b"HTTP/2.0")]
    c["version-12"] = [_req(version=b"HTTP/1.2")]
    c["version-99"] = [_req(version=b"HTTP/9.9")]
    c["version-lower"] = [_req(version=b"http/1.1")]
    c["version-trailing-space"] = [b"GET / HTTP/1.1 \r\n" + H + b"\r\n"]
    c["target-nul"] = [_req(target=b"/\x00")]
    c["target-ctl"] = [_req(target=b"/\x7f")]
    c["target-space"] = [_req(target=b"/a b")]
    c["target-high"] = [_req(target=b"/\xff")]
    c["target-fragment"] = [_req(target=b"/a#frag")]
    c["target-empty"] = [b"GET  HTTP/1.1\r\n" + H + b"\r\n"]
    c["target-huge"] = [_req(target=b"/" + b"a" * 20000)]
    c["bare-lf-line"] = [b"GET / HTTP/1.1\n" + H + b"\r\n"]
    c["bare-lf-all"] = [b"GET / HTTP/1.1\nHost: x\n\n"]
    c["bare-cr"] = [b"GET / HTTP/1.1\rHost: x\r\n\r\n"]
    # -- malformed header blocks ------------------------------------------------------
    c["no-host-11"] = [_req(headers=b"")]
    c["two-hosts"] = [_req(headers=b"Host: a\r\nHost: b\r\n")]
    c["two-same-hosts"] = [_req(headers=b"Host: a\r\nHost: a\r\n")]
    c["host-empty"] = [_req(headers=b"Host:\r\n")]
    c["host-list"] = [_req(headers=b"Host: a, b\r\n")]
    c["host-space"] = [_req(headers=b"Host: a b\r\n")]
    c["space-before-colon"] = [_req(headers=H + b"X-A : v\r\n")]
    c["no-colon"] = [_req(headers=H + b"Broken\r\n")]
    c["empty-name"] = [_req(headers=H + b": v\r\n")]
    c["name-with-space"] = [_req(headers=H + b"X A: v\r\n")]
    c["name-non-token"] = [_req(headers=H + b"X(A): v\r\n")]
    c["value-nul"] = [_req(headers=H + b"X-A: a\x00b\r\n")]
    c["value-cr"] = [_req(headers=H + b"X-A: a\rb\r\n")]
    c["value-lf"] = [_req(headers=H + b"X-A: a\nb: c\r\n")]
    c["value-del"] = [_req(headers=H + b"X-A: a\x7fb\r\n")]
    c["obs-fold"] = [_req(headers=H + b"X-A: a\r\n b\r\n")]
    c["obs-fold-first"] = [_req(headers=b" X: a\r\n" + H)]
    c["header-huge"] = [_req(headers=H + b"X-Big: " + b"a" * 20000 + b"\r\n")]
    c["headers-too-many"] = [_req(headers=H + b"".join(b"X-%d: v\r\n" % i for i in range(200)))]
    c["head-too-big"] = [_req(headers=H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 3000) for i in range(8)))]
    # -- body framing and smuggling shapes ----------------------------------------------
    post = b"POST / HTTP/1.1\r\n" + H
    tail = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    shapes = {
        "cl-te": b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "te-cl": b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n",
        "cl-cl-diff": b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "cl-cl-same": b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        "cl-list-same": b"Content-Length: 3, 3\r\n\r\nabc",
        "cl-list-diff": b"Content-Length: 3, 4\r\n\r\nabcd",
        "cl-negative": b"Content-Length: -1\r\n\r\n",
        "cl-plus": b"Content-Length: +3\r\n\r\nabc",
        "cl-hex": b"Content-Length: 0x3\r\n\r\nabc",
        "cl-space-inside": b"Content-Length: 1 2\r\n\r\n",
        "cl-empty": b"Content-Length:\r\n\r\n",
        "cl-huge": b"Content-Length: 99999999999999999999999\r\n\r\n",
        "cl-leading-zeros": b"Content-Length: 003\r\n\r\nabc",
        "te-gzip": b"Transfer-Encoding: gzip\r\n\r\n",
        "te-identity": b"Transfer-Encoding: identity\r\n\r\n",
        "te-chunked-gzip": b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        "te-gzip-chunked": b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "te-twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "te-space-colon": b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "te-xchunked": b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "te-chunked-space": b"Transfer-Encoding: chunked \r\n\r\n0\r\n\r\n",
        "te-tab-prefix": b"Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
        "te-obs-fold": b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        "te-http10": b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "chunk-size-bad": b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "chunk-size-negative": b"Transfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
        "chunk-size-overflow": b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n",
        "chunk-no-crlf": b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
        "chunk-lf-only": b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        "chunk-space-size": b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
        "chunk-size-too-short": b"Transfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    }
    for name, rest in shapes.items():
        line = b"POST / HTTP/1.0\r\n" + H if name == "te-http10" else post
        c[f"smuggle-{name}"] = [line + rest + tail]
    return c


CORPUS = _corpus()

# Cases where the gateway refuses what HAProxy accepts, and why. Both front ends parse with
# llhttp (aiohttp's C parser is llhttp too), which is stricter than HAProxy in these places.
_LLHTTP = "llhttp refuses it (RFC 9112 syntax); HAProxy is lenient here"
_SMUGGLING = "a framing ambiguity (RFC 9112 6.3): refused outright rather than resolved as HAProxy does"
EXPLAINED: dict[str, str] = {
    "lowercase-method": "methods are case-sensitive tokens (RFC 9110 9.1) and llhttp knows only registered ones",
    "unknown-method": "llhttp accepts only registered methods (RFC 9110 and the IANA registry); HAProxy any token",
    "version-2": "HTTP/2 is not spoken over an HTTP/1 connection: 505 (RFC 9110 15.6.6)",
    "version-12": _LLHTTP,
    "version-99": _LLHTTP,
    "bare-lf-line": _LLHTTP,
    "bare-lf-all": _LLHTTP,
    "value-nul": _LLHTTP,
    "value-lf": _LLHTTP,
    "value-del": _LLHTTP,
    "obs-fold": "obsolete line folding is refused (RFC 9112 5.2 allows a server to reject it)",
    "no-host-11": "RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without exactly one Host",
    "two-same-hosts": "RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without exactly one Host",
    "smuggle-cl-te": _SMUGGLING,
    "smuggle-te-cl": _SMUGGLING,
    "smuggle-cl-cl-same": _SMUGGLING,
    "smuggle-cl-list-same": _SMUGGLING,
    "smuggle-te-obs-fold": _SMUGGLING,
    "smuggle-chunk-lf-only": _LLHTTP,
    "smuggle-chunk-space-size": _LLHTTP,
}
EXPLAINED_AIOHTTP: dict[str, str] = {
    "connection-close": "aiohttp's parser answers 400 to bytes after a request with Connection: close",
    "smuggle-te-http10": "aiohttp refuses Transfer-Encoding in an HTTP/1.0 request",
}


def _closes(data: bytes) -> bool:
    """Whether the last response in `data` announces Connection: close."""
    last = data.rfind(b"HTTP/1.")
    head = data[last:].split(b"\r\n\r\n", 1)[0].lower()
    return b"\r\nconnection: close" in head


def _has_body(pieces: list[bytes]) -> bool:
    data = b"".join(pieces).lower()
    return re.search(rb"content-length: *0*[1-9]", data) is not None or b"transfer-encoding:" in data


def _statuses(data: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data) if not s.startswith(b"1")]


async def _exchange(port: int, pieces: list[bytes], source: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    out = b""
    try:
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0.05)  # a separate read on the server
            writer.write(piece)
            await writer.drain()
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.6)
            except TimeoutError:
                break  # a keep-alive connection with nothing more to say
            if not data:
                break
            out += data
    except ConnectionError:
        pass
    finally:
        writer.close()
    return out


@pytest.fixture(scope="module")
def reference(redis_session: RedisServer) -> Iterator[HAProxyReference]:
    ref = HAProxyReference(redis_session.port).start()
    yield ref
    ref.stop()


async def _run_all(port: int, first_octet: int) -> dict[str, bytes]:
    names = list(CORPUS)
    results = await asyncio.gather(
        *(_exchange(port, CORPUS[n], f"127.{first_octet}.{i // 250}.{i % 250 + 1}") for i, n in enumerate(names))
    )
    return dict(zip(names, results, strict=True))


async def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 100


async def test_gateway_never_accepts_more_than_haproxy(
    reference: HAProxyReference, redis_server: RedisServer, http: str
) -> None:
    haproxy = await _run_all(reference.ports["calibration"], 1)
    async with running_gateway(make_config(redis_server.url, "raw", http=http)) as (gw, base):
        port = int(base.rsplit(":", 1)[1])
        ours = await _run_all(port, 2)
        await gw.backend.close()
    client = redis_server.client()
    unexplained = []
    stricter = []
    violations = []
    closed_after_body: list[str] = []
    for i, name in enumerate(CORPUS):
        h, o = _statuses(haproxy[name]), _statuses(ours[name])
        h_ok = sum(200 <= s < 400 for s in h)
        o_ok = sum(200 <= s < 400 for s in o)
        counted = int(client.get(f"ip:127.2.{i // 250}.{i % 250 + 1}") or 0)
        # HAProxy closes the connection after redirecting a request that had a body (its answer
        # says Connection: close), so it never reads the requests behind it; the gateway keeps
        # the connection and answers them. Only the requests HAProxy read are compared.
        beyond = 0
        if h and h[-1] < 400 and _closes(haproxy[name]) and len(o) > len(h):
            assert _has_body(CORPUS[name]), name
            beyond = sum(200 <= s < 400 for s in o[len(h) :])
            closed_after_body.append(name)
        # The hard rules: never count or accept more than HAProxy parsed.
        if counted - beyond > h_ok or o_ok - beyond > h_ok or (h and h[0] >= 400 and o and o[0] < 400):
            violations.append((name, h, o, counted))
        elif counted != o_ok:  # every accepted request is counted, once
            violations.append((name, h, o, counted))
        if o_ok < h_ok:
            stricter.append(name)
            if name not in EXPLAINED and not (http == "aiohttp" and name in EXPLAINED_AIOHTTP):
                unexplained.append((name, h, o))
    assert not violations, "\n".join(map(str, violations))
    assert not unexplained, "differences to explain in EXPLAINED:\n" + "\n".join(map(str, unexplained))
