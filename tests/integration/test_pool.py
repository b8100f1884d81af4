"""The project's own pool: bounds, order, wake-up, discard, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from functools import partial

import pytest

from gateway.config import parse_redis_url
from gateway.connection import open_connection
from gateway.errors import AccountingError
from gateway.pool import Pool

from ..helpers import FakeRedis, RedisServer


def _pool(url: str, size: int, wait: float = 5.0, command_timeout: float = 5.0) -> Pool:
    connect = partial(open_connection, parse_redis_url(url), connect_timeout=5.0, command_timeout=command_timeout)
    return Pool(connect, size, wait)


async def _until_counted(pool: Pool, timeout: float = 5.0) -> int:
    """INCRBY k 1 until a checkout gets its reply (the pool reconnecting after a backoff)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with pool.connection() as conn:
                reply = await conn.execute("INCRBY", "k", 1)
                assert isinstance(reply, int)
                return reply
        except AccountingError:
            assert time.monotonic() < deadline, "the pool did not reconnect after its backoff"
            await asyncio.sleep(0.05)


async def test_never_exceeds_max_against_slow_handshake() -> None:
    # Each connect takes 50 ms to complete its AUTH: 200 callers arrive while
    # the first connects are still in progress, which is the seed's trap.
    fake = await FakeRedis(handshake_delay=0.05).start()
    pool = _pool(f"redis://:pw@127.0.0.1:{fake.port}/0", size=7)
    peak_size = 0

    async def one(i: int) -> int:
        nonlocal peak_size
        conn = await pool.acquire()
        peak_size = max(peak_size, pool.stats()["size"])
        try:
            return await conn.execute("INCRBY", f"k{i % 10}", 1)  # type: ignore[return-value]
        finally:
            pool.release(conn)

    try:
        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert len(results) == 200
        assert fake.peak <= 7 and fake.accepted <= 7
        assert peak_size <= 7
        assert sum(fake.counts.values()) == 200
        assert pool.stats()["in_use"] == 0 and pool.stats()["waiting"] == 0
    finally:
        await pool.close()
        await fake.close()


async def test_waiters_served_in_order_and_woken_at_release(redis_server: RedisServer) -> None:
    pool = _pool(redis_server.url, size=1, wait=30.0)
    first = await pool.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        conn = await pool.acquire()
        order.append(i)
        await asyncio.sleep(0)
        pool.release(conn)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0)  # queue them in a known order
    assert pool.stats()["waiting"] == 5
    t0 = time.monotonic()
    pool.release(first)
    await asyncio.gather(*tasks)
    # Woken by the hand-off, not a poll: five waiters polling in the seed's 50 ms steps would
    # need at least 250 ms; the margin below that absorbs a stalled VM.
    assert time.monotonic() - t0 < 0.2
    assert order == [0, 1, 2, 3, 4]
    assert pool.stats()["created"] == 1
    await pool.close()


async def test_newcomer_does_not_overtake_a_waiter(redis_server: RedisServer) -> None:
    pool = _pool(redis_server.url, size=1, wait=30.0)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    pool.release(held)
    newcomer = asyncio.create_task(pool.acquire())
    got = await waiter
    await asyncio.sleep(0.01)
    assert not newcomer.done()
    pool.release(got)
    pool.release(await newcomer)
    await pool.close()


async def test_wait_timeout_is_honoured(redis_server: RedisServer) -> None:
    pool = _pool(redis_server.url, size=1, wait=0.1)
    held = await pool.acquire()
    t0 = time.monotonic()
    with pytest.raises(AccountingError) as exc:
        await pool.acquire()
    assert exc.value.kind == "pool_timeout"
    assert time.monotonic() - t0 >= 0.1
    s = pool.stats()
    assert s["wait_timeouts"] == 1 and s["waiting"] == 0
    pool.release(held)
    await pool.close()


async def test_killed_connections_are_discarded_and_replaced(redis_server: RedisServer) -> None:
    pool = _pool(redis_server.url, size=3)
    conns = [await pool.acquire() for _ in range(3)]
    for c in conns:
        assert await c.execute("PING") == "PONG"
        pool.release(c)
    redis_server.client().client_kill_filter(_type="normal", skipme=True)
    await asyncio.sleep(0.05)
    conn = await pool.acquire()
    assert await conn.execute("INCRBY", "k", 5) == 5
    pool.release(conn)
    s = pool.stats()
    assert s["created"] == 4 and s["discarded"] == 3 and s["size"] == 1
    await pool.close()


async def test_cancelled_mid_command_never_reused() -> None:
    stall = asyncio.Event()
    fake = await FakeRedis(stall=stall).start()
    pool = _pool(fake.url, size=1)

    async def incr(key: str) -> object:
        conn = await pool.acquire()
        try:
            return await conn.execute("INCRBY", key, 1)
        finally:
            pool.release(conn)

    task = asyncio.create_task(incr("victim"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.stats()["discarded"] == 1 and pool.stats()["size"] == 0
    stall.set()
    # The next caller gets a fresh connection and its own reply, not "victim"'s.
    assert await incr("other") == 1
    assert pool.stats()["created"] == 2
    await pool.close()
    await fake.close()


async def test_reply_split_at_every_byte() -> None:
    fake = await FakeRedis(split=True).start()
    pool = _pool(fake.url, size=2)
    try:
        for i in range(1, 20):
            conn = await pool.acquire()
            assert await conn.execute("INCRBY", "k", 1) == i
            pool.release(conn)
    finally:
        await pool.close()
        await fake.close()


async def test_command_timeout_discards_connection() -> None:
    stall = asyncio.Event()
    fake = await FakeRedis(stall=stall).start()
    pool = _pool(fake.url, size=1, command_timeout=0.1)
    conn = await pool.acquire()
    with pytest.raises(AccountingError) as exc:
        await conn.execute("INCRBY", "k", 1)
    assert exc.value.kind == "timeout"
    pool.release(conn)
    assert pool.stats()["size"] == 0 and pool.stats()["discarded"] == 1
    stall.set()
    await pool.close()
    await fake.close()


async def test_dedicated_checkout_returns_connection(redis_server: RedisServer) -> None:
    pool = _pool(redis_server.url, size=1)
    with pytest.raises(RuntimeError):
        async with pool.connection() as conn:
            await conn.execute("MULTI")
            raise RuntimeError("boom")
    # Discarded (its MULTI is open), the slot is free again.
    assert pool.stats()["in_use"] == 0 and pool.stats()["size"] == 0
    async with pool.connection() as conn:
        assert await conn.execute("INCRBY", "k", 2) == 2
    assert pool.stats()["idle"] == 1

    async def blocked() -> None:
        async with pool.connection() as conn:
            await conn.execute("BLPOP", "nothing", 0)

    task = asyncio.create_task(blocked())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.stats()["in_use"] == 0
    async with pool.connection() as conn:
        assert await conn.execute("INCRBY", "k", 1) == 3
    await pool.close()


async def test_connect_failure_frees_the_slot() -> None:
    fake = await FakeRedis().start()
    port = fake.port
    await fake.close()
    pool = _pool(f"redis://127.0.0.1:{port}/0", size=2)
    for _ in range(5):
        with pytest.raises(AccountingError) as exc:
            await pool.acquire()
        assert exc.value.kind == "connect_error"
    # One connect tried; the four checkouts right after it fail fast during its backoff.
    assert pool.stats()["size"] == 0 and pool.stats()["errors"] == 1 and pool.stats()["fast_failures"] == 4
    await pool.close()


async def test_refused_login_backs_off_instead_of_connecting_per_checkout() -> None:
    # A wrong password used to cost every checkout a connect and an AUTH (23,000 in 5 s in raw
    # mode). Now a refused login backs new connects off like a refused connect: checkouts fail
    # at once with the login's error, and Redis sees a few connects a second.
    server = RedisServer(password="right").start()
    pool = _pool(f"redis://:wrong@127.0.0.1:{server.port}/0", size=5, wait=1.0)
    try:
        with server.client() as r:
            before = r.info("stats")["total_connections_received"]
            kinds: Counter[str] = Counter()
            t0 = time.monotonic()
            for _ in range(300):
                with pytest.raises(AccountingError) as exc:
                    await pool.acquire()
                kinds[exc.value.kind] += 1
                await asyncio.sleep(0.001)
            elapsed = time.monotonic() - t0
            connects = r.info("stats")["total_connections_received"] - before
            assert kinds == {"redis:WRONGPASS": 300}
            # Retries 25-50 ms apart at first, doubling to 250-500 ms: a handful, however slow the machine.
            assert connects <= 6 + elapsed / 0.25, (connects, elapsed)
            assert pool.stats()["fast_failures"] == 300 - pool.stats()["errors"] >= 250
            assert "WRONGPASS" in str(exc.value) and "backed off" in str(exc.value)
            # The password now matches: the first connect after the retry time succeeds.
            r.config_set("requirepass", "wrong")
        await _until_counted(pool)
        assert pool.stats()["created"] == 1
    finally:
        await pool.close()
        server.cleanup()


async def test_a_server_that_drops_every_command_sees_backed_off_connects() -> None:
    # A server that answers the connect's PING and then drops the connection at its first
    # command (a proxy with no Redis behind it) used to get a connect per checkout: each
    # connect "succeeded" and ended the backoff. Now a connection lost with its first command
    # unanswered is a failed connect, and after one the next connect ends the backoff only
    # once a command on it has its reply.
    fake = await FakeRedis(drop_commands=True).start()
    pool = _pool(fake.url, size=5, wait=1.0, command_timeout=1.0)
    kinds: Counter[str] = Counter()
    stop = time.monotonic() + 1.5

    async def client() -> None:
        while time.monotonic() < stop:
            try:
                async with pool.connection() as conn:
                    await conn.execute("INCRBY", "k", 1)
            except AccountingError as exc:
                kinds[exc.kind] += 1
            await asyncio.sleep(0.001)

    try:
        await asyncio.gather(*(client() for _ in range(10)))
        # Five connects at once at the start, then retries 25-50 ms apart, doubling to 250-500
        # ms: a dozen, where a connect per checkout made it over a thousand.
        assert fake.accepted <= 5 + 12, fake.accepted
        assert set(kinds) == {"connection_lost"} and kinds["connection_lost"] > 100, kinds
        assert pool.stats()["fast_failures"] > 100
        fake.drop_commands = False  # the server behind it is back
        assert await _until_counted(pool) == 1
        assert not pool.backoff.waiting()  # the trial answered: connects are admitted again
        async with pool.connection() as conn:
            assert await conn.execute("INCRBY", "k", 1) == 2
    finally:
        await pool.close()
        await fake.close()
