"""Multiplexed and batched modes against a real redis-server."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time

import aiohttp
import pytest

from gateway.config import parse_redis_url
from gateway.errors import AccountingError
from gateway.multiplexer import Multiplexer, UnsupportedCommand

from ..helpers import FakeRedis, RedisServer, eventually, make_config, running_gateway

TRUST_LOCAL = (ipaddress.ip_network("127.0.0.0/8"),)


def _mux(url: str, **kw: object) -> Multiplexer:
    return Multiplexer(parse_redis_url(url), **kw)  # type: ignore[arg-type]


async def _per_key_chains(
    mux: Multiplexer, keys: int, steps: int, tolerate_errors: bool = False
) -> dict[int, list[int]]:
    """Key i is incremented by (i + 1) each step; every reply must be a multiple of (i + 1)
    and strictly grow, so a reply delivered to the wrong caller cannot go unnoticed."""
    seen: dict[int, list[int]] = {i: [] for i in range(keys)}

    async def chain(i: int) -> None:
        for _ in range(steps):
            try:
                value = await mux.execute("INCRBY", f"mux:{i}", i + 1)
            except AccountingError:
                if not tolerate_errors:
                    raise
                await asyncio.sleep(0.001)
                continue
            assert isinstance(value, int) and value % (i + 1) == 0, (i, value)
            assert not seen[i] or value > seen[i][-1], (i, value, seen[i][-1])
            seen[i].append(value)

    await asyncio.gather(*(chain(i) for i in range(keys)))
    return seen


async def test_multiplexer_many_callers_each_get_their_own_reply(redis_server: RedisServer) -> None:
    mux = _mux(redis_server.url, connections=2)
    await mux.start(wait=2)
    try:
        seen = await _per_key_chains(mux, keys=200, steps=25)
        for i, values in seen.items():
            assert values == [(i + 1) * (j + 1) for j in range(25)]
    finally:
        await mux.close()


async def test_multiplexer_client_kill_mid_flight(redis_server: RedisServer) -> None:
    mux = _mux(redis_server.url, connections=1, backoff_initial=0.01, backoff_max=0.05)
    await mux.start(wait=2)
    killer_done = asyncio.Event()

    async def killer() -> None:
        for _ in range(5):
            await asyncio.sleep(0.03)
            await asyncio.to_thread(redis_server.client().client_kill_filter, _type="normal", skipme=True)
        killer_done.set()

    try:
        kill_task = asyncio.create_task(killer())
        seen = await _per_key_chains(mux, keys=50, steps=200, tolerate_errors=True)
        await kill_task
        assert mux.disconnects >= 1
        # After the kills, the next commands are correct again.
        await eventually(lambda: mux.connected == 1)
        r = redis_server.client()
        for i in range(50):
            value = await mux.execute("INCRBY", f"mux:{i}", i + 1)
            assert value == int(r.get(f"mux:{i}"))
            assert not seen[i] or value > seen[i][-1]
    finally:
        await mux.close()


async def test_multiplexer_backs_off_while_redis_refuses_it_at_maxclients(caplog: pytest.LogCaptureFixture) -> None:
    # Redis at maxclients accepts the TCP connect, then answers "-ERR max number of clients
    # reached" and closes. The multiplexer used to reset its backoff on the TCP connect and
    # reconnect at once: 2,000-5,000 refused connects a second with no traffic, and no log line.
    # A connection now has to answer its PING before it counts, and the reason is logged once.
    server = RedisServer("--maxclients", "2").start()
    r = server.client()
    hold = socket.create_connection(("127.0.0.1", server.port))
    mux = _mux(server.url, connect_timeout=1.0)
    try:
        r.ping()  # the harness client and `hold` take both slots
        caplog.set_level(logging.WARNING, logger="gateway.multiplexer")
        await mux.start()
        await asyncio.sleep(1.5)
        refused = r.info("stats")["rejected_connections"]
        # Retries 25-50 ms apart at first, doubling to 250-500 ms: about 8 in 1.5 s.
        assert 1 <= refused <= 20, refused
        with pytest.raises(AccountingError) as exc:
            await mux.execute("INCRBY", "k", 1)
        assert exc.value.kind == "redis:ERR" and "max number of clients" in str(exc.value)
        lines = [rec.getMessage() for rec in caplog.records]
        assert len(lines) == 1 and "max number of clients reached" in lines[0], lines
        hold.close()  # a slot frees up: the next attempt connects
        await mux.wait_connected(5)
        assert await mux.execute("INCRBY", "k", 1) == 1
        # Announced once a command has its reply (the slot looks every 250 ms).
        await eventually(lambda: len(caplog.records) >= 2)
        lines = [rec.getMessage() for rec in caplog.records]
        assert len(lines) == 2 and "re-established" in lines[1], lines
    finally:
        hold.close()
        r.close()
        await mux.close()
        server.cleanup()


async def test_multiplexer_backs_off_from_a_listener_that_accepts_and_closes() -> None:
    # Anything that accepts and hangs up at once (a proxy with no backend, a wrong port) used to
    # get 10,000 connects a second: the TCP connect alone reset the backoff.
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    mux = _mux(f"redis://127.0.0.1:{port}/0")
    try:
        await mux.start()
        await asyncio.sleep(1.5)
        assert 1 <= accepted <= 20, accepted
        assert mux.connected == 0 and mux.connects == 0 and abs(mux.connect_errors - accepted) <= 1
        with pytest.raises(AccountingError) as exc:
            await mux.execute("PING")
        assert exc.value.kind == "connection_lost"
    finally:
        await mux.close()
        listener.close()
        await listener.wait_closed()


async def test_multiplexer_backs_off_from_a_server_that_drops_every_command(caplog: pytest.LogCaptureFixture) -> None:
    # The server answers the connect's PING and drops the connection at the first command (a
    # proxy with no Redis behind it). The multiplexer used to count each such connect as a
    # success and reconnect at once, at the rate commands came. Now a connection that loses its
    # first commands unanswered is a failed connect: backed off, logged once, and the recovery
    # is announced only once a command has its reply.
    fake = await FakeRedis(drop_commands=True).start()
    mux = _mux(fake.url, connect_timeout=1.0)
    caplog.set_level(logging.WARNING, logger="gateway.multiplexer")
    kinds: set[str] = set()
    try:
        await mux.start(wait=2)
        stop = time.monotonic() + 1.5
        while time.monotonic() < stop:
            try:
                await mux.execute("INCRBY", "k", 1)
            except AccountingError as exc:
                kinds.add(exc.kind)
            await asyncio.sleep(0.001)
        # Retries 25-50 ms apart at first, doubling to 250-500 ms: about 8 in 1.5 s.
        assert 2 <= fake.accepted <= 14, fake.accepted
        assert kinds == {"connection_lost"}, kinds
        assert mux.connect_errors >= fake.accepted - 2
        lines = [rec.getMessage() for rec in caplog.records]
        assert len(lines) == 1 and "failed (connection_lost" in lines[0], lines
        fake.drop_commands = False  # the server behind it is back

        async def counted() -> bool:
            try:
                return isinstance(await mux.execute("INCRBY", "k", 1), int)
            except AccountingError:
                return False

        deadline = time.monotonic() + 5
        while not await counted():
            assert time.monotonic() < deadline, "the multiplexer did not reconnect"
            await asyncio.sleep(0.02)
        await eventually(lambda: len(caplog.records) == 2)
        assert "re-established" in caplog.records[1].getMessage()
    finally:
        await mux.close()
        await fake.close()


async def test_multiplexer_refuses_blocking_and_transactions(redis_server: RedisServer) -> None:
    mux = _mux(redis_server.url)
    await mux.start(wait=2)
    try:
        for cmd in (("BLPOP", "q", 0), ("MULTI",), ("WATCH", "k"), ("XREAD", "BLOCK", 0, "STREAMS", "s", "$"),
                    ("SUBSCRIBE", "c"), ("SELECT", 1)):  # fmt: skip
            with pytest.raises(UnsupportedCommand, match="connection of its own"):
                await mux.execute(*cmd)
        assert await mux.execute("XREAD", "STREAMS", "s", "0") is None  # non-blocking XREAD is fine
        assert await mux.execute("PING") == "PONG"
        # A pipeline: replies in order, an error reply returned in its place, not raised.
        replies = await mux.pipeline([("SET", "p", "x"), ("INCR", "p"), ("INCRBY", "q", 5)])
        assert replies[0] == "OK" and replies[1].prefix == "ERR" and replies[2] == 5  # type: ignore[union-attr]
        with pytest.raises(UnsupportedCommand):
            await mux.pipeline([("PING",), ("MULTI",)])
    finally:
        await mux.close()


async def _spread(base: str, plan: dict[str, int], concurrency: int = 100) -> list[int]:
    requests = [ip for ip, n in plan.items() for _ in range(n)]
    random.Random(7).shuffle(requests)
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def one(ip: str) -> int:
            async with sem, s.get(base + "/", allow_redirects=False, headers={"X-Forwarded-For": ip}) as r:
                return r.status

        return await asyncio.gather(*(one(ip) for ip in requests))


@pytest.mark.parametrize("shared_mode", ["multiplexed", "batched"])
async def test_exact_counts_across_many_ips(shared_mode: str, redis_server: RedisServer) -> None:
    plan = {f"10.9.{i // 250}.{i % 250}": 1 + i % 7 for i in range(300)}
    cfg = make_config(redis_server.url, shared_mode, trusted_proxies=TRUST_LOCAL, batch_max_keys=64)
    async with running_gateway(cfg) as (gw, base):
        statuses = await _spread(base, plan)
        assert set(statuses) == {302}
        assert gw.stats()["requests"]["counted"] == sum(plan.values())
    r = redis_server.client()
    for ip, n in plan.items():
        assert r.get(f"ip:{ip}") == str(n).encode(), ip


async def test_batched_survives_redis_restart_with_exact_counts() -> None:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    try:
        cfg = make_config(server.url, "batched", trusted_proxies=TRUST_LOCAL, command_timeout_ms=200,
                          connect_timeout_ms=200)  # fmt: skip
        async with running_gateway(cfg) as (gw, base):
            before = {f"10.1.0.{i}": 3 for i in range(20)}
            assert set(await _spread(base, before)) == {302}
            server.stop()
            during = {f"10.1.0.{i}": 2 for i in range(30)}
            assert set(await _spread(base, during)) == {302}  # answered while Redis is down
            assert gw.backend.stats()["pending_increments"] > 0
            await asyncio.sleep(0.3)
            server.start()
            await eventually(lambda: gw.backend.stats()["pending_increments"] == 0, timeout=10)
        r = server.client()
        for i in range(30):
            expected = before.get(f"10.1.0.{i}", 0) + during[f"10.1.0.{i}"]
            assert r.get(f"ip:10.1.0.{i}") == str(expected).encode()
    finally:
        server.cleanup()


async def test_batched_shutdown_flushes_pending(redis_server: RedisServer) -> None:
    # A window far longer than the test: only the shutdown flush can write the counts.
    cfg = make_config(redis_server.url, "batched", batch_window_ms=60_000, batch_ack="none",
                      trusted_proxies=TRUST_LOCAL)  # fmt: skip
    plan = {f"10.2.0.{i}": 4 for i in range(25)}
    async with running_gateway(cfg) as (gw, base):
        assert set(await _spread(base, plan)) == {302}
        assert redis_server.client().dbsize() == 0
        assert gw.backend.stats()["pending_increments"] == 100
    r = redis_server.client()
    assert all(r.get(f"ip:{ip}") == b"4" for ip in plan)


async def test_batched_overflow_is_counted(redis_server: RedisServer) -> None:
    cfg = make_config(redis_server.url, "batched", batch_window_ms=60_000, batch_ack="none", batch_max_pending=10,
                      trusted_proxies=TRUST_LOCAL)  # fmt: skip
    async with running_gateway(cfg) as (gw, base):
        assert set(await _spread(base, {f"10.3.0.{i}": 1 for i in range(15)}, concurrency=1)) == {302}
        assert gw.stats()["failures"] == {"overflow": 5}
        assert gw.backend.stats()["overflow"] == 5
    assert len(redis_server.client().keys("ip:*")) == 10


async def test_batched_without_ack_answers_at_once_and_counts_exactly(redis_server: RedisServer, http: str) -> None:
    plan = {f"10.3.2.{i}": 1 + i % 3 for i in range(40)}
    cfg = make_config(redis_server.url, "batched", batch_ack="none", trusted_proxies=TRUST_LOCAL, http=http)
    async with running_gateway(cfg) as (gw, base):
        assert set(await _spread(base, plan)) == {302}
        assert gw.stats()["requests"]["counted"] == sum(plan.values())
        # Added in line and answered at once: no request went through a coroutine.
        assert (gw.pipeline.via_coroutine, gw.pipeline.via_callbacks) == (0, 0)
        assert sum(gw.stats()["accounting_latency_s"]["counts"]) == sum(plan.values())
    r = redis_server.client()
    for ip, n in plan.items():
        assert r.get(f"ip:{ip}") == str(n).encode(), ip


async def test_batched_without_ack_deny_refuses_what_it_cannot_hold(redis_server: RedisServer) -> None:
    cfg = make_config(redis_server.url, "batched", batch_window_ms=60_000, batch_ack="none", batch_max_pending=10,
                      on_redis_error="deny", trusted_proxies=TRUST_LOCAL)  # fmt: skip
    async with running_gateway(cfg) as (gw, base):
        statuses = await _spread(base, {f"10.3.3.{i}": 1 for i in range(15)}, concurrency=1)
        assert sorted(statuses) == [302] * 10 + [503] * 5
        assert gw.stats()["failures"] == {"overflow": 5}
    assert len(redis_server.client().keys("ip:*")) == 10


async def test_batched_flush_at_max_keys(redis_server: RedisServer) -> None:
    cfg = make_config(redis_server.url, "batched", batch_window_ms=60_000, batch_max_keys=10,
                      trusted_proxies=TRUST_LOCAL)  # fmt: skip
    async with running_gateway(cfg) as (gw, base):
        # ack=flush with a one-minute window: these only complete because 10 keys trigger a flush.
        statuses = await asyncio.wait_for(_spread(base, {f"10.4.0.{i}": 1 for i in range(10)}), 10)
        assert set(statuses) == {302}
        assert gw.backend.stats()["last_flush_keys"] == 10


async def test_batched_uses_evalsha_and_survives_a_flushed_script_cache(redis_server: RedisServer) -> None:
    cfg = make_config(redis_server.url, "batched", trusted_proxies=TRUST_LOCAL)
    r = redis_server.client()
    first = {f"10.4.0.{i}": 3 for i in range(20)}
    second = {f"10.4.0.{i}": 2 for i in range(20)}
    async with running_gateway(cfg) as (gw, base):
        r.config_resetstat()
        assert set(await _spread(base, first, concurrency=1)) == {302}  # a flush per request
        calls = r.info("commandstats")
        # The first flush loads the script; later flushes name it by its hash.
        assert calls["cmdstat_eval"]["calls"] >= 1 and calls["cmdstat_evalsha"]["calls"] >= 1
        r.script_flush()  # what a Redis restart without the script does to the cache
        assert set(await _spread(base, second)) == {302}
        stats = gw.stats()
        # One EVALSHA met the empty cache (NOSCRIPT, nothing ran) and was resent as EVAL.
        assert r.info("commandstats")["cmdstat_evalsha"]["failed_calls"] == 1
    assert stats["requests"]["counted"] == 100 and not stats["failures"]
    assert stats["pool"]["flush_failures"] == 0
    assert all(r.get(f"ip:{ip}") == b"5" for ip in first)
