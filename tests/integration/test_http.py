"""Malformed and oversized requests get a 4xx, and the gateway keeps serving."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from ..helpers import RedisServer, make_config, running_gateway


async def _raw(base: str, payload: bytes) -> bytes:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
    return data


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=[
        "garbage",
        "version",
        "nul",
        "header-syntax",
        "big-header",
        "big-line",
        "many-headers",
        "bad-length",
        "smuggle",
    ],
)
async def test_malformed_request_gets_4xx(payload: bytes, redis_server: RedisServer, http: str) -> None:
    async with running_gateway(make_config(redis_server.url, "raw", http=http)) as (gw, base):
        reply = await _raw(base, payload)
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500, reply[:200]
        async with aiohttp.ClientSession() as s, s.get(base + "/", allow_redirects=False) as r:
            assert r.status == 302
        assert gw.stats()["requests"]["failed"] == 0
    # Nothing malformed became a key.
    assert redis_server.client().keys("*") == [b"ip:127.0.0.1"]


async def test_spoofed_forwarded_for_from_untrusted_peer(redis_server: RedisServer, http: str) -> None:
    async with (
        running_gateway(make_config(redis_server.url, "raw", http=http)) as (_gw, base),
        aiohttp.ClientSession() as s,
    ):
        for _ in range(3):
            async with s.get(base + "/", allow_redirects=False, headers={"X-Forwarded-For": "6.6.6.6"}) as r:
                assert r.status == 302
    assert redis_server.client().keys("*") == [b"ip:127.0.0.1"]


async def test_methods_and_keepalive(redis_server: RedisServer, http: str) -> None:
    async with (
        running_gateway(make_config(redis_server.url, "raw", http=http)) as (_gw, base),
        aiohttp.ClientSession() as s,
    ):
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"):
            async with s.request(method, base + "/x", data=b"body" if method in ("POST", "PUT") else None,
                                 allow_redirects=False) as r:  # fmt: skip
                assert r.status == 302
    assert redis_server.client().get("ip:127.0.0.1") == b"6"
