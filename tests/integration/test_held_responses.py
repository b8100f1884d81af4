"""Batched with --batch-ack flush: a response leaves only once its increment is in Redis.

Redis is made slow on demand with `CLIENT PAUSE <ms> WRITE`, which holds the
flush's EVALSHA (a script may write) while reads still answer.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from ..helpers import RedisServer, eventually, make_config, running_gateway

PAUSE_MS = 700


def _pause(redis_server: RedisServer, ms: int = PAUSE_MS) -> None:
    redis_server.client().execute_command("CLIENT", "PAUSE", ms, "WRITE")


def _count(redis_server: RedisServer) -> int:
    return int(redis_server.client().get("ip:127.0.0.1") or 0)


def _config(redis_server: RedisServer, http: str, **kw: object) -> object:
    return make_config(redis_server.url, "batched", command_timeout_ms=5000, http=http, **kw)


async def _open(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _read_heads(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    # The gateway's answers have empty bodies (302) or a short one (200 "ok\n").
    heads = []
    for _ in range(n):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if head.startswith(b"HTTP/1.1 200"):
            await reader.readexactly(3)
        heads.append(head)
    return heads


async def test_response_waits_for_its_flush(redis_server: RedisServer, http: str) -> None:
    redis_server.client().delete("ip:127.0.0.1")
    async with running_gateway(_config(redis_server, http)) as (gw, base), aiohttp.ClientSession() as s:
        assert gw.pipeline.holds
        _pause(redis_server)
        t0 = time.monotonic()
        async with s.get(base + "/", allow_redirects=False) as r:
            elapsed = time.monotonic() - t0
            assert r.status == 302
            # Read the moment the response arrived: the count must already be there.
            assert _count(redis_server) == 1
        assert elapsed >= (PAUSE_MS - 100) / 1000, elapsed
        requests = gw.stats()["requests"]
        assert (requests["counted"], requests["in_flight"], requests["deferred"]) == (1, 0, 0)
        latency = gw.stats()["accounting_latency_s"]
        assert sum(latency["counts"]) == 1 and latency["sum"] >= (PAUSE_MS - 100) / 1000


async def test_pipelined_requests_answered_in_order(redis_server: RedisServer, http: str) -> None:
    redis_server.client().delete("ip:127.0.0.1")
    async with running_gateway(_config(redis_server, http)) as (gw, base):
        reader, writer = await _open(base)
        paths = ["/", "/ok"] * 10
        _pause(redis_server, 300)  # the first flush is held, later requests join the next batch
        writer.write(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
        heads = await _read_heads(reader, len(paths))
        assert [h.split(b" ", 2)[1] for h in heads] == [b"302", b"200"] * 10
        assert _count(redis_server) == 20
        writer.close()
        assert gw.stats()["requests"]["counted"] == 20


async def test_connection_close_waits_for_the_held_response(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_config(redis_server, http)) as (_gw, base):
        reader, writer = await _open(base)
        _pause(redis_server, 300)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)  # to EOF: the close came after the bytes
        assert data.startswith(b"HTTP/1.1 302 "), data
        writer.close()


async def test_client_gone_before_the_release(redis_server: RedisServer, http: str) -> None:
    redis_server.client().delete("ip:127.0.0.1")
    async with running_gateway(_config(redis_server, http)) as (gw, base), aiohttp.ClientSession() as s:
        _reader, writer = await _open(base)
        _pause(redis_server, 400)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: gw.pipeline.requests == 1)
        writer.close()  # gone while its response is held
        await eventually(lambda: gw.stats()["requests"]["in_flight"] == 0)
        assert gw.stats()["requests"]["counted"] == 1 and _count(redis_server) == 1
        async with s.get(base + "/", allow_redirects=False) as r:
            assert r.status == 302
        assert _count(redis_server) == 2


async def test_shutdown_delivers_held_responses(redis_server: RedisServer, http: str) -> None:
    redis_server.client().delete("ip:127.0.0.1")
    async with aiohttp.ClientSession() as s:
        async with running_gateway(_config(redis_server, http)) as (gw, base):
            _pause(redis_server, 500)
            pending = asyncio.ensure_future(s.get(base + "/", allow_redirects=False))
            await eventually(lambda: gw.pipeline.requests == 1)
        # The gateway stopped while the response was held: it flushed, then answered.
        async with await pending as r:
            assert r.status == 302
    assert _count(redis_server) == 1


async def test_shutdown_tells_the_client_its_held_answer_is_the_last(redis_server: RedisServer) -> None:
    # Encoded (keep-alive) and held before the drain began: released after it, the response
    # says Connection: close, as the connection ends with it; one held behind another, pipelined,
    # leaves the first as it was.
    redis_server.client().delete("ip:127.0.0.1")
    async with running_gateway(_config(redis_server, "httptools")) as (gw, base):
        reader, writer = await _open(base)
        _pause(redis_server, 500)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        await eventually(lambda: gw.pipeline.requests == 2)
        stopping = asyncio.ensure_future(gw.server.stop())
        data = await asyncio.wait_for(reader.read(), 10)  # both answers, then the close
        await stopping
        writer.close()
    first, second = data.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"302 ") and b"\r\nConnection:" not in first
    assert second.startswith(b"302 ") and b"\r\nConnection: close\r\n" in second
    assert _count(redis_server) == 2


async def test_redis_down_releases_responses_as_deferred(http: str) -> None:
    server = RedisServer().start()
    try:
        cfg = make_config(server.url, "batched", command_timeout_ms=300, connect_timeout_ms=200, http=http)
        async with running_gateway(cfg) as (gw, base), aiohttp.ClientSession() as s:
            server.stop()
            for _ in range(10):
                async with s.get(base + "/", allow_redirects=False) as r:
                    assert r.status == 302  # fail open
            requests = gw.stats()["requests"]
            assert (requests["deferred"], requests["counted"], requests["in_flight"]) == (10, 0, 0), requests
            server.start()
            await eventually(lambda: gw.backend.stats()["pending_increments"] == 0, timeout=10)
        assert server.client().get("ip:127.0.0.1") == b"10"
    finally:
        server.cleanup()
