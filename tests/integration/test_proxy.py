"""The proxy action against real upstream servers (an aiohttp app) and raw ones for faults."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import socket
import struct
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.config import ConfigError, parse_networks
from gateway.limit.algorithms import parse_rate

from ..helpers import FakeRedis, RedisServer, eventually
from ..proxy_helpers import (
    RawUpstream,
    Upstream,
    body_json,
    proxy,
    proxy_config,
    raw_exchange,
    read_head,
)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await Upstream("a").start()
    yield up
    await up.stop()


@pytest.fixture
async def upstream_b() -> AsyncIterator[Upstream]:
    up = await Upstream("b").start()
    yield up
    await up.stop()


def _pool_clean(gw: object) -> None:
    """No upstream connection is left checked out, and no request is left waiting."""
    for name, s in gw.stats()["upstream"]["servers"].items():  # type: ignore[attr-defined]
        assert s["connections"]["in_use"] == 0, name
        assert s["queue"] == 0, name
        assert s["in_flight"] == 0, name


# -- the request path: accounting first, then forward --------------------------------------------------


async def test_counted_then_forwarded(upstream: Upstream, redis_server: RedisServer, redis_mode: str) -> None:
    # Every accounting mode: those whose path needs an asyncio Task (redis-py's) and those that do not.
    async with proxy(proxy_config([upstream.url], redis_server.url, redis_mode)) as (gw, base):
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(base + "/echo/x?y=1", allow_redirects=False) as r:
                    assert r.status == 200
                    info = await r.json()
                    assert info["path"] == "/echo/x?y=1"
                    assert r.headers["X-Server"] == "a"
                    assert "Location" not in r.headers
        assert gw.stats()["requests"]["counted"] == 3
        _pool_clean(gw)
    assert redis_server.client().get("ip:127.0.0.1") == b"3"


async def test_deny_policy_answers_503_without_forwarding() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_head(reader))

    up = await RawUpstream(handler).start()
    try:
        # Nothing listens at this Redis address: every increment fails.
        config = proxy_config([up.url], "redis://127.0.0.1:1/0", "raw", on_redis_error="deny")
        async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
            async with s.get(base + "/echo") as r:
                assert r.status == 503
                assert "Retry-After" in r.headers
            assert gw.stats()["upstream"]["requests"] == 0
        assert up.connections == 0 and seen == []
    finally:
        await up.stop()


async def test_batched_flush_holds_the_upstream_response(upstream: Upstream, redis_server: RedisServer) -> None:
    config = proxy_config([upstream.url], redis_server.url, "batched", batch_ack="flush", batch_window_ms=300.0)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.get(base + "/echo") as r:
            # The response is out only once the increment is in Redis.
            assert redis_server.client().get("ip:127.0.0.1") == b"1"
            assert r.status == 200
            assert (await r.json())["server"] == "a"
        assert time.monotonic() - started >= 0.2
        assert gw.stats()["upstream"]["requests"] == 1


async def test_batched_without_ack_forwards_at_once(upstream: Upstream, redis_server: RedisServer) -> None:
    config = proxy_config([upstream.url], redis_server.url, "batched", batch_ack="none", batch_window_ms=60_000.0)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(base + "/echo") as r:
                assert r.status == 200
        # Forwarded without waiting for the flush (a minute away), and without a coroutine.
        assert redis_server.client().get("ip:127.0.0.1") is None
        assert gw.pipeline.via_coroutine == 0
        assert gw.stats()["requests"]["counted"] == 3
    assert redis_server.client().get("ip:127.0.0.1") == b"3"  # flushed at close


async def test_batched_without_ack_deny_refuses_without_forwarding(
    upstream: Upstream, redis_server: RedisServer
) -> None:
    # One key may wait for the flush (a minute away): the second client's increment overflows.
    trusted = parse_networks(["127.0.0.1"])
    config = proxy_config([upstream.url], redis_server.url, "batched", batch_ack="none", batch_window_ms=60_000.0,
                          batch_max_pending=1, on_redis_error="deny", trusted_proxies=trusted)  # fmt: skip
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        statuses = []
        for ip in ("10.7.0.1", "10.7.0.2"):
            async with s.get(base + "/echo", headers={"X-Forwarded-For": ip}) as r:
                statuses.append(r.status)
        assert statuses == [200, 503]
        assert gw.stats()["upstream"]["requests"] == 1


async def test_aiohttp_front_end_refuses_upstream() -> None:
    with pytest.raises(ConfigError, match="httptools"):
        proxy_config(["http://127.0.0.1:9"], http="aiohttp")


# -- bodies, every framing, both ways ------------------------------------------------------------------


@pytest.mark.parametrize("request_framing", ["none", "length", "chunked"])
@pytest.mark.parametrize("response_framing", ["length", "chunked"])
async def test_bodies_of_every_framing(upstream: Upstream, request_framing: str, response_framing: str) -> None:
    payload = bytes(range(256)) * 1000
    async with proxy(proxy_config([upstream.url], max_body_bytes=10_000_000)) as (gw, base):
        async with aiohttp.ClientSession() as s:
            if request_framing == "none":
                req = s.get(base + "/echo")
            elif request_framing == "length":
                req = s.post(base + "/echo", data=payload)
            else:

                async def gen() -> AsyncIterator[bytes]:
                    for i in range(0, len(payload), 10_000):
                        yield payload[i : i + 10_000]

                req = s.post(base + "/echo", data=gen())
            async with req as r:
                info = await r.json()
                assert r.status == 200
            if request_framing != "none":
                assert info["size"] == len(payload)
                assert info["sha256"] == hashlib.sha256(payload).hexdigest()
                assert info["chunked"] == (request_framing == "chunked")
            async with s.get(base + f"/data?n=300000&framing={response_framing}") as r:
                body = await r.read()
                assert body == b"x" * 300000
                if response_framing == "chunked":
                    assert r.headers["Transfer-Encoding"] == "chunked"
                else:
                    assert r.headers["Content-Length"] == "300000"
        _pool_clean(gw)


async def test_read_until_close_response_and_http10_client() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Framing: close\r\n\r\n" + b"z" * 5000)
        await writer.drain()
        writer.close()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            # HTTP/1.1 client: re-chunked, and the client connection stays usable.
            reply = await raw_exchange(base, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n", 2)
            assert reply.count(b"HTTP/1.1 200 OK") == 2
            assert b"Transfer-Encoding: chunked" in reply
            assert reply.endswith(b"0\r\n\r\n")
            # HTTP/1.0 client: the body ends with the close.
            reply = await raw_exchange(base, b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n")
            head, body = reply.split(b"\r\n\r\n", 1)
            assert b"Transfer-Encoding" not in head and body == b"z" * 5000
            assert b"Connection: close" in head
            assert up.connections == 3  # read-until-close connections are never reused
            _pool_clean(gw)
    finally:
        await up.stop()


@pytest.mark.parametrize("line", [b"HEAD /data?n=1000", b"GET /status/204", b"GET /status/304"])
async def test_no_body_responses(upstream: Upstream, line: bytes) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        # A second request follows on the same client connection: the first had no body to mistake for it.
        reply = await raw_exchange(
            base, line + b" HTTP/1.1\r\nHost: x\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        first, rest = reply.split(b"\r\n\r\n", 1)
        assert rest.startswith(b"HTTP/1.1 200 OK"), reply[:300]
        if line.startswith(b"HEAD"):
            assert b"Content-Length: 1000" in first
        _pool_clean(gw)


async def test_a_204_with_a_body_reaches_the_client_without_it_or_its_length_and_is_not_reused() -> None:
    # An upstream that frames a 204 as if it had a body: the body is dropped (the 204 has none),
    # so the length must go too, or a client that reads it waits for bytes that never come. The
    # announced bytes come later, shaped like a response: on a reused connection they would be
    # read as the next request's answer.
    late = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTOLEN"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            if b"/204" in head.split(b"\r\n", 1)[0]:
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\nX-Kept: yes\r\n\r\n" % len(late))
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(late)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            # Pipelined: the second request is forwarded as soon as the 204 is in, before its late bytes.
            reply = await raw_exchange(
                base, b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            first, rest = reply.split(b"\r\n\r\n", 1)
            assert first.startswith(b"HTTP/1.1 204") and b"X-Kept: yes" in first
            assert b"content-length" not in first.lower(), first
            assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"\r\n\r\nok"), reply
            assert b"STOLEN" not in reply and up.connections == 2
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_a_1xx_with_content_is_a_502_and_none_of_it_reaches_the_client() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 150 Odd\r\nContent-Length: 7\r\n\r\nGARBAGE")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            reply = await raw_exchange(base, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 502"), reply
            assert b"GARBAGE" not in reply
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_large_bodies_stream_with_bounded_memory(upstream: Upstream) -> None:
    size = 50 * 1024 * 1024
    block = b"q" * (1024 * 1024)

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    async with proxy(proxy_config([upstream.url], max_body_bytes=size)) as (gw, base):
        async with aiohttp.ClientSession() as s:
            tracemalloc.start()
            try:
                async with s.post(base + "/echo", data=gen()) as r:
                    info = await r.json()
                upload_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.reset_peak()
                got = 0
                async with s.get(base + f"/data?n={size}&framing=chunked") as r:
                    async for chunk in r.content.iter_any():
                        got += len(chunk)
                download_peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert info["size"] == size
        assert got == size
        # Client, gateway and upstream share this process: all of it stays far below the body's size.
        assert upload_peak < 16 * 1024 * 1024, upload_peak
        assert download_peak < 16 * 1024 * 1024, download_peak
        _pool_clean(gw)


# -- header rules ----------------------------------------------------------------------------------------


async def test_hop_by_hop_fields_are_stripped(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (_gw, base):
        reply = await raw_exchange(
            base,
            b"GET /echo HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, X-Private\r\n"
            b"X-Private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
            b"Trailer: X-T\r\nX-Kept: yes\r\n\r\n",
            1,
        )
        sent = {k.lower(): v for k, v in body_json(reply)["headers"]}
        for name in ("connection", "x-private", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"):
            assert name not in sent, name
        assert sent["x-kept"] == "yes"
        assert sent["host"] == "example.test"
        assert sent["x-forwarded-host"] == "example.test"
        assert sent["x-forwarded-proto"] == "http"
        # The upstream's own hop-by-hop fields (X-Hop is named in its Connection) do not reach the client.
        async with aiohttp.ClientSession() as s, s.get(base + "/data?n=10") as r:
            assert "X-Hop" not in r.headers and "Keep-Alive" not in r.headers
            assert r.headers["X-Server"] == "a"


@pytest.mark.parametrize("trusted", [False, True])
async def test_x_forwarded_for(upstream: Upstream, redis_server: RedisServer, trusted: bool) -> None:
    extra = {"trusted_proxies": __import__("gateway.config").config.parse_networks(["127.0.0.0/8"])} if trusted else {}
    async with proxy(proxy_config([upstream.url], redis_server.url, "raw", **extra)) as (_gw, base):
        headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "front.test"}
        async with aiohttp.ClientSession() as s, s.get(base + "/echo", headers=headers) as r:
            sent = {k.lower(): v for k, v in (await r.json())["headers"]}
    if trusted:
        assert sent["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
        assert sent["x-forwarded-proto"] == "https"
        assert sent["x-forwarded-host"] == "front.test"
        assert redis_server.client().get("ip:203.0.113.7") == b"1"
    else:
        # An untrusted peer's chain could say anything: it is replaced by the peer.
        assert sent["x-forwarded-for"] == "127.0.0.1"
        assert sent["x-forwarded-proto"] == "http"
        assert sent["x-forwarded-host"].startswith("127.0.0.1:")
        assert redis_server.client().get("ip:127.0.0.1") == b"1"


@pytest.mark.parametrize(
    "payload",
    [
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"GET /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    ],
    ids=["cl-te", "two-lengths", "te-not-chunked", "two-hosts"],
)
async def test_smuggling_shapes_never_reach_the_upstream(payload: bytes) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_head(reader))

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (_gw, base):
            reply = await raw_exchange(base, payload, 2)
            assert reply.startswith(b"HTTP/1.1 4"), reply[:100]
        assert seen == [] and up.connections == 0
    finally:
        await up.stop()


async def test_upgrade_gets_501(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        reply = await raw_exchange(
            base,
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            2,
        )
        assert reply.startswith(b"HTTP/1.1 501"), reply[:100]
        assert b"not supported" in reply
        assert gw.stats()["upstream"]["requests"] == 0


@pytest.mark.parametrize(
    "response",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    ],
    ids=["garbage", "two-lengths", "bad-length"],
)
async def test_malformed_upstream_response_is_502_and_dropped(response: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(response)
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url], upstream_max_fails=100)) as (gw, base):
            async with aiohttp.ClientSession() as s:
                for _ in range(2):
                    async with s.get(base + "/x") as r:
                        assert r.status == 502
            stats = gw.stats()["upstream"]["servers"][f"127.0.0.1:{up.port}"]
            assert stats["errors"]["protocol"] == 2
            assert stats["connections"]["open"] == 0
            _pool_clean(gw)
        assert up.connections == 2  # each malformed response cost its connection
    finally:
        await up.stop()


async def test_malformed_body_after_the_head_cuts_the_client() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base), aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(base + "/x") as r:
                    assert r.status == 200  # the head was on its way before the body broke
                    await r.read()
            assert gw.stats()["upstream"]["errors"]["protocol"] == 1
            _pool_clean(gw)
    finally:
        await up.stop()


# -- timeouts ----------------------------------------------------------------------------------------------


async def test_response_head_timeout_is_504(upstream: Upstream) -> None:
    config = proxy_config([upstream.url], upstream_response_timeout_s=0.3, upstream_max_fails=100)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.get(base + "/slow?s=1.5") as r:
            assert r.status == 504
        assert time.monotonic() - started < 2
        assert gw.stats()["upstream"]["errors"]["response_timeout"] == 1
        async with s.get(base + "/echo") as r:
            assert r.status == 200
        _pool_clean(gw)


async def test_body_idle_timeout_cuts_the_response(upstream: Upstream) -> None:
    config = proxy_config([upstream.url], upstream_body_timeout_s=0.3, upstream_max_fails=100)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(base + "/stall-body?s=1.5") as r:
                assert r.status == 200
                await r.read()
        assert time.monotonic() - started < 2
        assert gw.stats()["upstream"]["errors"]["body_timeout"] == 1
        _pool_clean(gw)


async def test_request_body_timeout_when_the_upstream_stops_reading() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(5)  # never reads the body

    up = await RawUpstream(handler).start()
    try:
        config = proxy_config([up.url], upstream_body_timeout_s=0.3, max_body_bytes=100_000_000)
        async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
            started = time.monotonic()
            try:
                async with s.post(base + "/echo", data=b"u" * 30_000_000) as r:
                    assert r.status == 504
            except aiohttp.ClientError:
                pass  # the gateway may close while the client is still sending: also an answer in bound
            assert time.monotonic() - started < 3
            assert gw.stats()["upstream"]["errors"]["body_timeout"] == 1
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_connect_timeout_answers_within_bound() -> None:
    # A listener that never accepts, its accept queue full: further connects hang (SYNs dropped).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    try:
        config = proxy_config([f"http://127.0.0.1:{port}"], upstream_connect_timeout_ms=200.0)
        async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
            started = time.monotonic()
            async with s.get(base + "/echo") as r:
                assert r.status == 502
            assert time.monotonic() - started < 1.5
            assert gw.stats()["upstream"]["errors"]["connect"] == 1
    finally:
        for c in fillers:
            c.close()
        listener.close()


# -- retries -----------------------------------------------------------------------------------------------


async def test_connect_failure_is_redispatched(upstream: Upstream) -> None:
    dead = "http://127.0.0.1:1"  # refused
    async with proxy(proxy_config([dead, upstream.url], upstream_max_fails=1000)) as (gw, base):
        async with aiohttp.ClientSession() as s:
            for method in ("GET", "POST", "GET", "POST"):
                async with s.request(method, base + "/echo", data=b"b" if method == "POST" else None) as r:
                    assert r.status == 200
                    assert (await r.json())["server"] == "a"
        stats = gw.stats()["upstream"]
        assert stats["retries"] >= 2
        assert stats["servers"]["127.0.0.1:1"]["errors"]["connect"] >= 1


def _stale_after_first(answered: list[bytes]) -> RawUpstream:
    """An upstream that answers the first request of a connection (keep-alive) and closes the
    connection without answering when a second request arrives on it: an idle close racing a reuse."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        if b"Content-Length: " in head:
            n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(n)
        answered.append(head.split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
        await reader.read(1)  # the next request's first byte: close without answering

    return RawUpstream(handler)


async def test_stale_keepalive_connection_retried_once_for_get_never_for_post() -> None:
    answered: list[bytes] = []
    up = await _stale_after_first(answered).start()
    try:
        async with proxy(proxy_config([up.url], upstream_max_fails=1000)) as (gw, base):
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/one") as r:
                    assert r.status == 200
                async with s.get(base + "/two") as r:  # reuses the connection, which closes: retried
                    assert r.status == 200
                async with s.post(base + "/three", data=b"abc") as r:  # reuses again: never replayed
                    assert r.status == 502
                async with s.get(base + "/four") as r:
                    assert r.status == 200
            stats = gw.stats()["upstream"]
            assert stats["retries"] == 1
            assert stats["errors"]["stale_connection"] == 2
            _pool_clean(gw)
        assert answered.count(b"POST /three HTTP/1.1") == 0
        assert answered == [b"GET /one HTTP/1.1", b"GET /two HTTP/1.1", b"GET /four HTTP/1.1"]
    finally:
        await up.stop()


async def test_keepalive_race_gives_no_client_errors() -> None:
    """An upstream closing idle connections after 50 ms while GETs arrive every 30-70 ms."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            try:
                async with asyncio.timeout(0.05):
                    head = await read_head(reader)
            except TimeoutError:
                return  # idle close, racing the gateway's reuse
            served += 1
            del head
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url], upstream_max_fails=1000)) as (gw, base):
            statuses: Counter[int] = Counter()
            async with aiohttp.ClientSession() as s:

                async def client(offset: float) -> None:
                    await asyncio.sleep(offset)
                    for i in range(25):
                        async with s.get(base + "/race") as r:
                            statuses[r.status] += 1
                        await asyncio.sleep(0.03 + (i % 5) * 0.01)

                await asyncio.gather(*(client(k * 0.007) for k in range(4)))
            assert statuses == Counter({200: 100})
            stats = gw.stats()["upstream"]
            assert stats["errors"].get("stale_connection", 0) == stats["retries"]
            _pool_clean(gw)
        assert served == 100
    finally:
        await up.stop()


# -- health, ejection, queueing -----------------------------------------------------------------------------


async def test_active_checks_take_a_server_down_and_up(upstream: Upstream) -> None:
    b = await Upstream("b").start()
    port = b.port
    config = proxy_config(
        [upstream.url, b.url],
        health_check_path="/health",
        health_check_interval_s=0.1,
        health_check_timeout_s=2.0,  # a slow check on a loaded machine is not a down server
        health_check_rise=2,
        health_check_fall=2,
    )
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        await b.stop()
        name = f"127.0.0.1:{port}"
        for _ in range(50):
            if gw.stats()["upstream"]["servers"][name]["state"] == "down":
                break
            await asyncio.sleep(0.05)
        assert gw.stats()["upstream"]["servers"][name]["state"] == "down"
        for _ in range(6):
            async with s.get(base + "/echo") as r:
                assert r.status == 200
                assert (await r.json())["server"] == "a"
        b = await Upstream("b").start(port)
        for _ in range(50):
            if gw.stats()["upstream"]["servers"][name]["state"] == "up":
                break
            await asyncio.sleep(0.05)
        assert gw.stats()["upstream"]["servers"][name]["state"] == "up"
        seen = set()
        for _ in range(4):
            async with s.get(base + "/echo") as r:
                seen.add((await r.json())["server"])
        assert seen == {"a", "b"}
    await b.stop()


async def test_passive_ejection_and_all_down_503(upstream: Upstream) -> None:
    dead = "http://127.0.0.1:1"
    config = proxy_config([dead, upstream.url], upstream_max_fails=2, upstream_fail_timeout_s=30.0)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(base + "/echo") as r:
                assert r.status == 200
        servers = gw.stats()["upstream"]["servers"]
        assert servers["127.0.0.1:1"]["state"] == "ejected"
        assert servers["127.0.0.1:1"]["ejections"] == 1
        # Once ejected, the dead server is not tried any more.
        attempts = servers["127.0.0.1:1"]["errors"]["connect"]
        for _ in range(4):
            async with s.get(base + "/echo") as r:
                assert r.status == 200
        assert gw.stats()["upstream"]["servers"]["127.0.0.1:1"]["errors"]["connect"] == attempts
        # The other one goes down too: 503 at once.
        await upstream.stop()
        for _ in range(3):
            async with s.get(base + "/echo") as r:
                assert r.status in (502, 503)
        started = time.monotonic()
        async with s.get(base + "/echo") as r:
            assert r.status == 503
            assert "Retry-After" in r.headers
        assert time.monotonic() - started < 0.5
        assert gw.stats()["upstream"]["errors"]["no_server"] >= 1


async def test_maxconn_queue_and_queue_timeout(upstream: Upstream) -> None:
    config = proxy_config([upstream.url], upstream_maxconn=1, upstream_queue_timeout_ms=200.0)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:

        async def get(path: str) -> int:
            async with s.get(base + path) as r:
                await r.read()
                return r.status

        slow = asyncio.ensure_future(get("/slow?s=0.6"))
        await asyncio.sleep(0.1)
        assert await get("/echo") == 503  # the one connection stays busy past the queue timeout
        assert await slow == 200
        stats = gw.stats()["upstream"]["servers"][f"127.0.0.1:{upstream.port}"]
        assert stats["queue_timeouts"] == 1
        assert stats["connections"]["open"] <= 1
    config = proxy_config([upstream.url], upstream_maxconn=2, upstream_queue_timeout_ms=5000.0)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        statuses = await asyncio.gather(*(get("/slow?s=0.1") for _ in range(8)))
        assert statuses == [200] * 8
        stats = gw.stats()["upstream"]["servers"][f"127.0.0.1:{upstream.port}"]
        assert stats["connections"]["created"] == 2  # queued requests reused the two connections
        _pool_clean(gw)


# -- balancing ----------------------------------------------------------------------------------------------


async def test_weighted_roundrobin(upstream: Upstream, upstream_b: Upstream) -> None:
    async with proxy(proxy_config([upstream.url + "?weight=3", upstream_b.url])) as (_gw, base):
        seen: Counter[str] = Counter()
        async with aiohttp.ClientSession() as s:
            for _ in range(40):
                async with s.get(base + "/echo") as r:
                    seen[(await r.json())["server"]] += 1
        assert seen == Counter({"a": 30, "b": 10})


async def test_leastconn_avoids_the_busy_server(upstream: Upstream, upstream_b: Upstream) -> None:
    async with proxy(proxy_config([upstream.url, upstream_b.url], balance="leastconn")) as (_gw, base):
        async with aiohttp.ClientSession() as s:

            async def get(path: str) -> str:
                async with s.get(base + path) as r:
                    return r.headers["X-Server"]

            busy = [asyncio.ensure_future(get("/slow?s=0.5")) for _ in range(3)]
            await asyncio.sleep(0.1)
            quick = [await get("/echo") for _ in range(5)]
            servers = await asyncio.gather(*busy)
        # The three slow ones spread 2/1; then each quick request goes to the server with fewer in flight.
        busier = Counter(servers).most_common(1)[0][0]
        assert busier not in quick


# -- the client goes away -------------------------------------------------------------------------------------


@pytest.mark.parametrize("acct", ["off", "pooled"])  # the exchange without a Task of its own, and in one
async def test_client_leaving_mid_response_discards_the_connection(
    upstream: Upstream, redis_server: RedisServer, acct: str
) -> None:
    async with proxy(proxy_config([upstream.url], redis_server.url, acct)) as (gw, base):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /data?n=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(1000)
        writer.transport.abort()
        for _ in range(100):
            conns = gw.stats()["upstream"]["servers"][f"127.0.0.1:{upstream.port}"]["connections"]
            if conns["in_use"] == 0:
                break
            await asyncio.sleep(0.02)
        assert conns["in_use"] == 0 and conns["idle"] == 0 and conns["discarded"] == 1
        async with aiohttp.ClientSession() as s, s.get(base + "/echo") as r:
            assert r.status == 200


async def test_stats_and_metrics_show_servers(upstream: Upstream) -> None:
    config = proxy_config([upstream.url], admin_listen=("127.0.0.1", 0))
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        async with s.get(base + "/status/503") as r:
            assert r.status == 503
        async with s.get(base + "/echo") as r:
            assert r.status == 200
        name = f"127.0.0.1:{upstream.port}"
        server = gw.stats()["upstream"]["servers"][name]
        assert server["responses"] == {"5xx": 1, "2xx": 1}
        assert server["requests"] == 2
        assert sum(server["latency_s"]["counts"]) == 2
        from gateway.metrics import exposition, registry_for

        text = exposition(registry_for(gw.stats)).decode()
        assert f'gateway_upstream_responses_total{{class="5xx",server="{name}"}} 1.0' in text
        assert f'gateway_upstream_up{{server="{name}"}} 1.0' in text
        assert "gateway_upstream_latency_seconds_bucket" in text


# -- request shapes -------------------------------------------------------------------------------------------


async def test_pipelined_requests_with_bodies_are_answered_in_order(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        reply = await raw_exchange(
            base,
            b"POST /echo/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /echo/2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            b"GET /echo/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert reply.count(b"HTTP/1.1 200 OK") == 3
        paths = [p for p in (b'"/echo/1"', b'"/echo/2"', b'"/echo/3"') if p in reply]
        assert paths == [b'"/echo/1"', b'"/echo/2"', b'"/echo/3"']
        assert reply.index(b'"/echo/1"') < reply.index(b'"/echo/2"') < reply.index(b'"/echo/3"')
        assert b'"size": 5' in reply and b'"size": 3' in reply
        _pool_clean(gw)


async def test_expect_continue_and_http10_keepalive(upstream: Upstream) -> None:
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        reply = await raw_exchange(
            base, b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi", 1
        )
        assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
        assert b'"size": 2' in reply and b"expect" not in reply.lower().split(b"\r\n\r\n", 2)[2]
        # Pipelined behind a slow answer, the 100 Continue comes after that answer, not inside it.
        reply = await raw_exchange(
            base,
            b"GET /slow?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\nhi",
        )
        assert reply.startswith(b"HTTP/1.1 200 OK"), reply[:100]
        assert reply.index(b"slow\n") < reply.index(b"HTTP/1.1 100 Continue") < reply.index(b'"size": 2')
        reply = await raw_exchange(
            base,
            b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /echo HTTP/1.0\r\n\r\n",
        )
        assert reply.count(b"HTTP/1.1 200 OK") == 2
        assert b"Connection: keep-alive" in reply
        _pool_clean(gw)


async def test_early_upstream_answer_ends_the_upload() -> None:
    # The upstream answers before the body is sent; the client sends it all the same. The
    # gateway's close lingers: the upload is not reset, and the answer is read before it ends.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url], max_body_bytes=100_000_000)) as (gw, base):
            host, port = base.removeprefix("http://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            size = 8 * 1024 * 1024
            writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"a" * 65536)
            reply = await asyncio.wait_for(reader.read(), 5)  # answered, then the gateway's side ends
            assert reply.startswith(b"HTTP/1.1 413") and b"Connection: close" in reply and reply.endswith(b"big\n")
            for _ in range(size // 65536 - 1):
                writer.write(b"a" * 65536)
                await asyncio.wait_for(writer.drain(), 10)  # read and dropped: a reset would raise here
            writer.close()
            await eventually(lambda: gw.stats()["connections"]["open"] == 0, timeout=5)
            _pool_clean(gw)
            assert gw.stats()["upstream"]["servers"][f"127.0.0.1:{up.port}"]["connections"]["open"] == 0
    finally:
        await up.stop()


# -- chaos: upstreams going away under load -----------------------------------------------------------------------


async def _load(base: str, seconds: float, clients: int = 8) -> Counter[int | str]:
    out: Counter[int | str] = Counter()
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:

        async def client() -> None:
            while time.monotonic() < deadline:
                try:
                    async with s.get(base + "/echo", timeout=aiohttp.ClientTimeout(total=5)) as r:
                        await r.read()
                        out[r.status] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    out[type(exc).__name__] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return out


async def test_one_of_two_upstreams_restarted_under_load(
    upstream: Upstream, upstream_b: Upstream, redis_server: RedisServer
) -> None:
    """Every GET is answered 200 while one server is stopped and started again; counts are exact."""
    port = upstream_b.port
    config = proxy_config([upstream.url, upstream_b.url], redis_server.url, "raw", upstream_fail_timeout_s=0.3)
    async with proxy(config) as (gw, base):
        load = asyncio.ensure_future(_load(base, 1.5))
        await asyncio.sleep(0.4)
        await upstream_b.stop()
        await asyncio.sleep(0.4)
        await upstream_b.start(port)
        statuses = await load
        assert set(statuses) == {200}, statuses
        assert gw.stats()["requests"]["counted"] == statuses[200]
        _pool_clean(gw)
    assert redis_server.client().get("ip:127.0.0.1") == str(statuses[200]).encode()


async def test_stalled_upstream_answers_within_the_bound(upstream: Upstream) -> None:
    """A server that accepts and never answers: every request is answered 504 within the head timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    stalled = await RawUpstream(handler).start()
    try:
        config = proxy_config([stalled.url], upstream_response_timeout_s=0.3, upstream_max_fails=1000)
        async with proxy(config) as (gw, base):
            started = time.monotonic()
            statuses = await _load(base, 0.5, clients=4)
            assert set(statuses) == {504}, statuses
            assert time.monotonic() - started < 2
            _pool_clean(gw)
    finally:
        await stalled.stop()


async def test_health_check_results_are_reported(upstream: Upstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    failing = await RawUpstream(handler).start()
    try:
        config = proxy_config(
            [upstream.url, failing.url],
            health_check_path="/health",
            health_check_interval_s=0.05,
            health_check_timeout_s=2.0,  # the healthy one must not time out on a loaded machine
            health_check_fall=2,
        )
        async with proxy(config) as (gw, base):
            name = f"127.0.0.1:{failing.port}"
            for _ in range(60):
                if gw.stats()["upstream"]["servers"][name]["state"] == "down":
                    break
                await asyncio.sleep(0.05)
            servers = gw.stats()["upstream"]["servers"]
            assert servers[name]["state"] == "down"
            assert servers[name]["check"]["last"] == "500" and servers[name]["check"]["failed"] >= 2
            assert servers[f"127.0.0.1:{upstream.port}"]["check"]["last"] == "200"
            async with aiohttp.ClientSession() as s:
                for _ in range(4):
                    async with s.get(base + "/echo") as r:
                        assert r.status == 200  # a down server gets no traffic
            assert gw.stats()["upstream"]["servers"][name]["requests"] == 0
    finally:
        await failing.stop()


async def test_access_log_for_proxied_requests(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with proxy(proxy_config([upstream.url], access_log="combined")) as (_gw, base):
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/data?n=1000", headers={"User-Agent": "probe/1"}) as r:
                assert len(await r.read()) == 1000
            async with s.get(base + "/status/404") as r:
                assert r.status == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 2
    assert '"GET /data?n=1000 HTTP/1.1" 200 ' in lines[0] and '"probe/1"' in lines[0]
    assert int(lines[0].split('" 200 ')[1].split()[0]) > 1000  # head and body
    assert '"GET /status/404 HTTP/1.1" 404 ' in lines[1]


async def test_connection_lifecycle_limits(upstream: Upstream) -> None:
    name = f"127.0.0.1:{upstream.port}"
    config = proxy_config([upstream.url], upstream_max_requests=2, upstream_idle_timeout_s=0.2)
    async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(base + "/echo") as r:
                assert r.status == 200
        conns = gw.stats()["upstream"]["servers"][name]["connections"]
        assert conns["created"] == 3  # two requests per connection
        await asyncio.sleep(0.3)  # longer than the idle timeout: the idle one is not reused
        async with s.get(base + "/echo") as r:
            assert r.status == 200
        conns = gw.stats()["upstream"]["servers"][name]["connections"]
        assert conns["created"] == 4 and conns["open"] == 1
        assert conns["used_up"] == 3  # each retired as it came back from its second request
        # Without traffic, the idle one is closed in the background (the pool's lifecycle), not
        # left open until the upstream closes it or a request finds it stale.
        await asyncio.sleep(0.3)
        conns = gw.stats()["upstream"]["servers"][name]["connections"]
        assert conns["closed_idle"] == 1 and conns["open"] == 0
        _pool_clean(gw)


# -- rate limits (--limit) with the proxy as the action --------------------------------------------------


@pytest.mark.parametrize("limit_mode", ["raw", "multiplexed", "batched", "batched-noack"])
async def test_limited_requests_get_429_and_never_reach_the_upstream(
    upstream: Upstream, redis_server: RedisServer, limit_mode: str
) -> None:
    mode, _, variant = limit_mode.partition("-")
    extra = {"batch_ack": "none"} if variant == "noack" else {}
    config = proxy_config([upstream.url], redis_server.url, mode, limit=parse_rate("3/min"), limit_headers=True,
                          **extra)  # fmt: skip
    async with proxy(config) as (gw, base):
        statuses, fields = [], []
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.get(base + "/echo", allow_redirects=False) as r:
                    statuses.append(r.status)
                    fields.append((r.headers.get("RateLimit-Policy"), r.headers.get("RateLimit")))
                    if r.status == 200:
                        assert r.headers["X-Server"] == "a"  # the upstream's own response, fields added
                    else:
                        assert "X-Server" not in r.headers and r.headers["Retry-After"]
        assert statuses == [200, 200, 200, 429, 429]
        assert all(policy == '"default";q=3;w=60' for policy, _ in fields), fields
        assert [f[1].split(";")[1] for f in fields] == ["r=2", "r=1", "r=0", "r=0", "r=0"], fields
        assert gw.stats()["upstream"]["servers"][upstream.url.removeprefix("http://")]["requests"] == 3
        if variant == "noack":
            assert gw.pipeline.via_coroutine == 0  # decided and added in line
        _pool_clean(gw)
    # The total counter counts every request, refused ones included, as without the proxy.
    assert redis_server.client().get("ip:127.0.0.1") == b"5"


# -- adversarial upstreams and clients -----------------------------------------------------------------


async def _endless(writer: asyncio.StreamWriter, opening: bytes) -> None:
    """Send `opening`, then one field value (or trailer) that never ends."""
    writer.write(opening)
    block = b"a" * 65536
    for _ in range(1000):
        writer.write(block)
        await writer.drain()


@pytest.mark.parametrize(
    "opening",
    [b"HTTP/1.1 200 OK\r\nX-Big: ", b"HTTP/1.1 200 "],
    ids=["header-value", "reason-phrase"],
)
async def test_endless_response_head_is_502_at_once(opening: bytes) -> None:
    # The parser buffers a field whole before handing it over: without a bound on the head's
    # bytes, an upstream streaming one endless field grows the gateway's memory until the head
    # timeout (and then answers 504, blaming time rather than the malformed head).
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await _endless(writer, opening)

    up = await RawUpstream(handler).start()
    try:
        config = proxy_config([up.url], upstream_response_timeout_s=10.0)
        async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
            started = time.monotonic()
            async with s.get(base + "/x") as r:
                assert r.status == 502
            assert time.monotonic() - started < 2.0
            assert gw.stats()["upstream"]["errors"]["protocol"] == 1
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_endless_response_trailer_cuts_the_client() -> None:
    # A trailer field that never ends keeps the body "active" (bytes keep coming), so the body
    # timeout never fires: only a bound on the bytes buffered outside the body ends it.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await _endless(writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")

    up = await RawUpstream(handler).start()
    try:
        config = proxy_config([up.url], upstream_body_timeout_s=10.0)
        async with proxy(config) as (gw, base), aiohttp.ClientSession() as s:
            started = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(base + "/x") as r:
                    assert r.status == 200
                    await r.read()
            assert time.monotonic() - started < 2.0
            assert gw.stats()["upstream"]["errors"]["protocol"] == 1
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_response_with_a_non_chunked_transfer_coding_runs_until_the_close() -> None:
    # RFC 9112 6.3: `Transfer-Encoding: gzip` (chunked not last) delimits the body by the close.
    # Taken for chunked, the close looked like a cut: the client lost the end of a whole body;
    # and the coding itself must reach the client, or it takes gzip bytes for plain ones.
    payload = gzip.compress(b"hello " * 1000)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + payload)
        await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            out = await raw_exchange(base, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", timeout=2.0)
            head, _, body = out.partition(b"\r\n\r\n")
            assert b"Transfer-Encoding: gzip, chunked" in head.split(b"\r\n")
            assert body.endswith(b"0\r\n\r\n")  # a whole chunked body: the end was not cut off
            data = b""
            while True:
                size_line, _, body = body.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    break
                data, body = data + body[:size], body[size + 2 :]
            assert gzip.decompress(data) == b"hello " * 1000
            assert gw.stats()["upstream"]["errors"] == {}
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_connection_naming_content_length_keeps_the_response_framed() -> None:
    # `Connection: Content-Length` from the upstream made the proxy drop the response's only
    # framing field: on a kept-alive client connection the body then ran into the next response.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Hop\r\nX-Hop: 1\r\nContent-Length: 2\r\n\r\nok"
            )
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base), aiohttp.ClientSession() as s:
            for _ in range(3):  # one client connection, kept alive
                async with s.get(base + "/x") as r:
                    assert r.status == 200
                    assert r.headers["Content-Length"] == "2"
                    assert "X-Hop" not in r.headers
                    assert await r.read() == b"ok"
            _pool_clean(gw)
    finally:
        await up.stop()


async def test_client_half_closing_mid_upload_releases_everything_at_once(upstream: Upstream) -> None:
    # A client that sends FIN in the middle of its body: the request can never be whole. The
    # exchange held its upstream connection until the request timeout, and then the client
    # connection was never closed (timed out again at every tick, counting a 408 each time).
    config = proxy_config([upstream.url], request_timeout_s=0.5)
    async with proxy(config) as (gw, base):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n")  # completed: still answered
            writer.write(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
            await asyncio.sleep(0.1)
            writer.write_eof()
            async with asyncio.timeout(0.4):  # well before the request timeout
                out = await reader.read()  # until the gateway closes
            assert out.startswith(b"HTTP/1.1 200 OK\r\n")
            assert out.count(b"HTTP/1.1") == 1
        finally:
            writer.transport.abort()
        await asyncio.sleep(0.8)  # past the request timeout: nothing is left to time out
        assert gw.stats()["connections"]["open"] == 0
        assert gw.stats()["connections"]["head_timeouts"] == 0
        _pool_clean(gw)


async def test_absolute_form_target_names_the_host_sent_upstream(upstream: Upstream) -> None:
    # RFC 9112 3.2.2: an absolute-form target's authority is the Host. An HTTP/1.0 request
    # without Host had the upstream's own address sent as Host (and no X-Forwarded-Host).
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        out = await raw_exchange(base, b"GET http://good.example/echo/p?q=1 HTTP/1.0\r\n\r\n", timeout=2.0)
        info = body_json(out)
        headers = {k.lower(): v for k, v in info["headers"]}
        assert info["path"] == "/echo/p?q=1"
        assert headers["host"] == "good.example"
        assert headers["x-forwarded-host"] == "good.example"
        _pool_clean(gw)


@pytest.mark.parametrize(
    ("status_line", "expected"),
    [(b"HTTP/1.1 299 \r\n", b"HTTP/1.1 299 \r\n"), (b"HTTP/1.1 470 Custom\r\n", b"HTTP/1.1 470 Custom\r\n")],
    ids=["unregistered-empty-reason", "unregistered-with-reason"],
)
async def test_unregistered_status_is_passed_on(status_line: bytes, expected: bytes) -> None:
    # A status code with no registered phrase and an empty reason (valid: RFC 9112 4) was a 502
    # (the phrase lookup raised), costing the connection and counting towards ejection.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(status_line + b"Content-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            for _ in range(2):
                out = await raw_exchange(base, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", timeout=2.0)
                assert out.startswith(expected)
                assert out.endswith(b"\r\n\r\nok")
            assert gw.stats()["upstream"]["errors"] == {}
            _pool_clean(gw)
        assert up.connections == 1  # the connection was fine: reused
    finally:
        await up.stop()


async def test_status_outside_the_valid_range_is_502() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 799 Odd\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            out = await raw_exchange(base, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", timeout=2.0)
            assert out.startswith(b"HTTP/1.1 502 ")
            assert gw.stats()["upstream"]["errors"]["protocol"] == 1
            _pool_clean(gw)
    finally:
        await up.stop()


@pytest.mark.parametrize("coding", [b"chunked, ", b"chunked,", b"chunked\t", b"gzip, chunked,"])
async def test_response_chunked_with_an_empty_last_element_is_502(coding: bytes) -> None:
    # RFC 9110 5.6.1 makes `chunked, ` the list `chunked`, but llhttp then reads the body until
    # the close, chunk lines and all: the client got the chunk framing as content, chunked again,
    # and the response ended only when the upstream closed. Now it is a 502, the connection dropped.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # keeps the connection open, as a keep-alive upstream would

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            out = await raw_exchange(base, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", timeout=3.0)
            assert out.startswith(b"HTTP/1.1 502 "), out
            assert b"hello" not in out
            assert gw.stats()["upstream"]["errors"]["protocol"] == 1
            _pool_clean(gw)
            await eventually(lambda: up.writers == set())  # not kept for reuse
    finally:
        await up.stop()


async def test_transfer_coding_split_over_two_lines_is_refused_like_one() -> None:
    # `Transfer-Encoding: gzip` and `Transfer-Encoding: chunked` on two lines are the list
    # `gzip, chunked` (refused 501 as one line). Only the last line was checked: the request was
    # forwarded as plain chunked, its gzip coding dropped, the upstream given coded bytes as the body.
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_head(reader))

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url])) as (gw, base):
            out = await raw_exchange(
                base,
                b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nab\r\n0\r\n\r\n",
                timeout=2.0,
            )
            assert out.startswith(b"HTTP/1.1 501 ")
            assert gw.stats()["upstream"]["requests"] == 0
        assert seen == [] and up.connections == 0
    finally:
        await up.stop()


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"],
    ids=["103-with-fields", "100-without-fields"],
)
async def test_health_check_skips_interim_responses(interim: bytes) -> None:
    # A healthy server that sends 103 Early Hints before its 200 was checked by its first status
    # line only, and so marked down (and given no traffic) although it answers 200.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        config = proxy_config(
            [up.url],
            health_check_path="/health",
            health_check_interval_s=0.05,
            health_check_timeout_s=2.0,  # a check slowed by a loaded machine must not read as a timeout
            health_check_fall=2,
        )
        async with proxy(config) as (gw, base):
            server = gw.stats()["upstream"]["servers"][f"127.0.0.1:{up.port}"]
            for _ in range(100):  # several checks
                if server["check"]["passed"] + server["check"]["failed"] >= 3:
                    break
                await asyncio.sleep(0.05)
                server = gw.stats()["upstream"]["servers"][f"127.0.0.1:{up.port}"]
            assert server["state"] == "up"
            assert server["check"]["last"] == "200" and server["check"]["failed"] == 0
            out = await raw_exchange(base, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", timeout=2.0)
            assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        await up.stop()


@pytest.mark.parametrize("accounting", ["raw", "pooled", "naive", "multiplexed"])
async def test_client_leaving_during_accounting_is_counted_not_forwarded(accounting: str) -> None:
    # The client left while its increment was on its way to Redis. The exchange was cancelled
    # mid-command: the increment landed in Redis but was neither counted nor failed (stats "in
    # flight" for ever), and the naive backend lost track of its connection. The redirect path
    # lets the accounting finish; so does the proxy now, and then forwards nothing.
    stall = asyncio.Event()
    fake = await FakeRedis(stall=stall).start()
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_head(reader))

    up = await RawUpstream(handler).start()
    try:
        async with proxy(proxy_config([up.url], fake.url, accounting)) as (gw, base):
            host, port = base.removeprefix("http://").rsplit(":", 1)
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
            await eventually(lambda: any(c[0].upper() == b"INCRBY" for c in fake.commands))
            # A reset, not a half-close (which still wants its answer).
            sock = writer.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await asyncio.sleep(0.05)  # the gateway notices the client is gone
            stall.set()
            await eventually(lambda: gw.stats()["requests"]["in_flight"] == 0)
            assert gw.stats()["requests"]["counted"] == 1
            assert fake.counts == {b"ip:127.0.0.1": 1}
            pool = gw.stats()["pool"]
            assert pool.get("in_use", 0) == 0 and pool.get("discarded", 0) == 0
            assert gw.stats()["upstream"]["requests"] == 0
        assert seen == [] and up.connections == 0
    finally:
        stall.set()
        await up.stop()
        await fake.close()


async def test_health_check_timeout_is_its_own_option() -> None:
    # A server that accepts but never answers: each check fails after --health-check-timeout-s
    # (not the interval), and `fall` of them take the server down.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(30)

    stalled = await RawUpstream(handler).start()
    try:
        config = proxy_config(
            [stalled.url],
            health_check_path="/health",
            health_check_interval_s=0.05,
            health_check_timeout_s=0.3,
            health_check_fall=2,
        )
        async with proxy(config) as (gw, _base):
            name = f"127.0.0.1:{stalled.port}"
            loop = asyncio.get_running_loop()
            start = loop.time()
            for _ in range(100):
                if gw.stats()["upstream"]["servers"][name]["state"] == "down":
                    break
                await asyncio.sleep(0.05)
            elapsed = loop.time() - start
            server = gw.stats()["upstream"]["servers"][name]
            assert server["state"] == "down" and server["check"]["last"] == "timeout"
            assert elapsed >= 0.55  # two checks of 0.3 s each, not two of the 0.05 s interval
    finally:
        await stalled.stop()


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_health_check_timeout_must_be_positive(value: float) -> None:
    with pytest.raises(ConfigError, match="health-check-timeout-s"):
        proxy_config(["http://127.0.0.1:1"], health_check_path="/h", health_check_timeout_s=value)


async def _drained_answer(gw: object, base: str, target: bytes, headed: bool) -> bytes:
    """Send one request, start the drain while its exchange is in flight (once the upstream's
    head came, if `headed`), read until the close."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: gw.stats()["upstream"]["requests"] == 1)  # type: ignore[attr-defined]
    if headed:
        await eventually(lambda: gw.stats()["upstream"]["responses"].get("2xx") == 1)  # type: ignore[attr-defined]
    stopping = asyncio.ensure_future(gw.server.stop())  # type: ignore[attr-defined]
    data = await asyncio.wait_for(reader.read(), 10)
    await stopping
    writer.close()
    return data


async def test_drain_tells_the_client_the_answer_in_flight_is_the_last(upstream: Upstream) -> None:
    # The upstream answers after the drain began: the head the client gets says the connection ends.
    async with proxy(proxy_config([upstream.url])) as (gw, base):
        data = await _drained_answer(gw, base, b"/slow?s=0.3", headed=False)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"slow\n")
    assert b"\r\nConnection: close\r\n" in data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


async def test_drain_rewrites_a_held_head_to_close(upstream: Upstream, redis_server: RedisServer) -> None:
    # Batched: the whole response is held (its head made keep-alive) until the flush settles,
    # which Redis delays past the start of the drain; the head leaves saying Connection: close.
    redis_server.client().delete("ip:127.0.0.1")
    cfg = proxy_config([upstream.url], redis_server.url, "batched", command_timeout_ms=5000)
    async with proxy(cfg) as (gw, base):
        redis_server.client().execute_command("CLIENT", "PAUSE", 500, "WRITE")
        data = await _drained_answer(gw, base, b"/echo", headed=True)
    head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert data.startswith(b"HTTP/1.1 200 ") and head.count(b"\r\nConnection: close\r\n") == 1
    assert int(redis_server.client().get("ip:127.0.0.1") or 0) == 1


async def test_drain_makes_an_own_answer_in_flight_say_close(upstream: Upstream) -> None:
    # The drain began while the exchange waited; the upstream then ran out of time: the 504 the
    # client gets is the connection's last answer, and says so.
    async with proxy(proxy_config([upstream.url], upstream_response_timeout_s=0.3)) as (gw, base):
        data = await _drained_answer(gw, base, b"/slow?s=3", headed=False)
    assert data.startswith(b"HTTP/1.1 504 ")
    assert b"\r\nConnection: close\r\n" in data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
