"""Increments on callbacks alone (`Backend.incr_then`, `raw` and `multiplexed` on one server):
the reply, read by the Redis connection, answers the request. The pool's invariants and the
failure policy hold as on the coroutine path, which is what these tests pin."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.pipeline import Pending, Pipeline

from ..helpers import FakeRedis, RedisServer, eventually, make_config, running_gateway


async def _statuses(session: aiohttp.ClientSession, url: str, n: int) -> list[int]:
    async def one() -> int:
        async with session.get(url, allow_redirects=False) as r:
            await r.read()
            return r.status

    return await asyncio.gather(*(one() for _ in range(n)))


class _Paths:
    """How many requests took callbacks (a `Pending`) and how many the coroutine path since it
    was made (`Pipeline.via_callbacks`, `via_coroutine`)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.base = (pipeline.via_callbacks, pipeline.via_coroutine)

    def taken(self) -> dict[str, int]:
        p = self.pipeline
        return {"callbacks": p.via_callbacks - self.base[0], "coroutine": p.via_coroutine - self.base[1]}


@pytest.mark.parametrize("cb_mode", ["raw", "multiplexed"])
async def test_steady_load_takes_callbacks_and_leaves_nothing_checked_out(
    cb_mode: str, redis_server: RedisServer, http: str
) -> None:
    cfg = make_config(redis_server.url, cb_mode, pool_size=3, http=http)
    async with running_gateway(cfg) as (gw, base):
        connector = aiohttp.TCPConnector(limit=60)
        async with aiohttp.ClientSession(connector=connector) as s:
            assert set(await _statuses(s, base + "/", 60)) == {302}  # the pool fills
            paths = _Paths(gw.pipeline)
            assert set(await _statuses(s, base + "/", 300)) == {302}
        # Once connections exist, no increment needs a coroutine: 60 clients wait on 3
        # connections (raw) or share one (multiplexed) on callbacks.
        assert paths.taken() == {"callbacks": 300, "coroutine": 0}
        assert gw.stats()["requests"]["counted"] == 360
        if cb_mode == "raw":
            pool = gw.backend.pool.stats()  # type: ignore[attr-defined]
            assert pool["in_use"] == 0 and pool["waiting"] == 0 and pool["size"] <= 3
    assert redis_server.client().get("ip:127.0.0.1") == b"360"


async def test_connections_killed_under_load_answer_every_request(own_redis: RedisServer, http: str) -> None:
    """Connections dropped while requests wait for them: waiters get the freed slots (they
    connect, then send), failures are counted once, nothing stays checked out."""
    cfg = make_config(own_redis.url, "raw", pool_size=2, http=http)
    client = own_redis.client()
    async with running_gateway(cfg) as (gw, base):
        connector = aiohttp.TCPConnector(limit=40)
        async with aiohttp.ClientSession(connector=connector) as s:
            total = 0
            for _ in range(8):
                load = asyncio.ensure_future(_statuses(s, base + "/", 80))
                await asyncio.sleep(0.005)
                client.client_kill_filter(_type="normal", skipme=True)
                statuses = await load
                assert set(statuses) == {302}  # failing open, as the policy says
                total += len(statuses)
        requests = gw.stats()["requests"]
        assert requests["total"] == total
        assert requests["counted"] + requests["failed"] == total
        pool = gw.backend.pool.stats()  # type: ignore[attr-defined]
        await eventually(lambda: gw.backend.pool.stats()["in_use"] == 0)  # type: ignore[attr-defined]
        assert pool["waiting"] == 0
        assert pool["created"] > 2  # slots freed by the kills were connected again
        # Never more counted in Redis than the gateway confirmed plus the increments whose
        # reply was lost with a killed connection (applied, but reported failed).
        value = int(client.get("ip:127.0.0.1") or 0)
        assert requests["counted"] <= value <= total


async def test_stalled_redis_bounds_waits_and_frees_the_pool() -> None:
    """Requests queued on callbacks still get the pool's wait timeout and the command timeout."""
    stall = asyncio.Event()
    fake = await FakeRedis(stall=stall).start()
    cfg = make_config(fake.url, "raw", pool_size=2, pool_wait_ms=150, command_timeout_ms=150, connect_timeout_ms=300)
    try:
        async with running_gateway(cfg) as (gw, base), aiohttp.ClientSession() as s:
            assert set(await _statuses(s, base + "/", 12)) == {302}
            failures = gw.stats()["requests"]["failed"]
            assert failures == 12
            kinds = gw.pipeline.failures
            assert kinds["timeout"] + kinds["pool_timeout"] == 12, kinds
            await eventually(lambda: gw.backend.pool.stats()["in_use"] == 0)  # type: ignore[attr-defined]
            assert gw.backend.pool.stats()["waiting"] == 0  # type: ignore[attr-defined]
    finally:
        stall.set()
        await fake.close()


async def test_pending_answers_an_awaiting_caller(redis_server: RedisServer) -> None:
    """The aiohttp front end awaits what `handle` returns: a `Pending` works as an awaitable."""
    cfg = make_config(redis_server.url, "multiplexed")
    async with running_gateway(cfg) as (gw, _base):
        answers = [gw.pipeline.handle("/", "127.0.0.1", None, None) for _ in range(5)]
        assert all(type(a) is Pending for a in answers)
        responses = [await a for a in answers]  # type: ignore[misc]
        assert {r.status for r in responses} == {302}
    assert redis_server.client().get("ip:127.0.0.1") == b"5"
