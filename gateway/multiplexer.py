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
  with `UnsupportedCommand`. `dedicated()` checks out a connection of its own
  from a bounded pool for them, and always gives it back.

While a connection is down, commands routed to it fail at once
(`AccountingError` kind `connect_error`) instead of queueing behind a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from . import errors
from .config import RedisTarget
from .connection import RedisConnection, open_connection
from .errors import AccountingError
from .pool import Pool
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
    """The command cannot run on a shared connection; use `Multiplexer.dedicated()`."""


def check_multiplexable(args: tuple[object, ...]) -> None:
    name = (args[0].decode() if isinstance(args[0], bytes) else str(args[0])).upper()
    blocking_read = name in ("XREAD", "XREADGROUP") and any(
        (a.decode() if isinstance(a, bytes) else str(a)).upper() == "BLOCK" for a in args[1:]
    )
    if name in NOT_MULTIPLEXABLE or blocking_read:
        raise UnsupportedCommand(
            f"{name} cannot run on a multiplexed connection: it blocks or changes the state of a "
            "connection shared with other callers; use Multiplexer.dedicated() for it"
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
        dedicated_pool_size: int = 4,
        dedicated_wait: float = 1.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
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
        # No command timeout on dedicated connections: a BLPOP may rightly wait for minutes.
        self._dedicated = Pool(
            partial(open_connection, target, connect_timeout=connect_timeout, command_timeout=None),
            dedicated_pool_size,
            dedicated_wait,
        )

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
        delay = self._backoff[0]
        reported = False
        while not self._closing:
            try:
                conn = await self._connect()
            except AccountingError as exc:
                self.connect_errors += 1
                if not reported:
                    log.warning(
                        "multiplexed connection to %s failed (%s); retrying with backoff", self._target.url, exc
                    )
                    reported = True
                # Full jitter, so N gateways do not reconnect in lockstep.
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, self._backoff[1])
                continue
            if reported:
                log.warning("multiplexed connection to %s re-established", self._target.url)
                reported = False
            self.connects += 1
            delay = self._backoff[0]
            slot.conn = conn
            slot.ready.set()
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

    @contextlib.asynccontextmanager
    async def dedicated(self) -> AsyncIterator[RedisConnection]:
        """A connection of the caller's own, for blocking and transactional commands.

        It comes back to a bounded pool when the block exits; on an exception or
        a cancellation it is closed instead, since its state is then unknown.
        """
        async with self._dedicated.connection(discard_on_error=True) as conn:
            yield conn

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
            "dedicated": self._dedicated.stats(),
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
        await self._dedicated.close()
