"""The contract every mode meets, against a real redis-server."""

from __future__ import annotations

import asyncio

import aiohttp

from ..helpers import RedisServer, make_config, peak_clients, running_gateway

N = 60


async def _hit(session: aiohttp.ClientSession, url: str, n: int, **kw: object) -> list[aiohttp.ClientResponse]:
    async def one() -> aiohttp.ClientResponse:
        async with session.get(url, allow_redirects=False, **kw) as resp:  # type: ignore[arg-type]
            await resp.read()
            return resp

    return await asyncio.gather(*(one() for _ in range(n)))


async def test_every_request_redirected_and_counted(mode: str, redis_server: RedisServer, http: str) -> None:
    cfg = make_config(redis_server.url, mode, http=http)
    async with running_gateway(cfg) as (gw, base), aiohttp.ClientSession() as s:
        responses = await _hit(s, base + "/some/path?q=1", N)
        assert {r.status for r in responses} == {302}
        assert {r.headers["Location"] for r in responses} == {"/ok"}
        await gw.backend.close()  # batched: the last window is in Redis after close
        value = redis_server.client().get("ip:127.0.0.1")
    if mode == "off":
        assert redis_server.client().dbsize() == 0
        assert gw.stats()["requests"]["counted"] == 0
    else:
        assert value == str(N).encode()
        assert gw.stats()["requests"]["counted"] == N


async def test_target_answers_200_and_is_counted(mode: str, redis_server: RedisServer, http: str) -> None:
    cfg = make_config(redis_server.url, mode, target="/landing", key_prefix="hits:", http=http)
    async with running_gateway(cfg) as (gw, base), aiohttp.ClientSession() as s:
        async with s.get(base + "/anything") as resp:  # follows the redirect to the target
            assert resp.status == 200
            assert [h.status for h in resp.history] == [302]
            assert resp.history[0].headers["Location"] == "/landing"
        await gw.backend.close()
    if mode != "off":
        assert redis_server.client().get("hits:127.0.0.1") == b"2"


async def test_url_auth_and_db_honoured(redis_mode: str) -> None:
    server = RedisServer(password="s3cret").start()
    try:
        cfg = make_config(server.url_db(5), redis_mode)
        async with running_gateway(cfg) as (gw, base), aiohttp.ClientSession() as s:
            responses = await _hit(s, base + "/", 10)
            assert {r.status for r in responses} == {302}
            await gw.backend.close()
        assert server.client(db=5).get("ip:127.0.0.1") == b"10"
        assert server.client(db=0).dbsize() == 0
    finally:
        server.cleanup()


async def test_trusted_proxy_counts_forwarded_clients(redis_mode: str, redis_server: RedisServer) -> None:
    import ipaddress

    cfg = make_config(redis_server.url, redis_mode, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    clients = [f"198.51.100.{i}" for i in range(1, 11)] + ["2001:DB8::0:1"]
    async with running_gateway(cfg) as (gw, base), aiohttp.ClientSession() as s:
        for i, ip in enumerate(clients):
            await _hit(s, base + "/", i + 1, headers={"X-Forwarded-For": f"6.6.6.6, {ip}"})
        await _hit(s, base + "/", 3, headers={"X-Forwarded-For": "garbage"})
        await gw.backend.close()
    r = redis_server.client()
    for i, ip in enumerate(clients):
        key = "ip:2001:db8::1" if ":" in ip else f"ip:{ip}"
        assert r.get(key) == str(i + 1).encode(), key
    assert r.get("ip:127.0.0.1") == b"3"
    assert r.get("ip:6.6.6.6") is None


async def test_connections_bounded_by_pool_size(redis_mode: str, redis_server: RedisServer) -> None:
    cfg = make_config(redis_server.url, redis_mode, pool_size=5)
    async with running_gateway(cfg) as (gw, base):
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=connector) as s:
            responses, peak = await peak_clients(redis_server, _hit(s, base + "/", 400))
        assert {r.status for r in responses} == {302}
        assert gw.stats()["requests"]["counted"] == 400
        await gw.backend.close()
    assert 1 <= peak <= 5
    assert redis_server.client().get("ip:127.0.0.1") == b"400"
