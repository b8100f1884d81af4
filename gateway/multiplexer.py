"""Multiplexing: a few shared Redis connections carry every caller's commands.

Owns the shared connections and their reconnection. Invariants:

- Replies arrive in send order on each connection, and `RedisConnection` pairs
  them with callers through its FIFO; a connection that breaks fails exactly
  the commands in flight on it, and is replaced with backoff. A reply is never
  delivered to a caller other than the one whose command produced it.
- Commands issued in the same event-loop tick leave in one write (pipelining
  without the caller asking for it).
- Commands that would block the shared connection or change its state for
  everyone (BLPOP, XREAD BLOCK, MULTI, WATCH, SELECT, SUBSCRIBE, ...) are refused
  with `UnsupportedCommand`; such a caller needs a connection of its own
  (`gateway.pool.Pool.connection()`).
- A connection counts as up only once Redis has answered on it (the reply to
  the PING, or AUTH and SELECT, sent with the connect). Until then the backoff
  keeps growing: a Redis at `maxclients`, or anything that accepts and closes at
  once, sees a few connects a second, not thousands. Why connects fail is
  logged once per outage (and again only for a new kind of failure).

While no connection is up, commands fail at once instead of queueing behind a
reconnect: `AccountingError` of the last connect's kind (`connect_error`,
`redis:WRONGPASS`, `redis:ERR` for maxclients, ...).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from . import errors
from .config import RedisTarget
from .connection import RedisConnection, open_connection
from .errors import AccountingError
from .resp import Reply, encode, encode_many

log = logging.getLogger("gateway.multiplexer")

# Commands that block the connection, hold per-connection state, or turn it into
# a push channel: none of them may share a connection with other callers.
NOT_MULTIPLEXABLE = frozenset(
    {
        "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
        "WAIT", "WAITAOF", "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
        "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
        "MONITOR", "SELECT", "AUTH", "HELLO", "RESET", "QUIT", "SYNC", "PSYNC", "CLIENT",
    }
)  # fmt: skip


class UnsupportedCommand(ValueError):
    """The command cannot run on a shared connection; it needs a connection of its own."""


def check_multiplexable(args: tuple[object, ...]) -> None:
    name = (args[0].decode() if isinstance(args[0], bytes) else str(args[0])).upper()
    blocking_read = name in ("XREAD", "XREADGROUP") and any(
        (a.decode() if isinstance(a, bytes) else str(a)).upper() == "BLOCK" for a in args[1:]
    )
    if name in NOT_MULTIPLEXABLE or blocking_read:
        raise UnsupportedCommand(
            f"{name} cannot run on a multiplexed connection: it blocks or changes the state of a "
            "connection shared with other callers; use a connection of its own (gateway.pool.Pool) for it"
        )


class _Slot:
    """One shared connection and the task that keeps it connected."""

    def __init__(self) -> None:
        self.conn: RedisConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()


class Multiplexer:
    def __init__(
        self,
        target: RedisTarget,
        *,
        connections: int = 1,
        connect_timeout: float = 0.5,
        command_timeout: float = 0.5,
        backoff_initial: float = 0.05,
        backoff_max: float = 0.5,
    ) -> None:
        self._connect = partial(
            open_connection,
            target,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            coalesce_writes=True,
        )
        self._slots = [_Slot() for _ in range(connections)]
        self._next = 0
        self._backoff = (backoff_initial, backoff_max)
        self._closing = False
        self._target = target
        self.connects = 0
        self.connect_errors = 0
        self.disconnects = 0
        # The last connect's failure while no connection is up: what commands fail with meanwhile.
        self._connect_error: AccountingError | None = None
        #: Called each time a shared connection comes up (a caller backing off may retry at once).
        self.on_connected: Callable[[], None] | None = None

    async def start(self, wait: float | None = None) -> None:
        """Start connecting every slot; with `wait`, give the first connects that long."""
        self.connect_in_background()
        if wait:
            await self.wait_connected(wait, every=True)

    def connect_in_background(self) -> None:
        for slot in self._slots:
            if slot.task is None:
                slot.task = asyncio.create_task(self._keep_connected(slot))

    async def wait_connected(self, timeout: float, every: bool = False) -> None:
        """Until one (or `every`) shared connection is up, or `timeout` has passed."""
        waits = [asyncio.ensure_future(s.ready.wait()) for s in self._slots]
        try:
            await asyncio.wait(
                waits, timeout=timeout, return_when=asyncio.ALL_COMPLETED if every else asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()

    async def _keep_connected(self, slot: _Slot) -> None:
        initial, most = self._backoff
        delay = initial
        failed = 0  # connects failed since this slot last had a working connection
        since = 0.0
        kinds: set[str] = set()
        while not self._closing:
            try:
                # Returns only once Redis answered on the connection, so a server that accepts and
                # then refuses (maxclients) or closes at once counts as a failure and backs off.
                conn = await self._connect()
            except AccountingError as exc:
                self.connect_errors += 1
                self._connect_error = exc
                if not failed:
                    since = time.monotonic()
                failed += 1
                if exc.kind not in kinds:
                    # Once per outage and kind of failure, never per attempt: with the reason.
                    kinds.add(exc.kind)
                    log.warning(
                        "connection to Redis at %s failed (%s: %s); retrying with backoff up to %.1f s",
                        self._target.url,
                        exc.kind,
                        exc,
                        most,
                    )
                # Half fixed, half jitter: a minimum pause, and gateways do not reconnect in lockstep.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, most)
                continue
            if failed:
                log.warning(
                    "connection to Redis at %s re-established after %d failed connects over %.1f s",
                    self._target.url,
                    failed,
                    time.monotonic() - since,
                )
                failed = 0
                kinds.clear()
            self._connect_error = None
            self.connects += 1
            delay = initial
            slot.conn = conn
            slot.ready.set()
            if self.on_connected is not None:
                self.on_connected()
            await conn.closed
            slot.conn = None
            slot.ready.clear()
            if not self._closing:
                self.disconnects += 1

    def connection(self) -> RedisConnection:
        """The next usable shared connection (round robin), or AccountingError."""
        slots = self._slots
        n = len(slots)
        for _ in range(n):
            slot = slots[self._next]
            self._next = (self._next + 1) % n
            conn = slot.conn
            if conn is not None and conn.usable:
                return conn
        if self._closing:
            raise AccountingError(errors.UNAVAILABLE, "multiplexer is closed")
        failing = self._connect_error
        if failing is not None:
            raise AccountingError(failing.kind, f"not connected to {self._target.url} (reconnecting): {failing}")
        raise AccountingError(errors.CONNECT, f"not connected to {self._target.url} (reconnecting)")

    async def execute(self, *args: object) -> Reply:
        """Run one command on a shared connection; ReplyError is returned, not raised."""
        check_multiplexable(args)
        return await self.connection().send_packed(encode(*args))[0]

    async def pipeline(self, commands: list[tuple[object, ...]]) -> list[Reply]:
        """Several commands sent together on one connection, replies in order."""
        for args in commands:
            check_multiplexable(args)
        futs = self.connection().send_packed(encode_many(commands), len(commands))
        return list(await asyncio.gather(*futs))

    @property
    def connected(self) -> int:
        return sum(1 for s in self._slots if s.conn is not None and s.conn.usable)

    def stats(self) -> dict[str, Any]:
        inflight = sum(s.conn.pending for s in self._slots if s.conn is not None)
        return {
            "max": len(self._slots),
            "size": self.connected,
            "in_flight": inflight,
            "created": self.connects,
            "errors": self.connect_errors,
            "disconnects": self.disconnects,
        }

    async def close(self) -> None:
        """Let in-flight commands finish, then close every connection."""
        self._closing = True
        conns = [s.conn for s in self._slots if s.conn is not None]
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        for slot in self._slots:
            if slot.task is not None:
                slot.task.cancel()
        await asyncio.gather(*(s.task for s in self._slots if s.task is not None), return_exceptions=True)
