"""Test helpers: real redis-server processes on free ports, a fake RESP server for
faults only it can produce, and an in-process gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from gateway.config import Config, parse_redis_url
from gateway.resp import Parser
from loadtest.chaos import IdleDropRelay
from loadtest.chaos import gateway as running_gateway
from loadtest.procs import RedisProcess, free_port, stop_process, wait_port

T = TypeVar("T")


class RedisServer(RedisProcess):
    """A real redis-server owned by one test or session (see loadtest.procs).

    `client()` hands out one harness client per database, reused by every caller and closed by
    `cleanup()`, so a test need not close the clients it asks for (closing one is harmless: it
    reconnects when used again)."""

    def __init__(self, *extra: str, **kw: Any) -> None:
        super().__init__(*extra, **kw)
        self._clients: dict[int, redis.Redis] = {}

    def client(self, db: int = 0) -> redis.Redis:
        c = self._clients.get(db)
        if c is None:
            c = self._clients[db] = super().client(db)
        return c

    def cleanup(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        super().cleanup()


@dataclass
class FakeRedis:
    """A tiny RESP server for faults a real Redis will not produce on demand.

    It answers INCRBY from its own dict and PING/AUTH/SELECT with +OK/+PONG.
    `handshake_delay` slows the first reply of each connection (a slow accept),
    `stall` holds every INCRBY reply until released (the connect's PING, AUTH and SELECT
    are answered), `split` sends replies a byte at a time, `drop_commands` answers the connect's
    PING, AUTH and SELECT and drops the connection at any other command, unanswered (a proxy
    with nothing behind it); it can be switched while the server runs.
    """

    handshake_delay: float = 0.0
    split: bool = False
    stall: asyncio.Event | None = None
    drop_commands: bool = False
    counts: dict[bytes, int] = field(default_factory=dict)
    current: int = 0
    peak: int = 0
    accepted: int = 0
    commands: list[list[bytes]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> FakeRedis:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.current += 1
        self.peak = max(self.peak, self.current)
        self._writers.add(writer)
        parser = Parser()
        first = True
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                for cmd in parser.replies():
                    assert isinstance(cmd, list)
                    self.commands.append(cmd)
                    if self.drop_commands and cmd[0].upper() not in (b"PING", b"AUTH", b"SELECT"):
                        writer.transport.abort()
                        return
                    if first and self.handshake_delay:
                        await asyncio.sleep(self.handshake_delay)
                    first = False
                    if self.stall is not None and cmd[0].upper() == b"INCRBY":
                        await self.stall.wait()
                    reply = self._reply(cmd)
                    if self.split:
                        for i in range(len(reply)):
                            writer.write(reply[i : i + 1])
                            await writer.drain()
                            await asyncio.sleep(0)
                    else:
                        writer.write(reply)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.current -= 1
            self._writers.discard(writer)
            writer.close()

    def _reply(self, cmd: list[bytes]) -> bytes:
        name = cmd[0].upper()
        if name == b"INCRBY":
            self.counts[cmd[1]] = self.counts.get(cmd[1], 0) + int(cmd[2])
            return b":%d\r\n" % self.counts[cmd[1]]
        if name == b"PING":
            return b"+PONG\r\n"
        if name in (b"AUTH", b"SELECT"):
            return b"+OK\r\n"
        return b"-ERR unknown command\r\n"

    async def close(self) -> None:
        if self._server:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()


def make_config(redis_url: str, mode: str = "raw", **kw: object) -> Config:
    defaults: dict[str, object] = {
        "listen": ("127.0.0.1", 0),
        "admin_listen": None,
        "pool_wait_ms": 1000.0,
        "connect_timeout_ms": 500.0,
        "command_timeout_ms": 500.0,
    }
    defaults.update(kw)
    return Config(mode=mode, redis=parse_redis_url(redis_url), **defaults)  # type: ignore[arg-type]


async def peak_clients(server: RedisServer, work: Awaitable[T]) -> tuple[T, int]:
    """Run `work` while sampling the server's client count; its result and the peak seen."""
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await asyncio.to_thread(server.client_count))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        return await work, peak
    finally:
        done.set()
        await watcher


async def eventually(check: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class HAProxyReference:
    """The HAProxy+Lua reference (haproxy/run.sh) on free ports, against a given Redis."""

    LISTENERS = ("calibration", "naive", "pooled", "raw")
    # The seed's own code (lua_reference/seed.lua), as benchmark targets beside the reference.
    SEED_LISTENERS = ("seed-pooled", "seed-raw")
    # Count, then forward to HAPROXY_UPSTREAM (the benchmark's proxy targets).
    PROXY_LISTENERS = ("proxy-calibration", "proxy-naive", "proxy-pooled", "proxy-raw")
    # raw with a stick-table rate limit (HAPROXY_LIMIT_RATE per HAPROXY_LIMIT_PERIOD).
    LIMITED_LISTENERS = ("raw-limited",)

    def __init__(self, redis_port: int, trusted: str = "127.0.0.0/8", pool_size: int = 20, **env: str) -> None:
        names = (*self.LISTENERS, *self.SEED_LISTENERS, *self.PROXY_LISTENERS, *self.LIMITED_LISTENERS, "stats")
        self.ports = {name: free_port() for name in names}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.script = os.path.join(root, "haproxy", "run.sh")
        self.env = {
            **os.environ,
            "HAPROXY_BIND": "127.0.0.1",
            "REF_REDIS_PORT": str(redis_port),
            "REF_TRUSTED_PROXIES": trusted,
            "REF_POOL_SIZE": str(pool_size),
            "REF_TIMEOUT_MS": "500",
            **{f"HAPROXY_{name.upper().replace('-', '_')}_PORT": str(port) for name, port in self.ports.items()},
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, listener: str) -> str:
        return f"http://127.0.0.1:{self.ports[listener]}"

    def start(self) -> HAProxyReference:
        self.proc = subprocess.Popen([self.script], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for port in self.ports.values():
                wait_port(port, self.proc, timeout=10)
        except RuntimeError as exc:
            self.stop()
            out = self.proc.stdout.read().decode() if self.proc.stdout else ""
            raise RuntimeError(f"haproxy did not start ({exc}): {out}") from None
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a: object, **k: object) -> None:
        return None


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET on a new connection, redirects not followed."""
    try:
        with urllib.request.build_opener(_NoRedirect).open(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


__all__ = [
    "FakeRedis",
    "HAProxyReference",
    "IdleDropRelay",
    "RedisServer",
    "eventually",
    "free_port",
    "http_get",
    "make_config",
    "peak_clients",
    "running_gateway",
]
