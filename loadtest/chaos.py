"""Fault scenarios against a real redis-server and the real gateway, with a table of what happened.

Each scenario starts its own redis-server and an in-process gateway, drives it
with closed-loop clients (each its own client IP in X-Forwarded-For), injects
one fault, and reports: requests sent, answered, 5xx, p99 latency, count drift
(Redis counters minus the increments the gateway confirmed), misdelivered
replies, and Redis connections left open after the gateway closed.

Misdelivery is checked through the count header: client i's counter starts at
i * 1 000 000, so a reply carrying another client's value cannot go unnoticed,
and each client's values must strictly grow.

The proxy scenarios (`--upstream`) fault the upstream instead: killed and restarted,
stalled. Their upstream answers each request with its own target, so a response
handed to the wrong request is caught (Misdelivered), and Conns left counts the
upstream connections still open after the gateway closed.

`python -m loadtest.chaos` (or `make chaos`) runs them all and prints the table;
the test suite runs the same functions and asserts on their results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp

from gateway.app import Gateway, Running
from gateway.config import Config, parse_redis_url, parse_upstream

from .procs import RedisProcess, free_port, stop_process, wait_port

COUNT_HEADER = "X-Request-Count"
BASE = 1_000_000
SHARED_MODES = ("multiplexed", "batched")
VALUE_MODES = ("naive", "pooled", "raw", "multiplexed")  # modes that return the new value
ALL_MODES = ("naive", "pooled", "raw", "multiplexed", "batched")


@dataclass
class Outcome:
    scenario: str
    mode: str
    sent: int = 0
    answered: int = 0
    status_5xx: int = 0
    other_status: int = 0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    drift: int = 0
    mismatches: int = 0
    conns_left: int = 0
    recovery_s: float | None = None  # paused: from resume to the first confirmed increment
    peak_conns: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # scenario-specific measurements
    failures: dict[str, int] = field(default_factory=dict)
    log_lines: int = 0
    notes: str = ""


def client_ip(i: int) -> str:
    return f"10.77.{i // 256}.{i % 256}"


def gateway_config(redis_url: str, mode: str, **kw: Any) -> Config:
    base: dict[str, Any] = {
        "listen": ("127.0.0.1", 0),
        "admin_listen": None,
        "trusted_proxies": (ipaddress.ip_network("127.0.0.1/32"),),
        "count_header": COUNT_HEADER,
        "shutdown_timeout_s": 3.0,
    }
    base.update(kw)
    return Config(mode=mode, redis=parse_redis_url(redis_url), **base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def gateway(config: Config) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway in this event loop; yields it and the base URL of its front end."""
    gw = Gateway(config)
    running = Running(gw)
    await running.start()
    try:
        host, port = running.addresses[0]
        yield gw, f"http://{host}:{port}"
    finally:
        await running.stop()


class LogCounter(logging.Handler):
    """Counts warning-or-worse records from the gateway's loggers during a scenario."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> LogCounter:
        logging.getLogger("gateway").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("gateway").removeHandler(self)


class Load:
    """Closed-loop clients: each sends one request at a time until told to stop."""

    def __init__(self, base: str, clients: int = 20, timeout: float = 10.0) -> None:
        self.base = base
        self.clients = clients
        self.timeout = timeout
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.sent = 0
        self.errors = 0
        self.mismatches = 0
        self.last_value: dict[int, int] = {}
        self._stop = asyncio.Event()

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        headers = {"X-Forwarded-For": client_ip(i)}
        while not self._stop.is_set():
            self.sent += 1
            t0 = time.monotonic()
            try:
                async with session.get(self.base + "/", headers=headers, allow_redirects=False) as r:
                    await r.read()
                    status, value = r.status, r.headers.get(COUNT_HEADER)
            except (TimeoutError, aiohttp.ClientError):
                self.errors += 1
                await asyncio.sleep(0.01)
                continue
            now = time.monotonic()
            self.latencies.append(now - t0)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if value is not None:
                v = int(value)
                if v // BASE != i or v <= self.last_value.get(i, i * BASE):
                    self.mismatches += 1
                self.last_value[i] = v

    async def run(self, fault: Callable[[], Awaitable[None]], settle: float = 0.0) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        connector = aiohttp.TCPConnector(limit=self.clients)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks = [asyncio.create_task(self._client(session, i)) for i in range(self.clients)]
            try:
                await fault()
                await asyncio.sleep(settle)
            finally:
                self._stop.set()
                await asyncio.gather(*tasks)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def p99_ms(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class IdleDropRelay:
    """A TCP relay in front of Redis that forgets a flow idle longer than `idle_s`, the way a
    cloud load balancer or NAT does: from then on it silently discards that connection's bytes
    both ways (no FIN, no RST). `dropped` counts flows forgotten."""

    def __init__(self, target_port: int, idle_s: float = 1.0) -> None:
        self.target_port = target_port
        self.idle_s = idle_s
        self.port = 0
        self.dropped = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> IdleDropRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        flow = {"last": loop.time(), "dead": False}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    now = loop.time()
                    if not flow["dead"] and now - flow["last"] > self.idle_s:
                        flow["dead"] = True
                        self.dropped += 1
                    if flow["dead"]:
                        continue  # forgotten: the bytes go nowhere, and nobody is told
                    flow["last"] = now
                    dst.write(data)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the relay is closing
        finally:
            self._writers.difference_update((writer, up_writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()


def seed_counters(server: RedisProcess, clients: int) -> None:
    with server.client() as r:
        r.mset({f"ip:{client_ip(i)}": i * BASE for i in range(clients)})


def drift(server: RedisProcess, clients: int, gw: Gateway) -> int:
    """Redis counters minus what the gateway accounted for: increments confirmed, plus (batched)
    increments held during an outage. Positive: applied but unconfirmed; negative: lost."""
    seeded = sum(i * BASE for i in range(clients))
    return server.counter_sum("ip:10.77.*") - seeded - gw.pipeline.counted - gw.pipeline.deferred


def fill(out: Outcome, load: Load, gw: Gateway, logs: LogCounter | None = None) -> Outcome:
    out.sent = load.sent
    out.answered = load.answered
    out.status_5xx = sum(n for s, n in load.statuses.items() if s >= 500)
    out.other_status = sum(n for s, n in load.statuses.items() if s not in (302,) and s < 500)
    out.p99_ms = round(load.p99_ms(), 1)
    out.max_ms = round(1000 * max(load.latencies, default=0.0), 1)
    out.mismatches = load.mismatches
    out.failures = dict(gw.pipeline.failures)
    if logs is not None:
        out.log_lines = len(logs.records)
    return out


async def _connections_after(server: RedisProcess) -> int:
    await asyncio.sleep(0.2)
    return await asyncio.to_thread(server.client_count)


# -- scenarios ---------------------------------------------------------------------------


async def paused(mode: str, pause_s: float = 3.0, clients: int = 20) -> Outcome:
    """Redis SIGSTOPped for `pause_s` under load, then resumed."""
    server = RedisProcess().start()
    out = Outcome("redis paused 3 s", mode)
    try:
        seed_counters(server, clients)
        cfg = gateway_config(server.url, mode)
        with LogCounter() as logs:
            async with gateway(cfg) as (gw, base):
                load = Load(base, clients)
                resumed_at = 0.0

                async def fault() -> None:
                    nonlocal resumed_at
                    await asyncio.sleep(1.0)
                    server.pause()
                    await asyncio.sleep(pause_s)
                    server.resume()
                    resumed_at = time.monotonic()
                    await asyncio.sleep(2.0)

                confirmed: list[float] = []

                async def watch() -> None:
                    last = gw.pipeline.counted
                    while True:
                        await asyncio.sleep(0.005)
                        if gw.pipeline.counted > last:
                            confirmed.append(time.monotonic())
                            last = gw.pipeline.counted

                watcher = asyncio.create_task(watch())
                await load.run(fault)
                watcher.cancel()
                await gw.backend.close()
                out.drift = drift(server, clients, gw)
                after = [t for t in confirmed if t > resumed_at]
                out.recovery_s = round(after[0] - resumed_at, 3) if after else None
                fill(out, load, gw, logs)
        out.conns_left = await _connections_after(server)
    finally:
        server.cleanup()
    return out


async def connections_killed(mode: str, kill_for_s: float = 3.0, clients: int = 20) -> Outcome:
    """CLIENT KILL TYPE normal every 100 ms under load."""
    server = RedisProcess().start()
    out = Outcome("connections killed every 100 ms", mode)
    try:
        seed_counters(server, clients)
        cfg = gateway_config(server.url, mode, pool_size=10)
        peak = 0
        async with gateway(cfg) as (gw, base):
            load = Load(base, clients)

            async def fault() -> None:
                nonlocal peak
                killer = server.client()
                deadline = time.monotonic() + kill_for_s
                await asyncio.sleep(0.5)
                while time.monotonic() < deadline:
                    await asyncio.to_thread(killer.client_kill_filter, _type="normal", skipme=True)
                    await asyncio.sleep(0.1)
                    peak = max(peak, await asyncio.to_thread(server.client_count))
                killer.close()
                await asyncio.sleep(1.0)  # the pool recovers; requests count again
                for _ in range(10):
                    peak = max(peak, await asyncio.to_thread(server.client_count))
                    await asyncio.sleep(0.05)

            await load.run(fault)
            await gw.backend.close()
            fill(out, load, gw)
            out.drift = drift(server, clients, gw)
            allowed = cfg.mux_connections if mode in SHARED_MODES else cfg.pool_size
            out.peak_conns = peak
            out.extra["limit"] = allowed
            out.notes = f"peak Redis connections {peak} (limit {allowed})"
        out.conns_left = await _connections_after(server)
    finally:
        server.cleanup()
    return out


async def restarted(mode: str, down_s: float = 1.0, clients: int = 20) -> Outcome:
    """Redis with AOF (fsync always) stopped gracefully and restarted under load."""
    server = RedisProcess("--appendonly", "yes", "--appendfsync", "always").start()
    out = Outcome("redis restarted (AOF)", mode)
    try:
        seed_counters(server, clients)
        cfg = gateway_config(server.url, mode, pool_wait_ms=300, connect_timeout_ms=300, command_timeout_ms=300)
        async with gateway(cfg) as (gw, base):
            load = Load(base, clients)

            async def fault() -> None:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(server.stop)
                await asyncio.sleep(down_s)
                await asyncio.to_thread(server.start)
                out.extra["counted_at_restart"] = gw.pipeline.counted
                await asyncio.sleep(2.0)

            await load.run(fault)
            await gw.backend.close()
            fill(out, load, gw)
            out.drift = drift(server, clients, gw)
            out.extra["counted_after_restart"] = gw.pipeline.counted - out.extra.get("counted_at_restart", 0)
            out.notes = f"{out.extra['counted_after_restart']} increments confirmed after the restart"
        out.conns_left = await _connections_after(server)
    finally:
        server.cleanup()
    return out


async def error_replies(kind: str, mode: str = "raw", clients: int = 10) -> Outcome:
    """Redis answers errors: a key of the wrong type, maxclients, AUTH failure, a READONLY replica."""
    extra: list[str] = []
    password = None
    if kind == "auth":
        password = "right-password"
    if kind == "maxclients":
        extra = ["--maxclients", "2"]
    server = RedisProcess(*extra, password=password).start()
    replica: RedisProcess | None = None
    holders: list[Any] = []
    out = Outcome(f"error: {kind}", mode)
    try:
        url = server.url
        if kind == "wrongtype":
            with server.client() as r:
                for i in range(clients):
                    r.lpush(f"ip:{client_ip(i)}", "x")
        elif kind == "maxclients":
            # Take both client slots, so the gateway's connections are refused with an error reply.
            holders = [server.client(), server.client()]
            for h in holders:
                h.ping()
        elif kind == "auth":
            url = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        elif kind == "readonly":
            replica = RedisProcess("--replicaof", "127.0.0.1", str(server.port)).start()
            url = replica.url
        cfg = gateway_config(url, mode, pool_wait_ms=200, connect_timeout_ms=200, command_timeout_ms=200)
        # Connects Redis saw (accepted or refused) while refusing the gateway: a refused login or
        # maxclients must put connects into backoff, not cost one per request.
        if not holders:
            holders.append(server.client())  # closed with the others
        probe = holders[0]

        def connects() -> int:
            info = probe.info("stats")
            return int(info["total_connections_received"]) + int(info["rejected_connections"])

        with LogCounter() as logs:
            async with gateway(cfg) as (gw, base):
                load = Load(base, clients)
                before, t0 = connects(), time.monotonic()

                async def fault() -> None:
                    await asyncio.sleep(1.5)

                await load.run(fault)
                if kind in ("auth", "maxclients"):
                    rate = (connects() - before) / (time.monotonic() - t0)
                    out.extra["redis_connects_per_s"] = round(rate, 1)
                    out.notes = f"{rate:.0f} Redis connects/s"
                await gw.backend.close()
                fill(out, load, gw, logs)
    finally:
        for h in holders:
            h.close()
        if replica is not None:
            replica.cleanup()
        server.cleanup()
    return out


async def bad_key(mode: str, clients: int = 200, duration_s: float = 2.0) -> Outcome:
    """One counter key of the wrong type (a hash) among `clients` addresses under load: its
    requests fail with redis:WRONGTYPE, the others must count exactly, and the log must not
    get a line each time a failure follows a success."""
    server = RedisProcess().start()
    out = Outcome(f"one bad key among {clients} clients", mode)
    try:
        seed_counters(server, clients)
        bad = client_ip(7)
        with server.client() as r:
            r.delete(f"ip:{bad}")
            r.hset(f"ip:{bad}", "a", "b")
        cfg = gateway_config(server.url, mode, count_header=None)
        with LogCounter() as logs:
            async with gateway(cfg) as (gw, base):
                load = Load(base, clients)

                async def fault() -> None:
                    await asyncio.sleep(duration_s)

                await load.run(fault)
                await gw.backend.close()
                fill(out, load, gw, logs)
        seeded = sum(i * BASE for i in range(clients) if i != 7)
        out.drift = server.counter_sum("ip:10.77.*") - seeded - gw.pipeline.counted
        out.conns_left = await _connections_after(server)
    finally:
        server.cleanup()
    return out


ABANDONED = 60  # requests whose clients leave mid-request in `client_disconnects`


async def client_disconnects(mode: str, clients: int = 20) -> Outcome:
    """Clients give up mid-request (Redis paused), then normal traffic checks every reply."""
    server = RedisProcess().start()
    out = Outcome("clients disconnect mid-request", mode)
    try:
        seed_counters(server, clients)
        cfg = gateway_config(server.url, mode, pool_size=5, command_timeout_ms=2000, pool_wait_ms=2000)
        async with gateway(cfg) as (gw, base):
            server.pause()
            async with aiohttp.ClientSession() as s:

                async def give_up(i: int) -> None:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with s.get(base + "/", headers={"X-Forwarded-For": client_ip(i)}) as r:
                            await r.read()

                # Each client gives up once its request reached the gateway (a timer instead
                # would leave some unsent on a loaded machine): all 60 are then mid-request.
                waiting = [asyncio.create_task(give_up(i % clients)) for i in range(ABANDONED)]
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5.0
                while gw.stats()["requests"]["total"] < ABANDONED and loop.time() < deadline:
                    await asyncio.sleep(0.01)
                for task in waiting:
                    task.cancel()
                await asyncio.gather(*waiting, return_exceptions=True)
            out.extra["abandoned_received"] = gw.stats()["requests"]["total"]
            server.resume()
            await asyncio.sleep(0.5)
            load = Load(base, clients)

            async def steady() -> None:
                await asyncio.sleep(1.5)

            await load.run(steady)
            stats = gw.backend.stats()
            out.extra["in_use_after"] = stats.get("in_use", stats.get("in_flight", 0))
            out.notes = f"in use after settle: {out.extra['in_use_after']}"
            await gw.backend.close()
            fill(out, load, gw)
            out.drift = drift(server, clients, gw)
            # The abandoned requests were received, so they were counted; only their answers went unseen.
            seeded = sum(i * BASE for i in range(clients))
            out.extra["abandoned_counted"] = server.counter_sum("ip:10.77.*") - seeded - load.statuses.get(302, 0)
        out.conns_left = await _connections_after(server)
    finally:
        server.cleanup()
    return out


async def slowloris(mode: str = "raw", slow: int = 300, clients: int = 10) -> Outcome:
    """`slow` connections trickle header bytes while normal clients are served."""
    server = RedisProcess().start()
    out = Outcome(f"slowloris ({slow} connections)", mode)
    try:
        seed_counters(server, clients)
        cfg = gateway_config(server.url, mode, request_timeout_s=2.0)
        async with gateway(cfg) as (gw, base):
            host, port = base.removeprefix("http://").rsplit(":", 1)

            async def trickle() -> None:
                try:
                    reader, writer = await asyncio.open_connection(host, int(port))
                except OSError:
                    return
                try:
                    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                        if writer.is_closing():
                            break
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(0.25)
                        if reader.at_eof():
                            break
                except (ConnectionError, OSError, RuntimeError):
                    pass  # closed by the gateway: what the scenario expects
                finally:
                    writer.close()

            load = Load(base, clients)
            slow_tasks = [asyncio.create_task(trickle()) for _ in range(slow)]

            async def fault() -> None:
                await asyncio.sleep(4.0)

            await load.run(fault)
            await asyncio.wait_for(asyncio.gather(*slow_tasks), 10)
            await gw.backend.close()
            fill(out, load, gw)
            guard = gw.server.stats() if gw.server else {}
            out.extra["head_timeouts"] = guard.get("head_timeouts", 0)
            out.notes = f"slow connections closed with 408: {out.extra['head_timeouts']}/{slow}"
            out.drift = drift(server, clients, gw)
        out.conns_left = await _connections_after(server)
    finally:
        server.cleanup()
    return out


async def idle_flows_forgotten(mode: str, variant: str, relay_idle_s: float = 1.0, pause_s: float = 1.5) -> Outcome:
    """A middlebox between the gateway and Redis forgets flows idle for `relay_idle_s` (silently);
    traffic comes in bursts of sequential requests with pauses longer than that. `variant`:
    `off` (no lifecycle), `idle timeout` (half the relay's), or `check` (300 ms, check alone)."""
    server = RedisProcess().start()
    relay = await IdleDropRelay(server.port, relay_idle_s).start()
    out = Outcome(f"flows idle {relay_idle_s:g} s forgotten: {variant}", mode)
    lifecycle: dict[str, Any] = {"pool_idle_timeout_s": 0.0, "pool_check_after_ms": None}
    if variant == "idle timeout":
        lifecycle["pool_idle_timeout_s"] = relay_idle_s / 2
    elif variant == "check":
        lifecycle["pool_check_after_ms"] = 300.0
    bursts, burst = 4, 50
    try:
        seed_counters(server, 1)
        cfg = gateway_config(relay.url(), mode, **lifecycle)
        with LogCounter() as logs:
            async with gateway(cfg) as (gw, base):
                load = Load(base, 1)
                firsts: list[float] = []
                async with aiohttp.ClientSession() as session:
                    headers = {"X-Forwarded-For": client_ip(0)}
                    for b in range(bursts):
                        if b:
                            await asyncio.sleep(pause_s)
                        for i in range(burst):
                            load.sent += 1
                            t0 = time.monotonic()
                            async with session.get(base + "/", headers=headers, allow_redirects=False) as r:
                                await r.read()
                                status, value = r.status, r.headers.get(COUNT_HEADER)
                            load.latencies.append(time.monotonic() - t0)
                            if i == 0 and b:
                                firsts.append(load.latencies[-1])
                            load.statuses[status] = load.statuses.get(status, 0) + 1
                            if value is not None:
                                v = int(value)
                                if v // BASE != 0 or v <= load.last_value.get(0, 0):
                                    load.mismatches += 1
                                load.last_value[0] = v
                await gw.backend.close()
                fill(out, load, gw, logs)
                out.drift = drift(server, 1, gw)
                pool = gw.backend.stats()
                req = gw.pipeline.request_stats()
                out.extra.update(
                    failed=req["failed"], deferred=req["deferred"], counted=req["counted"], dropped=relay.dropped,
                    first_after_pause_ms=round(1000 * max(firsts, default=0.0), 1),
                    **{k: pool.get(k, 0) for k in ("closed_idle", "checks", "check_failures")},
                )  # fmt: skip
                out.notes = (
                    f"{req['failed']} failed, {req['deferred']} deferred of {load.sent}; flows forgotten "
                    f"{relay.dropped}; closed idle {pool.get('closed_idle', 0)}, checks {pool.get('checks', 0)} "
                    f"({pool.get('check_failures', 0)} failed); first request after a pause "
                    f"{out.extra['first_after_pause_ms']:.0f} ms"
                )
        out.conns_left = await _connections_after(server)
    finally:
        await relay.close()
        server.cleanup()
    return out


async def rotation(mode: str, clients: int = 20, duration_s: float = 3.0) -> Outcome:
    """Connections rotated under load: a 1 s lifetime with 0.5 s of jitter, pool of 10."""
    server = RedisProcess().start()
    out = Outcome("lifetime 1 s + 0.5 s jitter under load", mode)
    try:
        seed_counters(server, clients)
        cfg = gateway_config(server.url, mode, pool_size=10, pool_max_lifetime_s=1.0, pool_lifetime_jitter_s=0.5)
        peak = 0
        async with gateway(cfg) as (gw, base):
            load = Load(base, clients)

            async def fault() -> None:
                nonlocal peak
                deadline = time.monotonic() + duration_s
                while time.monotonic() < deadline:
                    peak = max(peak, await asyncio.to_thread(server.client_count))
                    await asyncio.sleep(0.05)

            await load.run(fault)
            stats = gw.backend.stats()
            await gw.backend.close()
            fill(out, load, gw)
            out.drift = drift(server, clients, gw)
            allowed = cfg.pool_size if mode not in SHARED_MODES else cfg.mux_connections + 1
            out.peak_conns = peak
            out.extra.update(limit=allowed, expired=stats.get("expired", 0))
            out.notes = (
                f"{stats.get('expired', 0)} connections retired; peak Redis connections {peak} (limit {allowed}"
                + (", the replacement opened first)" if mode in SHARED_MODES else ")")
            )
        out.conns_left = await _connections_after(server)
    finally:
        server.cleanup()
    return out


async def graceful_shutdown(mode: str = "batched", clients: int = 20) -> Outcome:
    """SIGTERM to a gateway process under load: drain, flush, close Redis, exit 0."""
    server = RedisProcess().start()
    out = Outcome("SIGTERM under load", mode)
    port = free_port()
    args = [sys.executable, "-m", "gateway", "--mode", mode, "--listen", f"127.0.0.1:{port}", "--admin-listen", "off",
            "--redis-url", server.url, "--trusted-proxy", "127.0.0.1", "--count-header", COUNT_HEADER,
            "--shutdown-timeout-s", "5", "--log-level", "WARNING"]  # fmt: skip
    if mode == "batched":
        # Hold increments for a long window: only the shutdown flush can write them.
        args += ["--batch-window-ms", "60000", "--batch-ack", "none"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seed_counters(server, clients)
        await asyncio.to_thread(wait_port, port, proc)
        load = Load(f"http://127.0.0.1:{port}", clients)
        exit_s = 0.0

        async def fault() -> None:
            nonlocal exit_s
            await asyncio.sleep(1.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 20)
            exit_s = time.monotonic() - t0

        await load.run(fault)
        out.sent, out.answered = load.sent, load.answered
        out.status_5xx = sum(n for s, n in load.statuses.items() if s >= 500)
        out.p99_ms = round(load.p99_ms(), 1)
        out.max_ms = round(1000 * max(load.latencies, default=0.0), 1)
        seeded = sum(i * BASE for i in range(clients))
        out.drift = server.counter_sum("ip:10.77.*") - seeded - load.statuses.get(302, 0)
        out.extra["exit_s"] = round(exit_s, 2)
        out.extra["returncode"] = proc.returncode
        err = proc.stderr.read() if proc.stderr else ""
        out.extra["traceback"] = "Traceback" in err
        out.notes = f"exit {proc.returncode} after {exit_s:.2f} s" + ("; traceback!" if "Traceback" in err else "")
        out.conns_left = await _connections_after(server)
    finally:
        stop_process(proc, timeout=5)
        server.cleanup()
    return out


# -- the table -------------------------------------------------------------------------------


class ChaosUpstream:
    """A small HTTP/1.1 upstream for the proxy scenarios: answers each request with its target as
    the body (keep-alive); `stall` holds the answers; `kill` aborts every connection and stops
    listening, `start` listens again on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.go = asyncio.Event()
        self.go.set()

    async def start(self) -> ChaosUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                await self.go.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()

    async def kill(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            await self.server.wait_closed()
            self.server = None


async def _proxy_load(base: str, clients: int, out: Outcome, stop: asyncio.Event) -> list[float]:
    """Closed-loop GETs, each for a target of its own; counts statuses and misdelivered bodies."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client(i: int) -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                out.sent += 1
                path = f"/c{i}/{seq}"
                t0 = time.monotonic()
                try:
                    async with session.get(base + path, headers={"X-Forwarded-For": client_ip(i)}) as r:
                        body = await r.read()
                        status = r.status
                except (TimeoutError, aiohttp.ClientError):
                    out.extra["client_errors"] = out.extra.get("client_errors", 0) + 1
                    await asyncio.sleep(0.01)
                    continue
                latencies.append(time.monotonic() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200 and body != path.encode():
                    out.mismatches += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    out.answered = sum(statuses.values())
    out.status_5xx = sum(n for st, n in statuses.items() if st >= 500)
    out.other_status = sum(n for st, n in statuses.items() if st != 200 and st < 500)
    out.extra["statuses"] = statuses
    return latencies


async def upstream_fault(fault: str, mode: str = "batched", clients: int = 20) -> Outcome:
    """The proxy under load while an upstream is `restarted` (one of two killed for a second, then
    back), `down` (the only one killed for a second, then back) or `stalled` (answers held 1.5 s)."""
    server = RedisProcess().start()
    names = {
        "restarted": "upstream killed and restarted (one of two)",
        "down": "upstream killed and restarted (the only one)",
        "stalled": "upstream stalled",
    }
    out = Outcome(names[fault], mode)
    ups = [await ChaosUpstream().start() for _ in range(1 if fault in ("down", "stalled") else 2)]
    try:
        seed_counters(server, clients)
        cfg = gateway_config(
            server.url,
            mode,
            upstreams=tuple(parse_upstream(u.url) for u in ups),
            upstream_response_timeout_s=0.5,
            upstream_fail_timeout_s=0.5,
        )
        with LogCounter() as logs:
            async with gateway(cfg) as (gw, base):
                stop = asyncio.Event()
                load = asyncio.ensure_future(_proxy_load(base, clients, out, stop))
                await asyncio.sleep(1.0)
                victim = ups[-1]
                if fault == "stalled":
                    victim.go.clear()
                    await asyncio.sleep(1.5)
                    victim.go.set()
                else:
                    await victim.kill()
                    await asyncio.sleep(1.0)
                    await victim.start()
                await asyncio.sleep(1.5)
                stop.set()
                latencies = await load
                upstream = gw.stats()["upstream"]
                out.extra["in_use_after"] = sum(s["connections"]["in_use"] for s in upstream["servers"].values())
                out.extra["retries"] = upstream["retries"]
                out.failures = {f"upstream:{k}": v for k, v in upstream["errors"].items()}
                await gw.backend.close()
                out.drift = drift(server, clients, gw)
            out.log_lines = len(logs.records)
        await asyncio.sleep(0.1)
        out.conns_left = sum(len(u.writers) for u in ups)
        ordered = sorted(latencies)
        if ordered:
            out.p99_ms = round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)
            out.max_ms = round(1000 * ordered[-1], 1)
        out.notes = f"retries {out.extra['retries']}, upstream connections in use after: {out.extra['in_use_after']}"
    finally:
        for u in ups:
            await u.kill()
        server.cleanup()
    return out


def table(rows: list[Outcome]) -> str:
    lines = [
        "| Scenario | Mode | Sent | Answered | 5xx | p99 ms | max ms | Count drift | Misdelivered "
        "| Conns left | Notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        notes = [r.notes] if r.notes else []
        if r.scenario.startswith("redis paused") and r.recovery_s is not None:
            notes.insert(0, f"counting again {r.recovery_s:.2f} s after resume")
        if r.failures:
            notes.append(", ".join(f"{k}={v}" for k, v in sorted(r.failures.items())))
        if r.log_lines:
            notes.append(f"{r.log_lines} log line(s)")
        lines.append(
            f"| {r.scenario} | {r.mode} | {r.sent} | {r.answered} | {r.status_5xx} | {r.p99_ms:.0f} | {r.max_ms:.0f} "
            f"| {r.drift} | {r.mismatches} | {r.conns_left} | {'; '.join(notes)} |"
        )
    return "\n".join(lines) + "\n"


LIFECYCLE_MODES = ("raw", "multiplexed", "batched")


async def run_all(modes: tuple[str, ...], scenarios: str = "all") -> list[Outcome]:
    plan: list[Callable[[], Awaitable[Outcome]]] = []
    if scenarios == "lifecycle":
        lc = [m for m in modes if m in LIFECYCLE_MODES]
        plan += [partial(idle_flows_forgotten, m, v) for v in ("off", "idle timeout", "check") for m in lc]
        plan += [partial(rotation, m) for m in lc]
        return await _run(plan)
    plan += [partial(paused, m) for m in modes]
    plan += [partial(connections_killed, m) for m in modes]
    plan += [partial(restarted, m) for m in modes]
    plan += [partial(error_replies, k) for k in ("wrongtype", "readonly")]
    plan += [partial(error_replies, k, m) for k in ("maxclients", "auth") for m in modes]
    plan += [partial(bad_key, m) for m in modes]
    plan += [partial(client_disconnects, m) for m in modes]
    plan += [slowloris, partial(graceful_shutdown, "batched"), partial(graceful_shutdown, "raw")]
    plan += [partial(upstream_fault, f) for f in ("restarted", "down", "stalled")]
    lc = [m for m in modes if m in LIFECYCLE_MODES]
    plan += [partial(idle_flows_forgotten, m, v) for v in ("off", "idle timeout", "check") for m in lc]
    plan += [partial(rotation, m) for m in lc]
    return await _run(plan)


async def _run(plan: list[Callable[[], Awaitable[Outcome]]]) -> list[Outcome]:
    rows = []
    for i, step in enumerate(plan, 1):
        try:
            row = await step()
        except Exception as exc:  # one broken scenario must not hide the others' results
            row = Outcome(f"step {i}", "?", notes=f"scenario failed: {exc!r}")
        print(f"[{i}/{len(plan)}] {row.scenario} / {row.mode}: answered {row.answered}/{row.sent}, "
              f"drift {row.drift}", file=sys.stderr, flush=True)  # fmt: skip
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(ALL_MODES), help="comma-separated modes (default: all)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument(
        "--scenarios",
        choices=("all", "lifecycle"),
        default="all",
        help="all scenarios, or only the pool lifecycle ones (idle flows forgotten, rotation)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    # The gateway's warnings are counted per scenario (LogCounter), not printed.
    logging.getLogger("gateway").setLevel(logging.WARNING)
    logging.getLogger("gateway").propagate = False
    # Between scenarios no LogCounter is attached; without a handler Python's last-resort one prints.
    logging.getLogger("gateway").addHandler(logging.NullHandler())
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        rows = runner.run(run_all(tuple(a.modes.split(",")), a.scenarios))
    text = table(rows)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
