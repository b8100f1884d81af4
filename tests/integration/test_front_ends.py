"""The HTTP contract every front end keeps (`--http httptools` and `--http aiohttp`), on raw sockets.

Each test runs against both front ends (the `http` fixture); the few that only the
own front end offers say so. Redis is a real redis-server; a client is a raw socket,
so framing, ordering and connection handling are seen exactly as sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time

import pytest
import uvloop

from gateway.config import Config, parse_upstream

from ..helpers import RedisServer, eventually, make_config, running_gateway
from ..proxy_helpers import Upstream

Exchange = list[tuple[int, dict[str, str], bytes]]


def _address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _open(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*_address(base))


async def _read_response(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response: status, header fields (lower-case names), body (by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if not head_only and status >= 200:
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return status, headers, body


async def _closed(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True when the server closes the connection (and sends nothing more) within `timeout`."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except (ConnectionError, TimeoutError):
        return False


def _count(redis_server: RedisServer, ip: str = "127.0.0.1") -> int:
    return int(redis_server.client().get(f"ip:{ip}") or 0)


def _cfg(redis_server: RedisServer, http: str, mode: str = "raw", **kw: object) -> Config:
    return make_config(redis_server.url, mode, http=http, **kw)


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_keep_alive_and_connection_close(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        for _ in range(3):
            writer.write(GET)
            status, headers, _ = await _read_response(reader)
            assert status == 302 and headers.get("connection", "keep-alive") != "close"
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = await _read_response(reader)
        assert status == 302 and headers["connection"] == "close"
        assert await _closed(reader)
        writer.close()
    assert _count(redis_server) == 4


async def test_http10_closes_unless_keep_alive_is_asked(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await _read_response(reader)
        assert status == 302 and headers["connection"].lower() == "keep-alive"
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        status, _, _ = await _read_response(reader)
        assert status == 302
        assert await _closed(reader)
        writer.close()
    assert _count(redis_server) == 2


async def test_pipelined_requests_answered_in_order(redis_server: RedisServer, http: str, mode: str) -> None:
    paths = ["/", "/ok", "/ok?x=1", "/a"] * 10
    async with running_gateway(_cfg(redis_server, http, mode)) as (gw, base):
        reader, writer = await _open(base)
        writer.write(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
        statuses = [(await _read_response(reader))[0] for _ in paths]
        assert statuses == [302, 200, 200, 302] * 10
        writer.close()
        await gw.backend.close()
    assert _count(redis_server) == (0 if mode == "off" else len(paths))


async def test_head_has_no_body(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(b"HEAD /ok HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        status, headers, _ = await _read_response(reader, head_only=True)
        assert status == 200 and headers["content-length"] == "3"
        status, _, body = await _read_response(reader)  # the next response follows at once: no body was sent
        assert status == 302 and body == b""
        writer.close()
    assert _count(redis_server) == 2


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"])
async def test_any_method_is_counted(redis_server: RedisServer, http: str, method: str) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(f"{method} /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        assert (await _read_response(reader))[0] == 302
        writer.close()
    assert _count(redis_server) == 1


async def test_absolute_form_target(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(b"GET http://example.test/ok?q=1 HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await _read_response(reader))[0] == 200
        writer.write(b"GET http://example.test/elsewhere HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await _read_response(reader))[0] == 302
        writer.close()
    assert _count(redis_server) == 2


async def test_request_bodies_are_read_and_the_connection_reused(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world")
        assert (await _read_response(reader))[0] == 302
        chunked = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: t\r\n\r\n"
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        assert (await _read_response(reader))[0] == 302
        writer.write(GET)
        assert (await _read_response(reader))[0] == 302
        writer.close()
    assert _count(redis_server) == 3


async def test_expect_100_continue(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        status, _, _ = await _read_response(reader)
        if http == "aiohttp":
            # aiohttp's low-level server sends no 100; answering with the final status at once
            # is allowed (RFC 9110, 10.1.1), and the body is then discarded.
            assert status == 302
        else:
            assert status == 100
            writer.write(b"hello")
            assert (await _read_response(reader))[0] == 302
        writer.close()
    assert _count(redis_server) == 1


async def test_a_client_that_half_closes_mid_body_leaves_no_connection(redis_server: RedisServer, http: str) -> None:
    # The client ends its stream where the promised body should be: the body can never come.
    # aiohttp answers at the head and then kept reading the body for its 10 s lingering time,
    # so the connection stayed open and a drain waited out --shutdown-timeout-s for it. The
    # own front end answers a request once it is whole, so this one gets no answer.
    async with running_gateway(_cfg(redis_server, http)) as (gw, base):
        reader, writer = await _open(base)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 3.0)  # until the gateway closes
        assert answer.startswith(b"HTTP/1.1 302 ") if http == "aiohttp" else answer == b""
        await eventually(lambda: gw.stats()["connections"]["open"] == 0, timeout=3.0)
        writer.close()
    assert _count(redis_server) == (1 if http == "aiohttp" else 0)


@pytest.mark.parametrize(
    "payload",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\tfolded\r\n\r\nx",
    ],
    ids=["cl-and-te", "two-lengths", "te-not-last-chunked", "te-gzip", "te-space-colon", "obs-fold"],
)
async def test_smuggling_shapes_get_400_and_close(redis_server: RedisServer, http: str, payload: bytes) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        # A request smuggled behind the malformed one must never be answered or counted.
        writer.write(payload + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await _read_response(reader)
        assert status == 400
        assert await _closed(reader)
        writer.close()
    assert _count(redis_server) == 0


async def test_body_over_the_limit_gets_413(redis_server: RedisServer, http: str) -> None:
    if http == "aiohttp":
        pytest.skip("aiohttp's front end does not read bodies; --max-body-bytes is the own front end's")
    async with running_gateway(_cfg(redis_server, http, max_body_bytes=1000)) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        assert (await _read_response(reader))[0] == 413  # refused from the head alone
        assert await _closed(reader)
        writer.close()
        reader, writer = await _open(base)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"200\r\n" + b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n")
        assert (await _read_response(reader))[0] == 413
        assert await _closed(reader)
        writer.close()
    assert _count(redis_server) == 0


async def _send_all(writer: asyncio.StreamWriter, size: int) -> int:
    """Write `size` bytes, draining as it goes; the bytes written before the connection failed."""
    sent = 0
    chunk = b"x" * 65536
    try:
        while sent < size:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(chunk)
    except ConnectionError:
        pass
    return sent


async def test_a_refused_upload_is_read_and_dropped_before_the_close(redis_server: RedisServer) -> None:
    # Refused from its head, the body still comes. Closed at once, the gateway's socket would
    # answer it with a reset (the upload fails, and the 413 may be lost with it): the close
    # lingers instead, so the client sends its body to the end and then reads the answer.
    async with running_gateway(_cfg(redis_server, "httptools", max_body_bytes=1000)) as (gw, base):
        reader, writer = await _open(base)
        size = 8 * 1024 * 1024
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        assert await _send_all(writer, size) == size
        status, headers, _ = await _read_response(reader)
        assert status == 413 and headers["connection"] == "close"
        assert await _closed(reader)  # the gateway ended its side after the answer
        writer.close()
        await eventually(lambda: gw.stats()["connections"]["open"] == 0, timeout=5)
    assert _count(redis_server) == 0


async def test_a_lingering_close_ends_when_the_client_does_not(redis_server: RedisServer) -> None:
    # A client that neither ends its side nor sends more is closed on once the linger ran out:
    # 2 s, within a tick of the server's clock (1 s here) after it, or the request timeout if
    # shorter; so is one that sends too much.
    for timeout, least, most in ((10.0, 1.9, 3.5), (0.5, 0.45, 1.5)):
        cfg = _cfg(redis_server, "httptools", max_body_bytes=1000, request_timeout_s=timeout)
        async with running_gateway(cfg) as (gw, base):
            await asyncio.sleep(0.6)  # well into a tick: the linger runs from now, not from the tick
            reader, writer = await _open(base)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
            assert (await _read_response(reader))[0] == 413
            t0 = time.monotonic()
            assert await _closed(reader)
            assert gw.stats()["connections"]["open"] == 1  # lingering: the client may still send
            await eventually(lambda: gw.stats()["connections"]["open"] == 0, timeout=5)
            assert least <= time.monotonic() - t0 < most
            writer.close()
    async with running_gateway(_cfg(redis_server, "httptools", max_body_bytes=1000)) as (gw, base):
        reader, writer = await _open(base)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        t0 = time.monotonic()
        sent = await _send_all(writer, 256 * 1024 * 1024)
        # Cut off past the linger's byte bound (64 MiB), well before its time bound (2 s).
        assert 64 * 1024 * 1024 <= sent < 256 * 1024 * 1024
        assert time.monotonic() - t0 < 2
        writer.close()
        await eventually(lambda: gw.stats()["connections"]["open"] == 0, timeout=5)


async def test_slow_head_gets_408(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http, request_timeout_s=0.5)) as (gw, base):
        reader, writer = await _open(base)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        t0 = time.monotonic()
        status, _, _ = await _read_response(reader)
        assert status == 408 and time.monotonic() - t0 < 3
        assert await _closed(reader)
        writer.close()
        assert gw.stats()["connections"]["head_timeouts"] == 1
    assert _count(redis_server) == 0


async def test_a_late_body_starts_no_head_timer(redis_server: RedisServer, http: str) -> None:
    # A body that arrives after its head, then a quiet keep-alive connection: no 408 appears,
    # and the next request gets its own answer.
    async with running_gateway(_cfg(redis_server, http, request_timeout_s=0.4)) as (gw, base):
        reader, writer = await _open(base)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        for part in (b"ab", b"cd", b"ef"):
            await asyncio.sleep(0.05)
            writer.write(part)
        assert (await _read_response(reader))[0] == 302
        await asyncio.sleep(1.2)  # three request timeouts, well within the keep-alive timeout
        writer.write(GET)
        assert (await _read_response(reader))[0] == 302
        writer.close()
        assert gw.stats()["connections"]["head_timeouts"] == 0
    assert _count(redis_server) == 2


async def test_idle_keep_alive_connection_is_closed(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http, keepalive_timeout_s=0.3)) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(GET)
        assert (await _read_response(reader))[0] == 302
        assert await _closed(reader, timeout=5)
        writer.close()


async def test_connections_beyond_the_limit_get_503(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http, max_connections=2)) as (gw, base):
        held = [await _open(base) for _ in range(2)]
        for reader, writer in held:
            writer.write(GET)
            assert (await _read_response(reader))[0] == 302
        reader, writer = await _open(base)
        status, _, _ = await _read_response(reader)
        assert status == 503
        writer.close()
        assert gw.stats()["connections"]["rejected"] == 1
        for _, w in held:
            w.close()


async def test_half_closed_client_gets_its_answers(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        # aiohttp answers the request it is handling, then closes; the own front end answers
        # every request that was complete before the half-close, as HAProxy does.
        n = 2 if http == "httptools" else 1
        writer.write(GET * n)
        writer.write_eof()
        statuses = [(await _read_response(reader))[0] for _ in range(n)]
        assert statuses == [302] * n
        assert await _closed(reader)
        writer.close()
    assert _count(redis_server) == n


@pytest.mark.parametrize("proxied", [False, True], ids=["redirect", "proxy"])
@pytest.mark.parametrize("answering", ["raw", "batched"])
def test_half_closed_client_gets_every_answer_of_a_long_pipeline(
    redis_server: RedisServer, answering: str, proxied: bool
) -> None:
    # 2,000 requests in one write, then the half-close. Past the answers a connection may owe
    # (1,024 held by batched), the rest of the read waits unparsed with reading paused; on uvloop
    # the client's end is delivered meanwhile, and it closed the connection after the first
    # 1,061 answers (151 proxied), the others neither answered nor counted. On uvloop, as the
    # gateway runs (the suite's loop is asyncio's, which delivers the end later).
    n = 2000
    redis_server.client().delete("ip:127.0.0.1")

    async def pipeline() -> list[int]:
        upstream = await Upstream().start() if proxied else None
        upstreams = () if upstream is None else (parse_upstream(upstream.url),)
        try:
            async with running_gateway(_cfg(redis_server, "httptools", answering, upstreams=upstreams)) as (_, base):
                reader, writer = await _open(base)
                writer.write(GET * n)
                writer.write_eof()
                statuses = [(await _read_response(reader))[0] for _ in range(n)]
                assert await _closed(reader)
                writer.close()
                return statuses
        finally:
            if upstream is not None:
                await upstream.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(pipeline()) == [200 if proxied else 302] * n
    assert _count(redis_server) == n


async def test_drain_answers_requests_in_flight_and_closes_idle(redis_server: RedisServer, http: str) -> None:
    # Redis holds writes, so a request is in flight when the gateway is told to stop.
    redis_server.client().set("ip:127.0.0.1", 0)
    async with running_gateway(_cfg(redis_server, http, command_timeout_ms=5000)) as (gw, base):
        idle_reader, idle_writer = await _open(base)
        idle_writer.write(GET)
        assert (await _read_response(idle_reader))[0] == 302
        reader, writer = await _open(base)
        redis_server.client().execute_command("CLIENT", "PAUSE", 500, "WRITE")
        writer.write(GET)
        await eventually(lambda: gw.pipeline.requests == 2)
        stopping = asyncio.ensure_future(gw_stop(gw))
        status, headers, _ = await _read_response(reader)
        assert status == 302
        if http == "httptools":
            # Made before the drain began, the answer still tells the client the connection ends
            # with it (aiohttp's front end closes without saying so).
            assert headers.get("connection") == "close"
        assert await _closed(idle_reader) and await _closed(reader)
        await stopping
        writer.close()
        idle_writer.close()
    assert _count(redis_server) == 2


async def gw_stop(gw: object) -> None:
    await gw.server.stop()  # type: ignore[attr-defined]


async def test_access_log_combined(redis_server: RedisServer, http: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with running_gateway(_cfg(redis_server, http, access_log="combined")) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nReferer: http://r/\r\nUser-Agent: probe/1\r\n\r\n")
        assert (await _read_response(reader))[0] == 302
        writer.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 1
    assert lines[0].startswith("127.0.0.1 - - [")
    assert '"GET /a?b=1 HTTP/1.1" 302 ' in lines[0] and lines[0].endswith('"http://r/" "probe/1"')


async def test_count_header_carries_the_new_value(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, http, count_header="X-Count")) as (_gw, base):
        reader, writer = await _open(base)
        for expected in ("1", "2"):
            writer.write(GET)
            status, headers, _ = await _read_response(reader)
            assert status == 302 and headers["x-count"] == expected
        writer.close()


async def test_http10_kept_alive_by_proxy_connection_is_http10(redis_server: RedisServer) -> None:
    # llhttp keeps an HTTP/1.0 request alive for Proxy-Connection as for Connection: the front end
    # must not take it for 1.1 (which needs a Host) from that alone.
    async with running_gateway(_cfg(redis_server, "httptools")) as (_gw, base):
        reader, writer = await _open(base)
        writer.write(b"GET / HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n")
        status, headers, _ = await _read_response(reader)
        assert status == 302 and headers["connection"] == "keep-alive"
        writer.close()


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        # Kept alive by llhttp's reading of these fields, as only 1.1 is otherwise: still refused.
        (b"GET / HTTP/2.0\r\nHost: x\r\nProxy-Connection: keep-alive\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", 400),
        # The front end takes a kept-alive request without a Connection field for 1.1 because
        # llhttp refuses every version but 0.9, 1.0, 1.1 and 2.0: this holds it to that.
        (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 4000) for i in range(5)) + b"\r\n",
            431,
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nExpect: tea\r\nContent-Length: 1\r\n\r\nx", 417),
        (b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n", 405),
    ],
    ids=[
        "no-host",
        "two-hosts",
        "http2",
        "http2-keep-alive",
        "http09-keep-alive",
        "http12",
        "long-target",
        "many-fields",
        "big-head",
        "expect-other",
        "connect",
    ],
)
async def test_own_front_end_limits(redis_server: RedisServer, payload: bytes, status: int) -> None:
    # Stricter than aiohttp's front end on purpose (the limits HAProxy applies); aiohttp's own
    # answers to malformed input are covered by test_http.py.
    async with running_gateway(_cfg(redis_server, "httptools")) as (gw, base):
        reader, writer = await _open(base)
        writer.write(payload)
        assert (await _read_response(reader))[0] == status
        assert await _closed(reader)
        writer.close()
        assert gw.stats()["connections"]["bad_requests"] == (0 if status == 405 else 1)
    assert _count(redis_server) == 0


async def test_client_that_does_not_read_is_paused(redis_server: RedisServer) -> None:
    # Pipelined requests from a client that never reads its answers: once the socket's
    # buffers are full the gateway stops reading, so its memory stays bounded.
    async with running_gateway(_cfg(redis_server, "httptools", mode="off")) as (gw, base):
        sock = socket.create_connection(_address(base))
        sock.setblocking(False)
        stream = memoryview(GET * 200_000)  # 5.6 MB of requests, far more than socket buffers hold
        sent = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sent < len(stream):
            try:
                sent += sock.send(stream[sent : sent + 65536])
            except BlockingIOError:
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(0)
        handled = gw.pipeline.requests
        assert handled < sent // len(GET), (handled, sent)  # reading stopped
        await asyncio.sleep(0.3)
        assert gw.pipeline.requests == handled  # and stays stopped while the client does not read
        # Reading the answers lets the gateway go on.
        deadline = time.monotonic() + 10
        while gw.pipeline.requests == handled and time.monotonic() < deadline:
            try:
                while sock.recv(1 << 20):
                    pass
            except BlockingIOError:
                await asyncio.sleep(0.01)
        assert gw.pipeline.requests > handled
        sock.close()


async def test_clients_closing_idle_keep_alive_connections_leave_nothing_open(
    redis_server: RedisServer, http: str
) -> None:
    async with running_gateway(_cfg(redis_server, http)) as (gw, base):
        for _ in range(10):
            reader, writer = await _open(base)
            writer.write(GET)
            assert (await _read_response(reader))[0] == 302
            writer.close()
        await eventually(lambda: gw.stats()["connections"]["open"] == 0)


async def test_malformed_requests_log_no_traceback(
    redis_server: RedisServer, http: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_gateway(_cfg(redis_server, http)) as (_gw, base):
        for payload in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n"):
            reader, writer = await _open(base)
            writer.write(payload)
            assert 400 <= (await _read_response(reader))[0] < 500
            writer.close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_shutdown_does_not_wait_out_a_batch_window(redis_server: RedisServer, http: str) -> None:
    cfg = _cfg(redis_server, http, "batched", batch_window_ms=20_000, shutdown_timeout_s=5)
    async with running_gateway(cfg) as (gw, base):
        reader, writer = await _open(base)
        writer.write(GET)
        await eventually(lambda: gw.pipeline.requests == 1)
        t0 = time.monotonic()
        stopping = asyncio.ensure_future(_stop(gw))
        assert (await _read_response(reader))[0] == 302  # held, then released by a prompt flush
        await stopping
        assert time.monotonic() - t0 < 3
        writer.close()
    assert _count(redis_server) == 1


async def _stop(gw: object) -> None:
    gw.backend.hurry()  # type: ignore[attr-defined]
    await gw.server.stop()  # type: ignore[attr-defined]


async def test_trailers_never_choose_the_counted_address(redis_server: RedisServer, http: str) -> None:
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    async with running_gateway(_cfg(redis_server, http, trusted_proxies=trusted)) as (gw, base):
        reader, writer = await _open(base)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\nx\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
        )
        assert (await _read_response(reader))[0] == 302
        writer.close()
        await gw.backend.close()
    assert redis_server.client().keys("*") == [b"ip:1.1.1.1"]
