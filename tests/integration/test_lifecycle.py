"""Pool lifecycle against real redis-server: idle flows a middlebox forgets, rotation under
load, pre-warm and its refill. Times are scaled down from the production ones (a relay that
forgets flows idle for 0.5 s instead of a load balancer's minutes) to keep the suite fast."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any

import aiohttp
import pytest

from loadtest.procs import HARNESS

from ..helpers import IdleDropRelay, RedisServer, eventually, free_port, make_config, running_gateway

TRUST_LOCAL = (ipaddress.ip_network("127.0.0.0/8"),)
LIFECYCLE_MODES = ("raw", "multiplexed", "batched")
RELAY_IDLE_S = 0.5
PAUSE_S = 0.8  # longer than the relay's idle limit: every pause loses the flows
BURSTS, BURST = 3, 15


async def _bursts(base: str, ip: str) -> tuple[list[int], list[float]]:
    """BURSTS bursts of BURST sequential requests, PAUSE_S apart; statuses, and the latency of
    each burst's first request."""
    statuses: list[int] = []
    firsts: list[float] = []
    async with aiohttp.ClientSession() as s:
        for b in range(BURSTS):
            if b:
                await asyncio.sleep(PAUSE_S)
            for i in range(BURST):
                t0 = time.monotonic()
                async with s.get(base + "/", allow_redirects=False, headers={"X-Forwarded-For": ip}) as r:
                    await r.read()
                    statuses.append(r.status)
                if i == 0:
                    firsts.append(time.monotonic() - t0)
    return statuses, firsts


@pytest.fixture
def redis_server(own_redis: RedisServer) -> RedisServer:
    """A redis-server of each test's own: these tests count Redis' clients (CLIENT LIST), and the
    connections of an earlier test, still being closed, would be counted with them."""
    return own_redis


def _lifecycle(**kw: Any) -> dict[str, Any]:
    """Lifecycle options: everything off unless given."""
    base: dict[str, Any] = {
        "pool_idle_timeout_s": 0.0,
        "pool_check_after_ms": None,
        "pool_max_lifetime_s": None,
    }
    base.update(kw)
    return base


async def _through_relay(redis_server: RedisServer, mode: str, **lifecycle: Any) -> tuple[Any, list[float], int]:
    relay = await IdleDropRelay(redis_server.port, RELAY_IDLE_S).start()
    try:
        cfg = make_config(
            relay.url(), mode, trusted_proxies=TRUST_LOCAL, command_timeout_ms=200, **_lifecycle(**lifecycle)
        )
        async with running_gateway(cfg) as (gw, base):
            statuses, firsts = await _bursts(base, "10.1.2.3")
            assert set(statuses) == {302}
            await asyncio.sleep(0.05)
            stats = gw.stats()
        return stats, firsts, relay.dropped
    finally:
        await relay.close()


async def test_relay_forgets_idle_flows_without_lifecycle(redis_server: RedisServer) -> None:
    # The fault is real: with every lifecycle rule off, the first request after a pause waits
    # out the command timeout on a forgotten flow and goes uncounted.
    stats, _, dropped = await _through_relay(redis_server, "raw")
    assert dropped >= BURSTS - 1
    assert stats["requests"]["failed"] == BURSTS - 1, stats
    # The lost requests never reached Redis (the relay discarded them on the way).
    assert int(redis_server.client().get("ip:10.1.2.3") or 0) == BURSTS * BURST - (BURSTS - 1)


@pytest.mark.parametrize("lc_mode", LIFECYCLE_MODES)
async def test_idle_timeout_keeps_every_increment(lc_mode: str, redis_server: RedisServer) -> None:
    # The idle timeout (half the relay's, as 180 s is to a load balancer's 240-350 s) closes
    # connections before the relay forgets them: no request ever meets a forgotten flow.
    stats, _, _ = await _through_relay(redis_server, lc_mode, pool_idle_timeout_s=RELAY_IDLE_S / 2)
    req = stats["requests"]
    assert req["failed"] == 0 and req["deferred"] == 0 and req["counted"] == BURSTS * BURST, stats
    assert int(redis_server.client().get("ip:10.1.2.3") or 0) == BURSTS * BURST
    assert stats["pool"]["closed_idle"] >= BURSTS - 1, stats["pool"]


@pytest.mark.parametrize("lc_mode", LIFECYCLE_MODES)
async def test_check_alone_answers_and_counts_every_request(lc_mode: str, redis_server: RedisServer) -> None:
    stats, firsts, _ = await _through_relay(redis_server, lc_mode, pool_check_after_ms=100.0)
    req = stats["requests"]
    assert req["failed"] == 0 and req["deferred"] == 0 and req["counted"] == BURSTS * BURST, stats
    assert int(redis_server.client().get("ip:10.1.2.3") or 0) == BURSTS * BURST
    pool = stats["pool"]
    assert pool["checks"] >= BURSTS - 1, pool
    if lc_mode == "raw":
        # Checked at checkout: each pause's connection failed its PING (the relay forgot it) and
        # was replaced; the request paid the check's timeout, not a failure.
        assert pool["check_failures"] >= BURSTS - 1, pool
        print(f"raw: first request after a pause took {max(firsts[1:]) * 1000:.0f} ms (check timeout 200 ms)")
    else:
        # Shared connections are PINGed while idle, which keeps the relay's flow alive.
        assert pool["check_failures"] == 0, pool


@pytest.mark.parametrize("lc_mode", LIFECYCLE_MODES)
async def test_lifetime_rotates_connections_under_load(lc_mode: str, redis_server: RedisServer) -> None:
    pool_size = 6
    cfg = make_config(
        redis_server.url,
        lc_mode,
        trusted_proxies=TRUST_LOCAL,
        pool_size=pool_size,
        **_lifecycle(pool_max_lifetime_s=1.0, pool_lifetime_jitter_s=0.5),
    )
    probe = redis_server.client()
    seen: dict[int, tuple[float, float]] = {}  # client id -> first and last seen
    max_age = 0
    peak = 0
    clients, duration = 12, 3.2
    statuses: list[int] = []
    async with running_gateway(cfg) as (gw, base):
        t0 = time.monotonic()
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal max_age, peak
            while not stop.is_set():
                rows = await asyncio.to_thread(probe.client_list, _type="normal")
                now = time.monotonic() - t0
                mine = [r for r in rows if r.get("name") != HARNESS]
                peak = max(peak, len(mine))
                for r in mine:
                    cid = int(r["id"])
                    first = seen.get(cid, (now, now))[0]
                    seen[cid] = (first, now)
                    max_age = max(max_age, int(r["age"]))
                await asyncio.sleep(0.05)

        async def client(i: int) -> None:
            async with aiohttp.ClientSession() as s:
                while not stop.is_set():
                    hdr = {"X-Forwarded-For": f"10.5.0.{i}"}
                    async with s.get(base + "/", allow_redirects=False, headers=hdr) as r:
                        await r.read()
                        statuses.append(r.status)

        watcher = asyncio.create_task(watch())
        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.sleep(duration)
        stop.set()
        await asyncio.gather(watcher, *tasks)
        await asyncio.sleep(0.05)
        stats = gw.stats()
    req = stats["requests"]
    assert set(statuses) == {302}
    assert req["failed"] == 0 and req["deferred"] == 0 and req["counted"] == len(statuses), stats
    total = sum(int(probe.get(f"ip:10.5.0.{i}") or 0) for i in range(clients))
    assert total == len(statuses)
    # CLIENT LIST's age is a difference of whole-second clocks: a connection of 1.2 s can show 2.
    # The spans sampled every 50 ms are the precise check (lifetime 1 s + up to 0.5 s of jitter).
    assert max_age <= 2, max_age
    spans = [last - first for first, last in seen.values()]
    assert max(spans) < 1.5 + 0.15, sorted(spans)[-3:]
    assert stats["pool"]["expired"] >= 1, stats["pool"]
    cap = pool_size if lc_mode == "raw" else 2  # a shared connection and its replacement, briefly
    assert peak <= cap, peak
    # Spread: the connections that replaced the first ones opened over a range of times, not at once.
    later = sorted(first for first, _ in seen.values() if first > 0.5)
    assert later and later[-1] - later[0] > 0.3, later


async def test_prewarm_opens_the_minimum_and_refills_it(redis_server: RedisServer) -> None:
    cfg = make_config(redis_server.url, "raw", pool_min_size=5)
    async with running_gateway(cfg) as (gw, _):
        # Before any request.
        assert redis_server.client_count() == 5
        assert gw.stats()["pool"]["prewarmed"] == 5
        redis_server.client().client_kill_filter(_type="normal", skipme=True)
        t0 = time.monotonic()
        await eventually(lambda: redis_server.client_count() == 5, timeout=1.0)
        refilled = time.monotonic() - t0
        # Redis lists a connection once it accepts it; the pool counts it once its set-up is
        # answered, a moment later (on a loaded machine, not at once).
        await eventually(lambda: gw.stats()["pool"]["prewarmed"] == 10, timeout=1.0)
        assert redis_server.client_count() == 5
        assert gw.stats()["requests"]["total"] == 0
    print(f"minimum reopened {refilled:.2f} s after CLIENT KILL")


async def test_prewarm_with_redis_down_starts_and_backs_off() -> None:
    cfg = make_config(f"redis://127.0.0.1:{free_port()}/0", "raw", pool_min_size=5, connect_timeout_ms=200)
    t0 = time.monotonic()
    async with running_gateway(cfg) as (gw, base):
        assert time.monotonic() - t0 < 2.0  # start does not wait for Redis
        await asyncio.sleep(1.0)
        pool = gw.stats()["pool"]
        # Backed off (50 ms doubling to 500 ms): a handful of connects, never one per sweep.
        assert 1 <= pool["errors"] <= 8, pool
        assert pool["size"] <= 1 and pool["idle"] == 0, pool  # at most the one probing connect
        async with aiohttp.ClientSession() as s, s.get(base + "/", allow_redirects=False) as r:
            assert r.status == 302  # fails open
