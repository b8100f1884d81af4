"""Redis down, erroring or slow: the gateway answers, counts the failure, recovers."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from ..helpers import FakeRedis, RedisServer, make_config, running_gateway


async def _statuses(session: aiohttp.ClientSession, url: str, n: int) -> list[int]:
    async def one() -> int:
        async with session.get(url, allow_redirects=False) as r:
            return r.status

    return await asyncio.gather(*(one() for _ in range(n)))


async def test_redis_stopped_then_back(
    redis_mode: str, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(own_redis.url, redis_mode, pool_wait_ms=200, connect_timeout_ms=200, command_timeout_ms=200)
    async with running_gateway(cfg) as (gw, base), aiohttp.ClientSession() as s:
        assert await _statuses(s, base + "/", 5) == [302] * 5
        own_redis.stop()
        with caplog.at_level(logging.WARNING):
            t0 = time.monotonic()
            assert await _statuses(s, base + "/", 50) == [302] * 50
            assert time.monotonic() - t0 < 5
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert 1 <= len(warnings) <= 4, [r.getMessage() for r in warnings]  # per burst, not per request
        assert all(r.exc_info is None for r in warnings)
        requests = gw.stats()["requests"]
        # batched holds the increments (deferred) instead of failing them
        assert requests["failed" if redis_mode != "batched" else "deferred"] >= 1
        own_redis.start()
        # It recovers by itself: keep sending until increments are confirmed again.
        before = gw.stats()["requests"]["counted"]
        deadline = time.monotonic() + 10
        while gw.stats()["requests"]["counted"] <= before and time.monotonic() < deadline:
            await _statuses(s, base + "/", 5)
            await asyncio.sleep(0.05)
        assert gw.stats()["requests"]["counted"] > before
        assert own_redis.client_count() <= cfg.pool_size
        await gw.backend.close()
    assert int(own_redis.client().get("ip:127.0.0.1") or 0) >= 1


async def test_error_reply_is_counted_by_kind_and_served(redis_mode: str, redis_server: RedisServer) -> None:
    redis_server.client().set("ip:127.0.0.1", "not a number")
    async with running_gateway(make_config(redis_server.url, redis_mode)) as (gw, base), aiohttp.ClientSession() as s:
        assert await _statuses(s, base + "/", 20) == [302] * 20
        await gw.backend.close()
        failures = gw.stats()["failures"]
    assert failures.get("redis:ERR", 0) == 20, failures
    redis_server.client().delete("ip:127.0.0.1")


async def test_wrong_type_key(redis_mode: str, redis_server: RedisServer) -> None:
    redis_server.client().lpush("ip:127.0.0.1", "x")
    async with running_gateway(make_config(redis_server.url, redis_mode)) as (gw, base), aiohttp.ClientSession() as s:
        assert await _statuses(s, base + "/", 10) == [302] * 10
        await gw.backend.close()
    assert gw.stats()["failures"].get("redis:WRONGTYPE", 0) == 10


async def test_deny_policy_answers_503(redis_mode: str, http: str) -> None:
    fake = await FakeRedis().start()
    port = fake.port
    await fake.close()
    cfg = make_config(
        f"redis://127.0.0.1:{port}/0",
        redis_mode,
        on_redis_error="deny",
        pool_wait_ms=100,
        shutdown_timeout_s=0.2,
        http=http,
    )
    async with running_gateway(cfg) as (_gw, base), aiohttp.ClientSession() as s:
        async with s.get(base + "/", allow_redirects=False) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"


async def test_slow_redis_bounded_by_timeouts(redis_mode: str) -> None:
    stall = asyncio.Event()
    fake = await FakeRedis(stall=stall).start()
    cfg = make_config(
        fake.url, redis_mode, pool_size=2, pool_wait_ms=200, command_timeout_ms=200, connect_timeout_ms=200
    )
    try:
        async with running_gateway(cfg) as (_gw, base), aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            statuses = await _statuses(s, base + "/", 20)
            elapsed = time.monotonic() - t0
            assert statuses == [302] * 20
            # pool wait + connect + command, with slack for a loaded machine
            assert elapsed < 3.0
            stall.set()
    finally:
        stall.set()
        await fake.close()


@pytest.mark.parametrize("command_mode", ["naive", "pooled", "raw", "multiplexed"])  # FakeRedis has no EVALSHA
async def test_a_server_that_drops_every_command_gets_backed_off_connects(
    command_mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    # It answers the connect (PING, or nothing: redis-py sends nothing) and drops the connection
    # at the first command, as a proxy with no Redis behind it does. Each connect used to end
    # the backoff: a connect per request (raw 3,240 in 2 s, pooled 2,880, naive 2,160) or per
    # batch of commands (multiplexed 160).
    fake = await FakeRedis(drop_commands=True).start()
    cfg = make_config(fake.url, command_mode, pool_size=10)
    stop = time.monotonic() + 1.5

    async def client(s: aiohttp.ClientSession, url: str) -> None:
        while time.monotonic() < stop:
            async with s.get(url, allow_redirects=False) as r:
                assert r.status == 302  # let through uncounted
                await r.read()

    try:
        with caplog.at_level(logging.WARNING):
            async with running_gateway(cfg) as (gw, base), aiohttp.ClientSession() as s:
                await asyncio.gather(*(client(s, base + "/") for _ in range(10)))
                sent = gw.stats()["requests"]["total"]
                # Ten connects at once at the start, then one 25-50 ms after the failure, doubling
                # to 250-500 ms: about eight more in 1.5 s.
                assert fake.accepted <= 10 + 12, (fake.accepted, sent)
                assert sent > 100 and gw.stats()["requests"]["counted"] == 0
                fake.drop_commands = False  # the server behind it is back
                deadline = time.monotonic() + 5
                while gw.stats()["requests"]["counted"] == 0:
                    assert time.monotonic() < deadline, "counting did not resume"
                    await _statuses(s, base + "/", 5)
                    await asyncio.sleep(0.05)
                assert await _statuses(s, base + "/", 10) == [302] * 10
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert 1 <= len(warnings) <= 6, warnings  # per outage, not per request or per connect
    finally:
        await fake.close()
