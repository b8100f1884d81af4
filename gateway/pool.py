"""A bounded pool of connections: the seed's design, with its gaps closed.

Generic over the connection: Redis connections (`gateway.connection`) and any
other connection with the `PoolConnection` shape use the same pool.

Owns how many connections exist and who holds them. Invariants:

- At most `max_size` connections exist, counting those still connecting: a slot
  is reserved *before* the connect starts, because connecting yields to the
  event loop and other callers would otherwise all see a free slot.
- Waiters are served first come, first served: a released connection (or a
  freed slot) is handed straight to the oldest waiter, never left for a newcomer
  to take. A waiter is woken by that hand-off, not by polling.
- A connection goes back to the idle list only when it is open and has no reply
  outstanding. One that errored, timed out or was abandoned mid-command
  (cancellation) is closed and its slot freed: a reused connection with a reply
  still in flight would hand that reply to the next request.
- A connect that fails puts new connects into backoff (`gateway.backoff`): a
  checkout that would need a new connection meanwhile fails at once with the
  same kind of error instead of connecting. Idle connections are still handed
  out. A connection the peer fails with its first exchange unanswered (`dud`)
  counts as a failed connect, and after a failure a new connection ends the
  backoff only once it has answered: a server that accepts the handshake and
  drops every command sees backed-off connects, not one per request.
- Lifecycle (`gateway.lifecycle.Lifecycle`, optional): a minimum of connections kept
  open, idle connections closed after a timeout, idle ones checked before reuse,
  connections retired after a lifetime or a number of checkouts. A connection is
  retired only while idle or when it comes back, never in the middle of a command.
  Nothing of it runs per checkout unless a lifetime or a use limit is set (then one
  lookup and one clock read per release): idle time is tracked by one sweeper timer
  per pool, which ages the idle list in generations (see `gateway.lifecycle`). A
  checkout takes the most recently used connection first, so under load every
  connection is fresh and none is checked; only one that waited out a pause is.
- A failed check discards that connection and every one idle at least as long (the
  same path dropped them all, most likely), and the checkout goes on to a fresh
  connection: the request never sees the failure, only the check's delay.
- Background connects (the minimum) obey the connect backoff like any other: while it
  refuses, the sweeper waits for the next sweep; it never starts a storm of connects.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, Protocol, TypeVar

from . import errors
from .backoff import ConnectBackoff, Trial
from .errors import AccountingError
from .lifecycle import Lifecycle

log = logging.getLogger("gateway.pool")


class PoolConnection(Trial, Protocol):
    """What the pool needs of a connection: what its connect backoff asks (`usable`, `proven`,
    `dud`), and more."""

    @property
    def pending(self) -> int:
        """Exchanges started whose answer has not been read whole: nonzero means dirty."""

    def abort(self) -> None: ...

    async def close(self) -> None: ...


C = TypeVar("C", bound=PoolConnection)
C_contra = TypeVar("C_contra", bound=PoolConnection, contravariant=True)


class Waiter(Protocol[C_contra]):
    """A checkout waiting its turn: an asyncio future (`acquire`) or a caller's own object
    (`enqueue`). The pool calls these from inside whatever freed the connection or slot."""

    def done(self) -> bool: ...

    def set_result(self, result: C_contra | None, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class _Meta:
    """Expiry and checkouts of one connection, kept only when the lifecycle retires connections."""

    __slots__ = ("expires", "uses")

    def __init__(self, expires: float) -> None:
        self.expires = expires
        self.uses = 0


class _Life(Generic[C]):
    """A pool's lifecycle state and counters (`Pool._life`)."""

    __slots__ = ("background", "check", "check_failures", "checks", "closed_idle", "expired", "last_sweep",
                 "loop", "meta", "period", "policy", "prewarm_failing", "prewarmed", "sweeper", "used_up")  # fmt: skip

    def __init__(self, policy: Lifecycle, check: Callable[[C], Awaitable[bool]] | None) -> None:
        self.policy = policy
        self.check = check
        self.meta: dict[C, _Meta] = {}
        self.sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.last_sweep = 0.0
        self.period = policy.sweep_period()
        self.background: set[asyncio.Task[None]] = set()
        self.prewarm_failing = False
        self.prewarmed = 0
        self.closed_idle = 0
        self.expired = 0
        self.used_up = 0
        self.checks = 0
        self.check_failures = 0


class Pool(Generic[C]):
    def __init__(
        self,
        connect: Callable[[], Awaitable[C]],
        max_size: int,
        wait_timeout: float,
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 0.5,
        what: str = "Redis connection",
        lifecycle: Lifecycle | None = None,
        check: Callable[[C], Awaitable[bool]] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self._connect = connect
        self._what = what  # for messages: "no <what> free within ..."
        self.max_size = max_size
        self.wait_timeout = wait_timeout
        self._idle: deque[C] = deque()
        self._waiters: deque[Waiter[C]] = deque()
        # Each waiter's deadline, in the same order: every wait has the same timeout, so the
        # oldest waiter always expires first and one timer, armed for it, serves them all
        # (a timer per wait cost more than the rest of the checkout).
        self._deadlines: deque[float] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._size = 0  # open connections plus reserved (connecting) slots
        self._in_use = 0
        self._closed = False
        self.created = 0
        self.errors = 0
        self.discarded = 0
        self.wait_timeouts = 0
        self.backoff = ConnectBackoff(backoff_initial, backoff_max)
        # -- lifecycle: its state in one object, so the pool keeps few attributes (past about
        # 30, CPython stops sharing an instance's key layout and every attribute read costs more).
        self._life: _Life[C] = _Life(lifecycle or Lifecycle(), check)
        # Idle connections older than the last sweep, oldest generation first: (since, connections),
        # `since` being the sweep before the one that aged them (the earliest they can have gone idle).
        self._aged: deque[tuple[float, deque[C]]] = deque()
        self._retires = self._life.policy.retires
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # made outside a loop: `start()` begins the lifecycle later
        else:
            self.start()

    @property
    def lifecycle(self) -> Lifecycle:
        return self._life.policy

    # -- checkout ---------------------------------------------------------

    async def acquire(self) -> C:
        if self._closed:
            raise AccountingError(errors.UNAVAILABLE, "pool is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()  # most recently used first: warm, least likely to have timed out
            if conn.usable:
                self._in_use += 1
                return conn
            self._forget(conn)
        if self._aged:  # only once the fresh idle list is empty: nothing on the usual path
            aged = await self._acquire_aged()
            if aged is not None:
                return aged
        if self._size < self.max_size and not self._waiters:
            self._size += 1
            return await self._open_reserved()
        grant = await self._wait()
        if grant is None:
            return await self._open_reserved()
        return grant

    def try_acquire(self) -> C | None:
        """An idle connection at once, or None (the caller then awaits `acquire`): a checkout
        that needs no coroutine when one is free, as it is under steady traffic."""
        if self._closed:
            return None
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable:
                self._in_use += 1
                return conn
            self._forget(conn)
        return None

    def may_queue(self) -> bool:
        """Whether a checkout that found no idle connection (`try_acquire`) would only wait:
        no aged connection to check, no free slot to connect. A caller on callbacks alone may
        then `enqueue` itself; otherwise it takes `acquire`."""
        return not self._closed and not self._aged and (self._size >= self.max_size or bool(self._waiters))

    def enqueue(self, waiter: Waiter[C]) -> None:
        """Queue for a grant, as `acquire` does, without a coroutine: `waiter.set_result` gets
        a connection (checked out) or None (a slot is yours: connect, then `adopt`), or
        `set_exception` the wait's timeout. It is called from inside the releasing call."""
        loop = self._loop()
        self._waiters.append(waiter)
        self._deadlines.append(loop.time() + self.wait_timeout)
        if self._expiry is None:
            self._expiry = loop.call_at(self._deadlines[0], self._expire)

    async def open_slot(self) -> C:
        """Connect in the slot a waiter was granted (`set_result(None)`); the connection comes
        checked out, or AccountingError (the slot is freed again)."""
        return await self._open_reserved()

    def release(self, conn: C) -> None:
        """Give a connection back. Safe to call with a broken or dirty connection."""
        self._in_use -= 1
        if self._closed or not conn.usable or conn.pending:
            dud = conn.dud
            if dud is not None:
                self.backoff.lost(conn, dud)  # a connect that did not really work
            self.discarded += 1
            conn.abort()
            self._size -= 1
            self._drop_meta(conn)
            self._grant_slot()
            return
        if self._retires and self._retire(conn):
            return
        if not self._waiters:
            self._idle.append(conn)  # _hand_off, inlined for the usual release: nobody waits
            return
        self._hand_off(conn)

    def _hand_off(self, conn: C) -> None:
        """A clean connection is free: to the oldest waiter, else to the idle list."""
        while self._waiters:
            fut = self._pop_waiter()
            if not fut.done():
                self._in_use += 1
                fut.set_result(conn)
                return
        self._idle.append(conn)

    @asynccontextmanager
    async def connection(self, discard_on_error: bool = True) -> AsyncIterator[C]:
        """Check a connection out for exclusive use; it always comes back.

        Meant for commands a shared connection cannot carry (BLPOP, XREAD BLOCK,
        MULTI/EXEC, WATCH). With `discard_on_error`, any exception in the block,
        cancellation included, closes the connection instead of reusing it,
        since its state (an open MULTI, a pending block) is then unknown.
        """
        conn = await self.acquire()
        try:
            yield conn
        except BaseException:
            if discard_on_error:
                conn.abort()
            raise
        finally:
            self.release(conn)

    # -- internals --------------------------------------------------------

    async def _open_reserved(self) -> C:
        try:
            self.backoff.admit()
        except AccountingError:
            self._size -= 1
            self._grant_slot()
            raise
        try:
            conn = await self._connect()
        except BaseException as exc:
            if isinstance(exc, AccountingError):
                self.errors += 1
                self.backoff.failed(exc)
            else:
                if not isinstance(exc, asyncio.CancelledError):
                    self.errors += 1
                self.backoff.abandoned()
            self._size -= 1
            self._grant_slot()
            raise
        self.backoff.connected(conn)
        self.created += 1
        self._in_use += 1
        if self._retires:
            self._born(conn)
        return conn

    async def _wait(self) -> C | None:
        """Queue for a grant: a connection, or None meaning "a slot is yours, connect"."""
        fut: asyncio.Future[C | None] = self._loop().create_future()
        self.enqueue(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            # The grant may have landed just before the cancellation: pass it on.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                grant = fut.result()
                if grant is None:
                    self._size -= 1
                    self._grant_slot()
                else:
                    self.release(grant)
            else:
                self._remove_waiter(fut)
            raise

    def _pop_waiter(self) -> Waiter[C]:
        self._deadlines.popleft()
        return self._waiters.popleft()

    def _expire(self) -> None:
        """Fail every waiter past its deadline, oldest first; re-arm for the next one."""
        self._expiry = None
        loop = self._loop()
        now = loop.time()
        while self._waiters and self._deadlines[0] <= now:
            fut = self._pop_waiter()
            if not fut.done():
                self.wait_timeouts += 1
                fut.set_exception(
                    AccountingError(
                        errors.POOL_TIMEOUT,
                        f"no {self._what} free within {self.wait_timeout * 1000:.0f} ms ({self.max_size} in use)",
                    )
                )
        if self._waiters:
            self._expiry = loop.call_at(self._deadlines[0], self._expire)

    def _remove_waiter(self, fut: Waiter[C]) -> None:
        for i, waiter in enumerate(self._waiters):
            if waiter is fut:
                del self._waiters[i]
                del self._deadlines[i]
                return

    def _grant_slot(self) -> None:
        """A slot was freed: hand it to the oldest waiter, who will connect."""
        if self._closed:
            return
        while self._waiters and self._size < self.max_size:
            fut = self._pop_waiter()
            if not fut.done():
                self._size += 1
                fut.set_result(None)
                return

    def _grant_slots(self) -> None:
        """Several slots may have been freed at once: one to each waiter, oldest first."""
        while self._waiters and self._size < self.max_size and not self._closed:
            self._grant_slot()

    def _forget(self, conn: C) -> None:
        self.discarded += 1
        self._size -= 1
        self._drop_meta(conn)
        conn.abort()

    # -- lifecycle ----------------------------------------------------------

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The pool's loop (one pool serves one loop), looked up once: asyncio.get_running_loop()
        makes a getpid() system call in Python 3.11 (its fork check), too dear for every wait."""
        loop = self._life.loop
        if loop is None:
            loop = self._life.loop = asyncio.get_running_loop()
        return loop

    def _drop_meta(self, conn: C) -> None:
        if self._retires:
            self._life.meta.pop(conn, None)

    def _born(self, conn: C) -> None:
        now = asyncio.get_running_loop().time()
        self._life.meta[conn] = _Meta(self._life.policy.expires_at(now, random.random))

    def _retire(self, conn: C) -> bool:
        """A clean connection came back: close it if it has served its lifetime or its uses."""
        meta = self._life.meta.get(conn)
        if meta is None:
            return False
        meta.uses += 1
        max_uses = self._life.policy.max_uses
        if max_uses is not None and meta.uses >= max_uses:
            self._life.used_up += 1
        elif (self._life.loop or self._loop()).time() >= meta.expires:
            self._life.expired += 1
        else:
            return False
        self._close_slot(conn)
        return True

    def _close_slot(self, conn: C) -> None:
        """Close a clean connection the pool decided to retire, free its slot, keep the minimum."""
        self._drop_meta(conn)
        self._size -= 1
        conn.abort()  # clean (nothing in flight): an abort loses nothing and needs no task
        self._grant_slot()
        if self._life.policy.min_size and not self._closed:
            self._fill()

    async def _acquire_aged(self) -> C | None:
        """Take an idle connection that waited out at least one sweep, newest first, checking it
        if it may have been idle longer than `check_after`; None if none is left."""
        aged = self._aged
        check = self._life.check
        while aged:
            since, gen = aged[-1]
            conn = gen.pop()
            if not gen:
                aged.pop()
            if not conn.usable:
                self._forget(conn)
                continue
            self._in_use += 1
            if check is None or not self._life.policy.needs_check(since, asyncio.get_running_loop().time()):
                return conn
            self._life.checks += 1
            try:
                ok = await check(conn)
            except BaseException:
                # Cancelled mid-check: the check's reply is outstanding, so release discards it.
                self.release(conn)
                raise
            # A sweep during the check may have replaced the deque (dropping emptied
            # generations): go on with the pool's own, or its generations would be forgotten
            # here and again from the new deque, and the size count would fall below the truth.
            aged = self._aged
            if ok and conn.usable and not conn.pending:
                return conn
            # The path dropped it silently, most likely, and every connection idle at least as
            # long with it: discard them all (the rest of `aged` is older), then go on to a fresh one.
            self._life.check_failures += 1
            self._in_use -= 1
            self._forget(conn)
            while aged:
                for old in aged.popleft()[1]:
                    self._forget(old)
            self._grant_slots()
        return None

    def start(self) -> None:
        """Begin the lifecycle: the sweeper and, with a minimum size, the first connects.
        Needs a running loop; returns at once (connects go on in the background). A pool made
        inside a running loop starts itself; calling this again does nothing."""
        if not self._life.policy.active or self._life.sweeper is not None or self._closed:
            return
        loop = self._loop()
        self._life.last_sweep = loop.time()
        self._life.sweeper = loop.call_later(self._life.period, self._sweep)
        self._fill()

    async def warm(self, timeout: float) -> None:
        """Start, then give the first connects of the minimum up to `timeout` (never raises:
        with Redis down the pool starts empty and keeps trying in the background)."""
        self.start()
        if self._life.background:
            await asyncio.wait(list(self._life.background), timeout=timeout)

    def _fill(self) -> None:
        """Open connections up to the minimum, in the background, within the connect backoff."""
        missing = min(self._life.policy.min_size, self.max_size) - self._size
        if missing <= 0 or self._waiters or self._closed:
            return
        if self.backoff.waiting():
            return  # the next sweep asks again
        if self.backoff.failing is not None:
            missing = 1  # one probe decides whether Redis is back
        for _ in range(missing):
            self._size += 1
            task = asyncio.create_task(self._open_idle())
            self._life.background.add(task)
            task.add_done_callback(self._life.background.discard)

    async def _open_idle(self) -> None:
        """One connect of the minimum (slot already reserved): the connection goes to the
        oldest waiter, or to the idle list."""
        try:
            self.backoff.admit()
        except AccountingError:
            self._size -= 1
            self._grant_slot()
            return  # backing off: the next sweep asks again
        try:
            conn = await self._connect()
        except BaseException as exc:
            self._size -= 1
            if isinstance(exc, AccountingError):
                self.errors += 1
                self.backoff.failed(exc)
                if not self._life.prewarm_failing:  # once per outage, not per attempt
                    self._life.prewarm_failing = True
                    log.warning("pool: cannot open the minimum of connections (%s); retrying in the background", exc)
            else:
                self.backoff.abandoned()
            self._grant_slot()
            if not isinstance(exc, Exception):
                raise  # cancelled (the pool is closing)
            if not isinstance(exc, AccountingError):
                log.error("pool: background connect failed", exc_info=exc)
            return
        self.backoff.connected(conn)
        if self._life.prewarm_failing:
            self._life.prewarm_failing = False
            log.warning("pool: minimum of connections open again")
        self.created += 1
        self._life.prewarmed += 1
        if self._closed:
            self._size -= 1
            conn.abort()
            return
        if self._retires:
            self._born(conn)
        self._hand_off(conn)

    def _sweep(self) -> None:
        """Once per period: age the idle list one generation, close what the policy retires,
        drop connections lost while idle, reopen up to the minimum."""
        self._life.sweeper = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        policy = self._life.policy
        if self._idle:
            self._aged.append((self._life.last_sweep, self._idle))
            self._idle = deque()
        self._life.last_sweep = now
        aged = self._aged
        while aged and policy.idle_expired(aged[0][0], now, self._life.period):
            for conn in aged.popleft()[1]:
                if conn.usable:
                    self._life.closed_idle += 1
                    self._size -= 1
                    self._drop_meta(conn)
                    conn.abort()
                else:
                    self._forget(conn)
        # Connections lost while idle (Redis closed them, a CLIENT KILL) and, with a lifetime,
        # idle ones past it: closed now rather than at their next checkout.
        meta = self._life.meta
        for _, gen in aged:
            for conn in list(gen):
                if not conn.usable:
                    gen.remove(conn)
                    self._forget(conn)
                elif self._retires and (m := meta.get(conn)) is not None and now >= m.expires:
                    gen.remove(conn)
                    self._life.expired += 1
                    self._size -= 1
                    del meta[conn]
                    conn.abort()
        if any(not gen for _, gen in aged):
            self._aged = deque((s, g) for s, g in aged if g)
        self._grant_slots()
        self._fill()
        self._life.sweeper = loop.call_later(self._life.period, self._sweep)

    # -- lifecycle and introspection ----------------------------------------

    async def close(self) -> None:
        """Refuse new checkouts, fail waiters, close idle connections.

        Connections in use are closed as they come back.
        """
        self._closed = True
        while self._waiters:
            fut = self._pop_waiter()
            if not fut.done():
                fut.set_exception(AccountingError(errors.UNAVAILABLE, "pool is closed"))
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._life.sweeper is not None:
            self._life.sweeper.cancel()
            self._life.sweeper = None
        for task in list(self._life.background):
            task.cancel()
        if self._life.background:
            await asyncio.gather(*self._life.background, return_exceptions=True)
        idle = list(self._idle)
        for _, gen in self._aged:
            idle.extend(gen)
        self._aged.clear()
        self._life.meta.clear()
        self._idle.clear()
        self._size -= len(idle)
        await asyncio.gather(*(c.close() for c in idle), return_exceptions=True)

    def stats(self) -> dict[str, int]:
        return {
            "max": self.max_size,
            "size": self._size,
            "idle": len(self._idle) + sum(len(g) for _, g in self._aged),
            "in_use": self._in_use,
            "waiting": len(self._waiters),
            "created": self.created,
            "errors": self.errors,
            "discarded": self.discarded,
            "wait_timeouts": self.wait_timeouts,
            "fast_failures": self.backoff.refused,
            "prewarmed": self._life.prewarmed,
            "closed_idle": self._life.closed_idle,
            "expired": self._life.expired,
            "used_up": self._life.used_up,
            "checks": self._life.checks,
            "check_failures": self._life.check_failures,
        }
