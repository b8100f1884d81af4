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
  out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, Protocol, TypeVar

from . import errors
from .backoff import ConnectBackoff
from .errors import AccountingError


class PoolConnection(Protocol):
    """What the pool needs of a connection."""

    @property
    def usable(self) -> bool:
        """Open and not failed: safe to hand out."""

    @property
    def pending(self) -> int:
        """Exchanges started whose answer has not been read whole: nonzero means dirty."""

    def abort(self) -> None: ...

    async def close(self) -> None: ...


C = TypeVar("C", bound=PoolConnection)


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
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self._connect = connect
        self._what = what  # for messages: "no <what> free within ..."
        self.max_size = max_size
        self.wait_timeout = wait_timeout
        self._idle: deque[C] = deque()
        self._waiters: deque[asyncio.Future[C | None]] = deque()
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
        if self._size < self.max_size and not self._waiters:
            self._size += 1
            return await self._open_reserved()
        grant = await self._wait()
        if grant is None:
            return await self._open_reserved()
        return grant

    def release(self, conn: C) -> None:
        """Give a connection back. Safe to call with a broken or dirty connection."""
        self._in_use -= 1
        if self._closed or not conn.usable or conn.pending:
            self.discarded += 1
            conn.abort()
            self._size -= 1
            self._grant_slot()
            return
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
        self.backoff.succeeded()
        self.created += 1
        self._in_use += 1
        return conn

    async def _wait(self) -> C | None:
        """Queue for a grant: a connection, or None meaning "a slot is yours, connect"."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[C | None] = loop.create_future()
        self._waiters.append(fut)
        self._deadlines.append(loop.time() + self.wait_timeout)
        if self._expiry is None:
            self._expiry = loop.call_at(self._deadlines[0], self._expire)
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

    def _pop_waiter(self) -> asyncio.Future[C | None]:
        self._deadlines.popleft()
        return self._waiters.popleft()

    def _expire(self) -> None:
        """Fail every waiter past its deadline, oldest first; re-arm for the next one."""
        self._expiry = None
        loop = asyncio.get_running_loop()
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

    def _remove_waiter(self, fut: asyncio.Future[C | None]) -> None:
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

    def _forget(self, conn: C) -> None:
        self.discarded += 1
        self._size -= 1
        conn.abort()

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
        idle = list(self._idle)
        self._idle.clear()
        self._size -= len(idle)
        await asyncio.gather(*(c.close() for c in idle), return_exceptions=True)

    def stats(self) -> dict[str, int]:
        return {
            "max": self.max_size,
            "size": self._size,
            "idle": len(self._idle),
            "in_use": self._in_use,
            "waiting": len(self._waiters),
            "created": self.created,
            "errors": self.errors,
            "discarded": self.discarded,
            "wait_timeouts": self.wait_timeouts,
            "fast_failures": self.backoff.refused,
        }
