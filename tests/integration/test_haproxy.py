"""The HAProxy+Lua reference: real haproxy, real redis-server, both started here."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.client_ip import canonical

from ..helpers import HAProxyReference, RedisServer, eventually, make_config, peak_clients, running_gateway

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")

LUA_DIR = Path(__file__).resolve().parents[2] / "lua_reference"
TRUST_LOCAL = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture
def redis_server(own_redis: RedisServer) -> RedisServer:
    """A redis-server of each test's own: these tests count Redis' clients (CLIENT LIST), and the
    connections of an earlier test, still being closed, would be counted with them."""
    return own_redis


@pytest.fixture
def haproxy(redis_server: RedisServer) -> Iterator[HAProxyReference]:
    ref = HAProxyReference(redis_server.port, pool_size=5).start()
    yield ref
    ref.stop()


async def _send(url: str, xffs: list[str | None], concurrency: int = 50) -> list[tuple[int, str | None]]:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def one(xff: str | None) -> tuple[int, str | None]:
            headers = {"X-Forwarded-For": xff} if xff is not None else {}
            async with sem, s.get(url + "/x", headers=headers, allow_redirects=False) as r:
                await r.read()
                return r.status, r.headers.get("Location")

        return await asyncio.gather(*(one(x) for x in xffs))


@pytest.mark.parametrize("listener", HAProxyReference.LISTENERS)
async def test_listener_redirects_and_counts(
    listener: str, haproxy: HAProxyReference, redis_server: RedisServer
) -> None:
    replies = await _send(haproxy.url(listener), [None] * 40)
    assert set(replies) == {(302, "/ok")}
    async with aiohttp.ClientSession() as s, s.get(haproxy.url(listener) + "/ok") as r:
        assert r.status == 200
    r = redis_server.client()
    if listener == "calibration":
        assert r.dbsize() == 0
    else:
        assert r.get("ip:127.0.0.1") == b"41"


@pytest.mark.parametrize("listener", ["pooled", "raw"])
async def test_pool_never_exceeds_nb_max(listener: str, haproxy: HAProxyReference, redis_server: RedisServer) -> None:
    replies, peak = await peak_clients(redis_server, _send(haproxy.url(listener), [None] * 600, concurrency=200))
    assert {s for s, _ in replies} == {302}
    assert 1 <= peak <= 5
    # The seed's pool polls every 50 ms for up to 1 s; a request that finds no
    # connection by then goes through uncounted. Every request is either counted
    # or accounted for as such a timeout (or an error).
    async with aiohttp.ClientSession() as s, s.get(haproxy.url("stats")) as resp:
        stats = await resp.json(content_type=None)
    assert stats["nb_cur"] <= stats["nb_max"] == 5
    counted = int(redis_server.client().get("ip:127.0.0.1") or 0)
    assert counted + stats["nb_wait_timeout"] + stats["nb_err"] == 600, stats


@pytest.mark.parametrize("listener", HAProxyReference.SEED_LISTENERS)
async def test_seed_listener_counts_every_request(
    listener: str, haproxy: HAProxyReference, redis_server: RedisServer
) -> None:
    # The seed's own code (seed.lua) under 20 concurrent clients and a pool of 5: every request
    # redirected and counted once under the client's key, never more connections than the pool.
    replies, peak = await peak_clients(redis_server, _send(haproxy.url(listener), [None] * 200, concurrency=20))
    assert set(replies) == {(302, "/ok")}
    # As published, the seed has no rule for the target: /ok is redirected (and counted) too.
    async with aiohttp.ClientSession() as s, s.get(haproxy.url(listener) + "/ok", allow_redirects=False) as r:
        assert r.status == 302
    r = redis_server.client()
    assert r.keys("*") == [b"ip:127.0.0.1"]
    await eventually(lambda: r.get("ip:127.0.0.1") == b"201")
    assert 1 <= peak <= 5


def _sequence() -> list[str | None]:
    rng = random.Random(42)
    ips = [f"198.51.{i // 200}.{i % 200}" for i in range(60)] + [
        "2001:DB8::1",
        "2001:db8:0:0:1::7",
        "::ffff:203.0.113.5",
    ]
    seq: list[str | None] = []
    for _ in range(400):
        roll = rng.random()
        if roll < 0.05:
            seq.append(None)
        elif roll < 0.08:
            seq.append("garbage")
        elif roll < 0.12:
            seq.append(f"6.6.6.6, {rng.choice(ips)}, 127.0.0.9")  # a trusted hop on the right is skipped
        else:
            seq.append(rng.choice(ips))
    return seq


@pytest.mark.parametrize("ref_mode", ["naive", "pooled", "raw"])
async def test_parity_with_gateway(ref_mode: str, haproxy: HAProxyReference, redis_server: RedisServer) -> None:
    seq = _sequence()
    assert {s for s, _ in await _send(haproxy.url(ref_mode), seq, concurrency=20)} == {302}
    r = redis_server.client()
    via_haproxy = {k: r.get(k) for k in r.keys("*")}
    r.flushall()
    async with running_gateway(make_config(redis_server.url, ref_mode, trusted_proxies=TRUST_LOCAL)) as (_gw, base):
        assert {s for s, _ in await _send(base, seq, concurrency=20)} == {302}
    via_gateway = {k: r.get(k) for k in r.keys("*")}
    assert via_haproxy == via_gateway
    assert len(via_gateway) > 50 and sum(int(v) for v in via_gateway.values()) == len(seq)


async def test_fail_open_and_recovery(own_redis: RedisServer) -> None:
    ref = HAProxyReference(own_redis.port, pool_size=5).start()
    try:
        for listener in ("naive", "pooled", "raw"):
            assert {s for s, _ in await _send(ref.url(listener), [None] * 5)} == {302}
        own_redis.stop()
        for listener in ("naive", "pooled", "raw"):
            assert {s for s, _ in await _send(ref.url(listener), [None] * 20)} == {302}
        own_redis.start()

        async def counting_again() -> bool:
            for listener in ("pooled", "raw"):
                await _send(ref.url(listener), [f"192.0.2.{(listener == 'raw' and 2) or 1}"])
            r = own_redis.client()
            return r.get("ip:192.0.2.1") is not None and r.get("ip:192.0.2.2") is not None

        for _ in range(100):
            if await counting_again():
                break
            await asyncio.sleep(0.05)
        assert await counting_again()
        await _send(ref.url("naive"), ["192.0.2.3"])
        await eventually(lambda: own_redis.client().get("ip:192.0.2.3") == b"1")
    finally:
        ref.stop()


@pytest.mark.skipif(shutil.which("lua5.3") is None, reason="lua5.3 is not installed")
def test_lua_and_python_canonical_addresses_agree() -> None:
    rng = random.Random(3)
    cases = ["1.2.3.4:80", "010.1.1.1", "::", "1::", "[::1]:8", "::ffff:192.0.2.1", "64:ff9b::1.2.3.4", "1::2::3",
             "fe80::1%eth0", "unknown", "", "1:2:3:4:5:6:7:8:9", "2001:db8:0:0:1:0:0:0", "[::1]x"]  # fmt: skip
    for _ in range(2000):
        if rng.random() < 0.5:
            cases.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        else:
            groups = [0 if rng.random() < 0.4 else rng.getrandbits(16) for _ in range(8)]
            addr = ipaddress.IPv6Address(sum(g << (16 * i) for i, g in enumerate(groups)))
            cases.append(addr.exploded if rng.random() < 0.5 else str(addr).upper())
    script = f'package.path = "{LUA_DIR}/?.lua;" .. package.path\n'
    script += (
        'local ipaddr = require("ipaddr")\nfor line in io.lines() do print(tostring(ipaddr.canonical(line))) end\n'
    )
    out = subprocess.run(["lua5.3", "-e", script], input="\n".join(cases) + "\n", capture_output=True, text=True)
    got = out.stdout.splitlines()
    assert len(got) == len(cases), out.stderr
    for case, lua in zip(cases, got, strict=True):
        assert (None if lua == "nil" else lua) == canonical(case), case
