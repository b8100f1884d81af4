"""Adversarial tests of the proxy's fast path: a request without a body that finds an idle
upstream connection is forwarded on callbacks only (`Proxy._send`, `Exchange.on_*`,
`Proxy._end`, `Proxy._heads_due`, `Proxy._watch_body`, `Proxy.abandon`).

Each test warms the pool first (the first request of a gateway connects, so it takes the
general path) and checks, with a spy on `Proxy._send`, that the requests under test did take
the fast path.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ..helpers import RedisServer, eventually
from ..proxy_helpers import RawUpstream, Upstream, proxy, proxy_config, raw_exchange, read_head


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await Upstream("a").start()
    yield up
    await up.stop()


# -- helpers ------------------------------------------------------------------------------------------


class _Paths:
    """The exchanges forwarded on the fast path (`Proxy._send`) and on the general one
    (`Proxy._run_slow`) since it was made: `paths["fast"]`, `paths["slow"]`."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.base = {"fast": proxy.on_callbacks, "slow": proxy.by_coroutine}

    def __getitem__(self, path: str) -> int:
        now = {"fast": self.proxy.on_callbacks, "slow": self.proxy.by_coroutine}[path]
        return int(now - self.base[path])

    def __eq__(self, other: object) -> bool:
        return Counter({path: n for path in ("fast", "slow") if (n := self[path])}) == other

    def __repr__(self) -> str:
        return f"paths(fast={self['fast']}, slow={self['slow']})"


def _spy(gw: Any) -> _Paths:
    return _Paths(gw.proxy)


def _server(gw: Any, port: int) -> dict[str, Any]:
    return gw.stats()["upstream"]["servers"][f"127.0.0.1:{port}"]  # type: ignore[no-any-return]


def _pool_clean(gw: Any) -> None:
    """No upstream connection checked out, nothing queued or in flight, no head awaited."""
    for name, s in gw.stats()["upstream"]["servers"].items():
        assert s["connections"]["in_use"] == 0, name
        assert s["queue"] == 0, name
        assert s["in_flight"] == 0, name
    assert not gw.proxy._awaiting  # the fast path's heads awaited: none left behind


async def _settled(gw: Any) -> None:
    """Wait until every exchange let its upstream connection go (a cut client is noticed a
    loop turn or two later), then check the pool is clean."""
    await eventually(
        lambda: (
            all(s["connections"]["in_use"] == 0 for s in gw.stats()["upstream"]["servers"].values())
            and not gw.proxy._awaiting
        )
    )
    _pool_clean(gw)


async def _open(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


def parse_responses(data: bytes, methods: list[bytes]) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split a stream of HTTP/1.1 responses, one per request method given (HEAD: no body).
    Fails the test on any framing the client could not follow."""
    out = []
    for method in methods:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {head[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            assert name.lower() not in fields or name.lower() == b"set-cookie", f"repeated field {name!r}"
            fields[name.lower()] = value.strip()
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif fields.get(b"transfer-encoding", b"").endswith(b"chunked"):
            assert b"content-length" not in fields
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    # No trailer section is passed on: the last chunk, then the empty line.
                    assert data.startswith(b"\r\n"), data[:50]
                    data = data[2:]
                    break
                body, data = body + data[:size], data[size:]
                assert data.startswith(b"\r\n")
                data = data[2:]
        else:
            n = int(fields[b"content-length"])
            assert len(data) >= n, (len(data), n)
            body, data = data[:n], data[n:]
        out.append((status, fields, body))
    assert data == b"", f"bytes after the last response: {data[:200]!r}"
    return out


async def _warm(base: str, n: int = 1) -> None:
    """Open `n` upstream connections (n concurrent requests), left idle in the pool."""
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            async with s.get(base + f"/echo/warm{i}") as r:
                assert r.status == 200
                await r.read()

        await asyncio.gather(*(one(i) for i in range(n)))


# -- the client leaves --------------------------------------------------------------------------------


async def test_client_leaves_while_its_head_is_awaited(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        await _warm(base)
        seen = _spy(gw)
        _reader, writer = await _open(base)
        writer.write(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: len(gw.proxy._awaiting) == 1)
        assert seen == Counter({"fast": 1})
        _abort_with_reset(writer)
        await _settled(gw)
        conns = _server(gw, upstream.port)["connections"]
        assert conns["discarded"] == 1 and conns["open"] == 0  # mid-exchange: never reused
        # The timer for the heads awaited survives the exchange it was armed for.
        async with aiohttp.ClientSession() as s:
            for i in range(3):
                async with s.get(base + f"/echo/after{i}") as r:
                    assert r.status == 200
                    assert (await r.json())["path"] == f"/echo/after{i}"
        assert seen["fast"] == 3  # the new connection's first request took the general path
        assert gw.stats()["upstream"]["errors"] == {}
        _pool_clean(gw)


async def test_client_leaves_mid_response_body(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        await _warm(base)
        seen = _spy(gw)
        reader, writer = await _open(base)
        writer.write(b"GET /data?n=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(100_000)
        assert seen == Counter({"fast": 1})
        writer.transport.abort()
        await _settled(gw)
        conns = _server(gw, upstream.port)["connections"]
        assert conns["discarded"] == 1 and conns["open"] == 0
        async with aiohttp.ClientSession() as s, s.get(base + "/echo/next") as r:
            assert r.status == 200 and (await r.json())["path"] == "/echo/next"
        _pool_clean(gw)


async def test_client_leaves_with_pipelined_requests_queued(upstream: Upstream) -> None:
    # The client goes while the first of its pipelined requests is under way: none of those queued
    # behind it may reach the upstream, and nothing is left checked out.
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        await _warm(base)
        seen = _spy(gw)
        _reader, writer = await _open(base)
        writer.write(b"".join(b"GET /slow?s=0.3&i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
        await eventually(lambda: len(gw.proxy._awaiting) == 1)
        _abort_with_reset(writer)
        await _settled(gw)
        await asyncio.sleep(0.1)
        assert seen == Counter({"fast": 1})
        assert gw.stats()["upstream"]["requests"] == 1 + 1  # the warm-up and the first one only
        async with aiohttp.ClientSession() as s, s.get(base + "/echo/z") as r:
            assert (await r.json())["path"] == "/echo/z"
        _pool_clean(gw)


def _pause_redis(redis_server: RedisServer, ms: int) -> None:
    # Holds the flush's EVALSHA (a script may write); reads still answer.
    redis_server.client().execute_command("CLIENT", "PAUSE", ms, "WRITE")


async def test_client_leaves_while_a_flush_holds_its_response(upstream: Upstream, redis_server: RedisServer) -> None:
    config = proxy_config(
        [upstream.url], redis_server.url, "batched", batch_ack="flush", batch_window_ms=5.0, command_timeout_ms=5000
    )
    async with proxy(config) as (gw, base):
        await _warm(base)
        seen = _spy(gw)
        reader, writer = await _open(base)
        _pause_redis(redis_server, 600)
        writer.write(b"GET /echo/held HTTP/1.1\r\nHost: x\r\n\r\n")
        # The upstream answered (its connection is back in the pool) while the response is held.
        await eventually(lambda: _server(gw, upstream.port)["responses"].get("2xx") == 2)
        assert _server(gw, upstream.port)["connections"]["in_use"] == 0
        assert seen == Counter({"fast": 1})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.1)  # nothing was sent yet
        _abort_with_reset(writer)
        await eventually(lambda: gw.stats()["requests"]["in_flight"] == 0, timeout=5)
        assert redis_server.client().get("ip:127.0.0.1") == b"2"
        # The connection that served the held response is reused, and the next answer is its own.
        async with aiohttp.ClientSession() as s:
            for i in range(3):
                async with s.get(base + f"/echo/next{i}") as r:
                    assert r.status == 200 and (await r.json())["path"] == f"/echo/next{i}"
        # (The idle connection may have been aged by the pool's sweeper during the pause: an aged
        # one is checked out on the general path, so not every request here is a fast one.)
        assert seen["fast"] >= 2
        assert _server(gw, upstream.port)["connections"]["created"] == 1
        assert gw.stats()["upstream"]["errors"] == {}
        _pool_clean(gw)
    assert redis_server.client().get("ip:127.0.0.1") == b"5"


async def test_held_response_larger_than_the_held_buffer_leaves_the_connection_reading(
    redis_server: RedisServer,
) -> None:
    # A response held by the flush beyond HELD_BUFFER pauses its upstream connection. When the
    # whole response came in that same read, the exchange ended and the connection went back to
    # the pool still paused: the next request on it had its response left unread until its own
    # flush settled, and a flush slower than the head timeout made that a 504 (the connection
    # discarded, the server counted as failing) although the upstream had answered at once.
    body = b"h" * 150_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            path = head.split(b" ")[1]
            payload = path + b"\n" + body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        config = proxy_config(
            [up.url],
            redis_server.url,
            "batched",
            batch_ack="flush",
            batch_window_ms=5.0,
            command_timeout_ms=5000,
            upstream_response_timeout_s=0.5,
            upstream_max_fails=100,
        )
        async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
            async with s.get(base + "/r0") as r:  # held past HELD_BUFFER, read whole in one read
                assert r.status == 200 and await r.read() == b"/r0\n" + body
            seen = _spy(gw)
            for i in (1, 2):
                _pause_redis(redis_server, 900)  # the flush takes longer than the head timeout
                started = time.monotonic()
                async with s.get(base + f"/r{i}") as r:
                    data = await r.read()
                    assert r.status == 200, data[:100]
                assert data == b"/r%d\n" % i + body
                assert time.monotonic() - started >= 0.7  # held until the flush settled
            # /r1 on the fast path; /r2 too unless the pool's sweeper aged the idle connection
            # meanwhile (an aged one is checked out on the general path): the same defect either way.
            assert seen["fast"] >= 1
            assert gw.stats()["upstream"]["errors"] == {}
            assert up.connections == 1
            _pool_clean(gw)
    finally:
        await up.stop()


# -- pipelining ----------------------------------------------------------------------------------------


async def test_pipelined_gets_answered_in_order(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        await _warm(base)
        seen = _spy(gw)
        paths = [f"/echo/p{i}?k={i * 7}" for i in range(8)]
        payload = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths)
        payload += b"GET /echo/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = await raw_exchange(base, payload)
        responses = parse_responses(reply, [b"GET"] * 9)
        assert [json.loads(b)["path"] for _, _, b in responses] == [*paths, "/echo/last"]
        assert all(status == 200 for status, _, _ in responses)
        assert responses[-1][1][b"connection"] == b"close"
        assert seen == Counter({"fast": 9})
        _pool_clean(gw)


async def test_pipelined_post_between_gets(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        await _warm(base)
        seen = _spy(gw)
        payload = (
            b"GET /echo/g1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo/p1 HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
            b"GET /echo/g2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo/p2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
            b"HEAD /echo/h1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo/g3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        reply = await raw_exchange(base, payload)
        methods = [b"GET", b"POST", b"GET", b"POST", b"HEAD", b"GET"]
        responses = parse_responses(reply, methods)
        assert [s for s, _, _ in responses] == [200] * 6
        infos = [json.loads(b) if m != b"HEAD" else None for m, (_, _, b) in zip(methods, responses, strict=True)]
        assert [i["path"] for i in infos if i] == ["/echo/g1", "/echo/p1", "/echo/g2", "/echo/p2", "/echo/g3"]
        assert infos[1]["size"] == 11 and infos[1]["method"] == "POST"
        assert infos[3]["size"] == 4 and infos[3]["chunked"]
        assert int(responses[4][1][b"content-length"]) > 0  # HEAD: the length, no body
        # The GETs and the HEAD found an idle connection; the POSTs went the general way, and so did
        # the GET after the HEAD (a response to HEAD costs its connection: no idle one was left).
        assert seen == Counter({"fast": 3, "slow": 3})
        _pool_clean(gw)


async def test_pipelined_no_body_responses_then_get(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        await _warm(base)
        seen = _spy(gw)
        payload = (
            b"HEAD /data?n=1000 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /status/304 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /data?n=5&framing=chunked HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /data?n=70000&framing=chunked HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo/end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        reply = await raw_exchange(base, payload)
        methods = [b"HEAD", b"GET", b"GET", b"HEAD", b"GET", b"GET"]
        responses = parse_responses(reply, methods)
        assert [s for s, _, _ in responses] == [200, 204, 304, 200, 200, 200]
        assert responses[0][1][b"content-length"] == b"1000"
        assert responses[4][2] == b"x" * 70000
        assert json.loads(responses[5][2])["path"] == "/echo/end"
        assert seen["fast"] >= 3  # HEAD costs its connection (no reuse), so some connect again
        _pool_clean(gw)


# -- stale connections -----------------------------------------------------------------------------------


def _closes_on_reuse(answered: list[bytes]) -> RawUpstream:
    """Answers the first request of each connection, then closes it when the next one comes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        if b"Content-Length: " in head:
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        line = head.split(b"\r\n")[0]
        answered.append(line)
        path = line.split(b" ")[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
        await writer.drain()
        await reader.read(1)

    return RawUpstream(handler)


async def test_stale_connection_on_the_fast_path() -> None:
    answered: list[bytes] = []
    up = await _closes_on_reuse(answered).start()
    try:
        async with proxy(proxy_config([up.url], upstream_max_fails=1000)) as (gw, base):
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/one") as r:
                    assert await r.read() == b"/one"
                seen = _spy(gw)
                for path in ("/two", "/three"):
                    async with s.get(base + path) as r:  # reuses a connection that closes: retried
                        assert r.status == 200 and await r.read() == path.encode()
                assert seen == Counter({"fast": 2, "slow": 2})  # each retried on the general path
                async with s.post(base + "/five", data=b"abc") as r:  # reuses, closed: never replayed
                    assert r.status == 502
                async with s.get(base + "/six") as r:  # connects anew
                    assert await r.read() == b"/six"
                async with s.head(base + "/four") as r:  # reuses, closed: HEAD is idempotent, retried
                    assert r.status == 200 and r.headers["Content-Length"] == "5"
                async with s.get(base + "/seven") as r:  # the HEAD's connection was not kept: a new one
                    assert await r.read() == b"/seven"
            stats = gw.stats()["upstream"]
            assert stats["retries"] == 3
            assert stats["errors"]["stale_connection"] == 4
            assert seen["fast"] == 3  # /two, /three and /four found an idle connection
            _pool_clean(gw)
        assert b"POST /five HTTP/1.1" not in answered
        assert answered == [
            b"GET /one HTTP/1.1",
            b"GET /two HTTP/1.1",
            b"GET /three HTTP/1.1",
            b"GET /six HTTP/1.1",
            b"HEAD /four HTTP/1.1",
            b"GET /seven HTTP/1.1",
        ]
    finally:
        await up.stop()


async def test_pipelined_gets_against_an_upstream_closing_after_each_answer() -> None:
    # The upstream closes right after each answer without saying so: the next pipelined request
    # is sent at once, on callbacks, on the connection about to close. Every GET must still get
    # its own answer.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        path = head.split(b" ")[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
        await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url], upstream_max_fails=1000)) as (gw, base):
            paths = [b"/q%d" % i for i in range(10)]
            payload = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths)
            payload += b"GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            reply = await raw_exchange(base, payload)
            responses = parse_responses(reply, [b"GET"] * 11)
            assert [(s, b) for s, _, b in responses] == [(200, p) for p in [*paths, b"/end"]]
            stats = gw.stats()["upstream"]
            assert stats["errors"].get("stale_connection", 0) == stats["retries"]
            _pool_clean(gw)
    finally:
        await up.stop()


# -- timeouts on the fast path ------------------------------------------------------------------------------


async def test_head_timeout_on_the_fast_path(upstream: Upstream) -> None:
    config = proxy_config([upstream.url], upstream_response_timeout_s=0.3, upstream_max_fails=100)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        await _warm(base)
        seen = _spy(gw)
        started = time.monotonic()
        async with s.get(base + "/slow?s=1.5") as r:
            assert r.status == 504
        assert 0.25 < time.monotonic() - started < 1.0
        assert seen == Counter({"fast": 1})
        server = _server(gw, upstream.port)
        assert server["errors"]["response_timeout"] == 1
        assert server["connections"]["discarded"] == 1 and server["connections"]["open"] == 0
        async with s.get(base + "/echo/after") as r:
            assert r.status == 200 and (await r.json())["path"] == "/echo/after"
        _pool_clean(gw)


async def test_heads_awaited_each_time_out_on_their_own_deadline(upstream: Upstream) -> None:
    # One timer serves every head awaited: staggered requests must each get their 504 at their own
    # deadline, and a quick one among them its 200.
    timeout = 0.5
    config = proxy_config([upstream.url], upstream_response_timeout_s=timeout, upstream_max_fails=100)
    async with proxy(config) as (gw, base):
        await _warm(base, 4)
        seen = _spy(gw)
        async with aiohttp.ClientSession() as s:

            async def get(path: str, delay: float) -> tuple[int, float, bytes]:
                await asyncio.sleep(delay)
                started = time.monotonic()
                async with s.get(base + path) as r:
                    body = await r.read()
                    return r.status, time.monotonic() - started, body

            results = await asyncio.gather(
                get("/slow?s=2", 0.0), get("/slow?s=2", 0.15), get("/echo/quick", 0.2), get("/slow?s=2", 0.3)
            )
        for status, elapsed, _ in (results[0], results[1], results[3]):
            assert status == 504
            assert timeout - 0.05 < elapsed < timeout + 0.3, elapsed
        status, elapsed, body = results[2]
        assert status == 200 and json.loads(body)["path"] == "/echo/quick" and elapsed < 0.3
        assert seen == Counter({"fast": 4})
        assert gw.stats()["upstream"]["errors"]["response_timeout"] == 3
        _pool_clean(gw)


async def test_head_timeout_then_pipelined_request(upstream: Upstream) -> None:
    # The timeout ends the first exchange inside the timer's callback, which starts the next
    # pipelined one (a head awaited added while the timer walks the heads awaited).
    config = proxy_config([upstream.url], upstream_response_timeout_s=0.3, upstream_max_fails=100)
    async with proxy(config) as (gw, base):
        await _warm(base, 2)
        seen = _spy(gw)
        started = time.monotonic()
        reply = await raw_exchange(
            base,
            b"GET /slow?s=2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /slow?s=2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo/third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        elapsed = time.monotonic() - started
        responses = parse_responses(reply, [b"GET"] * 3)
        assert [s for s, _, _ in responses] == [504, 504, 200]
        assert json.loads(responses[2][2])["path"] == "/echo/third"
        assert 0.55 < elapsed < 1.5, elapsed
        assert seen["fast"] >= 2
        _pool_clean(gw)


async def test_body_idle_timeout_on_the_fast_path(upstream: Upstream) -> None:
    config = proxy_config([upstream.url], upstream_body_timeout_s=0.3, upstream_max_fails=100)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        await _warm(base)
        seen = _spy(gw)
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(base + "/stall-body?s=1.5") as r:
                assert r.status == 200
                await r.read()
        assert 0.25 < time.monotonic() - started < 1.0
        assert seen == Counter({"fast": 1})
        server = _server(gw, upstream.port)
        assert server["errors"]["body_timeout"] == 1
        assert server["connections"]["discarded"] == 1
        async with s.get(base + "/echo/after") as r:
            assert r.status == 200 and (await r.json())["path"] == "/echo/after"
        await _settled(gw)


async def test_slow_but_steady_body_is_not_timed_out() -> None:
    # Bytes every 0.1 s for well over the body timeout: the idleness deadline moves with them.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            path = head.split(b" ")[1]
            if path == b"/drip":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
                for _ in range(12):
                    await asyncio.sleep(0.1)
                    writer.write(b"d")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        config = proxy_config([up.url], upstream_body_timeout_s=0.3, upstream_response_timeout_s=0.5)
        async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
            async with s.get(base + "/warm") as r:
                assert await r.read() == b"ok"
            seen = _spy(gw)
            async with s.get(base + "/drip") as r:
                assert await r.read() == b"d" * 12
            async with s.get(base + "/again") as r:
                assert await r.read() == b"ok"
            assert seen == Counter({"fast": 2})
            assert gw.stats()["upstream"]["errors"] == {}
            assert up.connections == 1
            _pool_clean(gw)
    finally:
        await up.stop()


# -- odd responses ---------------------------------------------------------------------------------------------


async def test_malformed_response_on_a_reused_connection_is_502_not_retried() -> None:
    answered: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while True:
            head = await read_head(reader)
            answered.append(head.split(b"\r\n")[0])
            n += 1
            if n == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url], upstream_max_fails=100)) as (gw, base), aiohttp.ClientSession() as s:
            async with s.get(base + "/a") as r:
                assert await r.read() == b"ok"
            seen = _spy(gw)
            async with s.get(base + "/b") as r:
                assert r.status == 502
            async with s.get(base + "/c") as r:
                assert r.status == 200 and await r.read() == b"ok"
            assert seen == Counter({"fast": 1, "slow": 1})  # /c connects anew
            stats = gw.stats()["upstream"]
            assert stats["errors"]["protocol"] == 1 and stats["retries"] == 0
            _pool_clean(gw)
        assert answered == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1", b"GET /c HTTP/1.1"]
        assert up.connections == 2
    finally:
        await up.stop()


@pytest.mark.parametrize("framing", ["length", "chunked", "interim-then-length"])
async def test_response_split_at_every_byte(framing: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            path = head.split(b" ")[1]
            body = path + b"|" + b"b" * 40
            if framing == "chunked":
                response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-P: %s\r\n\r\n" % path
                response += b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:7], body[7:20], body[20:]))
                response += b"0\r\nX-Trailer: t\r\n\r\n"
            else:
                response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-P: %s\r\n\r\n%s" % (len(body), path, body)
                if framing == "interim-then-length":
                    response = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + response
            for i in range(len(response)):
                writer.write(response[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            reply = await raw_exchange(base, b"GET /w HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert parse_responses(reply, [b"GET"])[0][2] == b"/w|" + b"b" * 40
            seen = _spy(gw)
            paths = [b"/s%d" % i for i in range(4)]
            payload = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths)
            reply = await raw_exchange(base, payload + b"GET /s9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            responses = parse_responses(reply, [b"GET"] * 5)
            for (status, fields, body), path in zip(responses, [*paths, b"/s9"], strict=True):
                assert status == 200
                assert fields[b"x-p"] == path
                assert body == path + b"|" + b"b" * 40
            assert seen == Counter({"fast": 5})
            assert up.connections == 1
            assert gw.stats()["upstream"]["errors"] == {}
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_chunked_response_with_extensions_and_trailers_on_the_fast_path() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            path = head.split(b" ")[1]
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                b"%x;ext=1\r\n%s\r\n3\r\n-ok\r\n0\r\nX-Sum: 1\r\n\r\n" % (len(path), path)
            )
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            await _warm(base)
            seen = _spy(gw)
            paths = [b"/c%d" % i for i in range(5)]
            payload = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths)
            reply = await raw_exchange(base, payload + b"GET /cz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            responses = parse_responses(reply, [b"GET"] * 6)
            assert [b for _, _, b in responses] == [p + b"-ok" for p in [*paths, b"/cz"]]
            assert all(b"trailer" not in f for _, f, _ in responses)  # hop-by-hop: not passed on
            assert seen == Counter({"fast": 6})
            assert up.connections == 1
            _pool_clean(gw)
    finally:
        await up.stop()


@pytest.mark.parametrize("closes", [True, False], ids=["and-closes", "but-stays-open"])
async def test_upstream_connection_close_response(closes: bool) -> None:
    # `Connection: close` from the upstream: that connection is never reused (even if the upstream
    # leaves it open), the field does not reach the client, whose connection stays open.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            path = head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
            await writer.drain()
            if closes:
                return

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            seen = _spy(gw)
            paths = [b"/k%d" % i for i in range(5)]
            payload = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths)
            reader, writer = await _open(base)
            try:
                writer.write(payload)
                data = b""
                while data.count(b"HTTP/1.1 200") < 5 or not data.endswith(b"/k4"):
                    chunk = await asyncio.wait_for(reader.read(65536), 5)
                    assert chunk, data
                    data += chunk
                responses = parse_responses(data, [b"GET"] * 5)
                assert [b for _, _, b in responses] == paths
                assert all(b"connection" not in f for _, f, _ in responses)
                writer.write(b"GET /more HTTP/1.1\r\nHost: x\r\n\r\n")  # the client connection is still open
                more = await asyncio.wait_for(reader.readuntil(b"/more"), 5)
                assert more.startswith(b"HTTP/1.1 200 OK")
            finally:
                writer.transport.abort()
            assert up.connections == 6
            assert seen["fast"] == 0  # never an idle connection to reuse
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_read_until_close_response_on_a_reused_connection() -> None:
    # A kept-alive connection whose second response has no framing: its body ends with the close.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        head = await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + head.split(b" ")[1] + b"-until-close")
        await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base), aiohttp.ClientSession() as s:
            async with s.get(base + "/first") as r:
                assert await r.read() == b"ok"
            seen = _spy(gw)
            async with s.get(base + "/second") as r:
                assert r.headers["Transfer-Encoding"] == "chunked"
                assert await r.read() == b"/second-until-close"
            async with s.get(base + "/third") as r:  # a new connection
                assert await r.read() == b"ok"
            assert seen == Counter({"fast": 1, "slow": 1})
            assert gw.stats()["upstream"]["errors"] == {}
            _pool_clean(gw)
    finally:
        await up.stop()


# -- no crossed answers ------------------------------------------------------------------------------------------


async def test_no_request_gets_another_ones_response(upstream: Upstream, redis_server: RedisServer) -> None:
    # Many clients, each with its own paths, on kept-alive and pipelined connections, while others
    # leave mid-exchange and some exchanges time out: every answer is the one asked for.
    config = proxy_config(
        [upstream.url],
        redis_server.url,
        "batched",
        batch_ack="flush",
        batch_window_ms=2.0,
        upstream_response_timeout_s=0.25,
        upstream_maxconn=6,
        upstream_max_fails=10_000,
    )
    rng = random.Random(7)
    async with proxy(config) as (gw, base):
        await _warm(base, 6)
        seen = _spy(gw)
        wrong: list[tuple[str, str]] = []
        statuses: Counter[int] = Counter()

        async def keepalive_client(c: int) -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                for i in range(25):
                    path = f"/echo/c{c}/r{i}"
                    if rng.random() < 0.1:
                        path = f"/slow?s=0.4&c={c}&i={i}"  # times out: 504
                    async with s.get(base + path) as r:
                        statuses[r.status] += 1
                        if r.status == 200:
                            got = (await r.json())["path"]
                            if got != path:
                                wrong.append((path, got))

        async def pipelining_client(c: int) -> None:
            for round_ in range(4):
                paths = [f"/echo/pc{c}/{round_}/{i}" for i in range(6)]
                payload = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths)
                payload += b"GET /echo/pc-end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                reply = await raw_exchange(base, payload)
                responses = parse_responses(reply, [b"GET"] * 7)
                for (status, _, body), path in zip(responses, [*paths, "/echo/pc-end"], strict=True):
                    statuses[status] += 1
                    if json.loads(body)["path"] != path:
                        wrong.append((path, json.loads(body)["path"]))

        async def leaving_client(c: int) -> None:
            for i in range(10):
                reader, writer = await _open(base)
                writer.write(b"GET /data?n=3000000&c=%d&i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (c, i))
                if i % 2:
                    await reader.readexactly(rng.randrange(1, 200_000))
                else:
                    await asyncio.sleep(rng.random() * 0.01)
                _abort_with_reset(writer)

        await asyncio.gather(
            *(keepalive_client(c) for c in range(4)),
            *(pipelining_client(c) for c in range(2)),
            *(leaving_client(c) for c in range(2)),
        )
        assert wrong == []
        assert set(statuses) <= {200, 504}, statuses
        assert statuses[200] >= 100 + 56 - 20
        assert seen["fast"] > 50
        await _settled(gw)
        assert gw.stats()["upstream"]["errors"].keys() <= {"response_timeout"}
