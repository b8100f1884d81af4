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
  once, sees a few connects a second, not thousands. A connection that loses its
  first commands unanswered (`RedisConnection.dud`: the server answered the
  handshake, then dropped them) is a failed connect too, and a reconnect counts
  as a recovery only once a command has its reply. Why connects fail is
  logged once per outage (and again only for a new kind of failure).

- Lifecycle (`gateway.lifecycle.Lifecycle`, optional), applied by one sweeper timer per
  multiplexer, never per command: a shared connection that carried nothing for
  `idle_timeout`, or that reached its lifetime, is rotated; one idle for `check_after`
  gets a PING (a failed one closes it and it is reconnected before traffic needs it;
  a good one also keeps a middlebox's idle timer from running out). Rotation opens
  the replacement first, moves new commands to it, then closes the old connection
  gracefully once its in-flight replies are read: no command sees an error. A
  replacement that cannot connect leaves the old connection in service and backs off.
  The minimum size and the use limit have no meaning here (every slot is always
  kept connected; a shared connection has no checkouts).

While no connection is up, commands fail at once instead of queueing behind a
reconnect: `AccountingError` of the last connect's kind (`connect_error`,
`redis:WRONGPASS`, `redis:ERR` for maxclients, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from . import errors
from .config import RedisTarget
from .connection import PING, RedisConnection, open_connection
from .errors import AccountingError
from .lifecycle import Lifecycle
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
        # Lifecycle, seen by the sweeper: the connection's reads at the last sweep, the earliest
        # its quiet spell can have begun, its expiry, and whether a check or rotation is running.
        self.reads_seen = -1
        self.quiet_since = 0.0
        self.expires = math.inf
        self.checking = False
        self.rotating = False


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
        lifecycle: Lifecycle | None = None,
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
        if lifecycle is not None and lifecycle.max_lifetime == 0:
            # "Once" means one checkout; a shared connection has none, so it would be replaced at
            # every sweep. Config refuses it for these modes; a library caller gets no lifetime.
            lifecycle = dataclasses.replace(lifecycle, max_lifetime=None)
        self.lifecycle = lifecycle if lifecycle is not None and lifecycle.active else None
        self._period = self.lifecycle.sweep_period() if self.lifecycle else 0.0
        self._sweeper: asyncio.TimerHandle | None = None
        self._last_sweep = 0.0
        self._rotate_delay = 0.0  # grows while replacements fail to connect
        self._rotate_after = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self.closed_idle = 0
        self.expired = 0
        self.checks = 0
        self.check_failures = 0
        self.rotation_errors = 0

    async def start(self, wait: float | None = None) -> None:
        """Start connecting every slot; with `wait`, give the first connects that long."""
        self.connect_in_background()
        if wait:
            await self.wait_connected(wait, every=True)

    def connect_in_background(self) -> None:
        for slot in self._slots:
            if slot.task is None:
                slot.task = asyncio.create_task(self._keep_connected(slot))
        if self.lifecycle is not None and self._sweeper is None and not self._closing:
            loop = asyncio.get_running_loop()
            self._last_sweep = loop.time()
            self._sweeper = loop.call_later(self._period, self._sweep)

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
                failure = exc
            else:
                self._connect_error = None
                self.connects += 1
                self._install(slot, conn)
                slot.ready.set()
                if self.on_connected is not None:
                    self.on_connected()
                if failed:
                    # Back only once a command has its reply: a server can answer the handshake and
                    # drop every command (a proxy with no Redis behind it), and then this connection
                    # is one more failed connect, not a recovery to announce.
                    while not conn.proven and not conn.closed.done() and slot.conn is conn:
                        await asyncio.wait((conn.closed,), timeout=0.25)
                    if conn.proven:
                        log.warning(
                            "connection to Redis at %s re-established after %d failed connects over %.1f s",
                            self._target.url,
                            failed,
                            time.monotonic() - since,
                        )
                        failed = 0
                        kinds.clear()
                while True:
                    await conn.closed
                    current = slot.conn
                    if current is conn or current is None:
                        break
                    conn = current  # rotated: watch the replacement
                slot.conn = None
                slot.ready.clear()
                if self._closing:
                    break
                self.disconnects += 1
                dud = conn.dud
                if dud is None:
                    delay = initial  # it worked: a reconnect now, backing off only if that fails
                    continue
                failure = dud  # Redis dropped the first commands sent on it: a failed connect
            if not failed:
                since = time.monotonic()
            failed += 1
            self._connect_failed(failure, kinds)
            # Half fixed, half jitter: a minimum pause, and gateways do not reconnect in lockstep.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, most)

    def _connect_failed(self, exc: AccountingError, kinds: set[str]) -> None:
        self.connect_errors += 1
        self._connect_error = exc
        if exc.kind not in kinds:
            # Once per outage and kind of failure, never per attempt: with the reason.
            kinds.add(exc.kind)
            log.warning(
                "connection to Redis at %s failed (%s: %s); retrying with backoff up to %.1f s",
                self._target.url,
                exc.kind,
                exc,
                self._backoff[1],
            )

    # -- lifecycle ------------------------------------------------------------------

    def _install(self, slot: _Slot, conn: RedisConnection) -> None:
        slot.conn = conn
        slot.reads_seen = conn.reads
        slot.quiet_since = self._last_sweep
        if self.lifecycle is not None:
            now = asyncio.get_running_loop().time()
            slot.expires = self.lifecycle.expires_at(now, random.random)

    def _sweep(self) -> None:
        """Once per period: rotate shared connections that expired or sat idle too long, and
        check those idle past `check_after`."""
        self._sweeper = None
        policy = self.lifecycle
        if self._closing or policy is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        previous, self._last_sweep = self._last_sweep, now
        for slot in self._slots:
            conn = slot.conn
            if conn is None or not conn.usable or slot.rotating:
                continue
            if conn.reads != slot.reads_seen or conn.pending:
                # Busy since the last sweep: its quiet spell can have begun no earlier than that sweep.
                slot.reads_seen = conn.reads
                slot.quiet_since = previous
                if now < slot.expires:
                    continue
            if now >= slot.expires:
                if now >= self._rotate_after:
                    self._rotate(slot, conn, "expired")
            elif policy.idle_expired(slot.quiet_since, now, self._period):
                if now >= self._rotate_after:
                    self._rotate(slot, conn, "idle")
            elif not slot.checking and policy.needs_check(slot.quiet_since, now):
                self._check(slot, conn)
        self._sweeper = loop.call_later(self._period, self._sweep)

    def _check(self, slot: _Slot, conn: RedisConnection) -> None:
        self.checks += 1
        slot.checking = True
        fut = conn.send_packed(PING, now=True)[0]

        def done(f: asyncio.Future[Reply]) -> None:
            slot.checking = False
            if f.cancelled() or f.exception() is not None or f.result() != "PONG":
                self.check_failures += 1
                # Closed at once (a timeout has already closed it): the slot reconnects now,
                # before traffic comes back to it.
                conn.abort(AccountingError(errors.CONNECTION_LOST, "check before reuse failed"))

        fut.add_done_callback(done)

    def _rotate(self, slot: _Slot, old: RedisConnection, why: str) -> None:
        slot.rotating = True
        task = asyncio.create_task(self._replace(slot, old, why))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _replace(self, slot: _Slot, old: RedisConnection, why: str) -> None:
        """Open the replacement first; only once Redis answered on it, move traffic over and
        close the old connection after its in-flight replies."""
        try:
            try:
                new = await self._connect()
            except AccountingError:
                # The old connection still serves; try again later, backing off.
                self.rotation_errors += 1
                self._rotate_delay = min(max(self._rotate_delay * 2, 0.05), 1.0)
                self._rotate_after = asyncio.get_running_loop().time() + self._rotate_delay
                return
            self._rotate_delay = 0.0
            if self._closing or slot.conn is not old or not old.usable:
                new.abort()  # lost or closed meanwhile: the slot's own reconnect takes over
                return
            if why == "idle":
                self.closed_idle += 1
            else:
                self.expired += 1
            self.connects += 1
            self._install(slot, new)
            try:
                await old.close()
            except BaseException:
                old.abort()  # closing down meanwhile: never leave it open
                raise
        finally:
            slot.rotating = False

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
            "closed_idle": self.closed_idle,
            "expired": self.expired,
            "checks": self.checks,
            "check_failures": self.check_failures,
            "rotation_errors": self.rotation_errors,
        }

    async def close(self) -> None:
        """Let in-flight commands finish, then close every connection."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        conns = [s.conn for s in self._slots if s.conn is not None]
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        for slot in self._slots:
            if slot.task is not None:
                slot.task.cancel()
        await asyncio.gather(*(s.task for s in self._slots if s.task is not None), return_exceptions=True)
