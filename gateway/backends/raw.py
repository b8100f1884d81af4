"""Raw: the project's own RESP codec over the project's own pool, no Redis library.

The seed's fastest mode, done properly: real source address, length-prefixed
bulk strings, the reply actually read, and a connection with a reply still
outstanding never reused. With --redis-cluster, one such pool per master node,
keys routed by hash slot (`gateway.cluster`).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from .. import errors
from ..accounting import incr_command, read_incr_reply
from ..cluster import Direct, PoolNode
from ..config import Config, RedisTarget
from ..connection import RedisConnection, ReplySlot, open_connection, ping_check
from ..errors import AccountingError
from ..limit.scripts import Script
from ..pool import Pool
from ..resp import Reply
from ..slots import key_slot
from .base import OwnCodecBackend, eval_sha_first


class RawBackend(OwnCodecBackend):
    name = "raw"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        # One server: an increment waits on a pool grant and on its reply, both futures (a new
        # connection is opened in a task of its own). A cluster's router wants a task.
        self.task_free = not config.cluster
        self.replies_on_callbacks = not config.cluster

    async def start(self) -> None:
        c = self.config
        if c.cluster:
            await self._start_cluster(lambda t: PoolNode(self._pool(t)))
        else:
            self.pool = self._pool(c.redis)
            self.redis = Direct(PoolNode(self.pool))
            # The minimum opens now (given the connect timeout); with Redis down it keeps trying.
            await self.pool.warm(c.connect_timeout)

    def _pool(self, target: RedisTarget) -> Pool[RedisConnection]:
        c = self.config
        connect = partial(open_connection, target, connect_timeout=c.connect_timeout, command_timeout=c.command_timeout)
        return Pool(connect, c.pool_size, c.pool_wait, lifecycle=c.lifecycle, check=ping_check)

    def incr_then(self, key: str, slot: ReplySlot) -> bool:
        pool = self.pool
        conn = pool.try_acquire()
        if conn is not None:
            _Checkout(pool, incr_command(key), slot).send(conn)
            return True
        if pool.may_queue():
            pool.enqueue(_Checkout(pool, incr_command(key), slot))
            return True
        return False  # a connect (or a check) comes first: that takes a coroutine

    async def incr(self, key: str) -> int:
        if self.router is not None:
            return read_incr_reply(await self.router.execute(key_slot(key), incr_command(key)))
        pool = self.pool
        conn = await pool.acquire()
        try:
            reply = await conn.send_one(incr_command(key))
        finally:
            pool.release(conn)
        return read_incr_reply(reply)

    async def run_script(self, script: Script, keys: tuple[str, ...], args: tuple[int, ...]) -> Reply:
        router = self.router
        if router is not None:
            slot = key_slot(keys[0])  # a client's keys share its slot (gateway.limit.scripts)
            return await eval_sha_first(lambda packed: router.execute(slot, packed), script, keys, args)
        pool = self.pool
        conn = await pool.acquire()
        try:
            # The EVAL after a NOSCRIPT goes on the same connection: the first reply is read.
            return await eval_sha_first(lambda packed: conn.send_packed(packed)[0], script, keys, args)
        finally:
            pool.release(conn)


_connecting: set[asyncio.Task[None]] = set()


class _Checkout:
    """One command on a pooled connection, on callbacks alone: the pool's waiter until it is
    granted a connection, then the reply's slot on that connection. The connection goes back
    to the pool (to the next waiter, in the same call) before the reply is passed on, and it
    always goes back: a failed or timed-out one is discarded by the pool."""

    __slots__ = ("command", "conn", "over", "pool", "slot")

    def __init__(self, pool: Pool[RedisConnection], command: bytes, slot: ReplySlot) -> None:
        self.pool = pool
        self.command = command
        self.slot = slot
        self.conn: RedisConnection | None = None
        self.over = False

    def send(self, conn: RedisConnection) -> None:
        self.conn = conn
        try:
            conn.send_to(self.command, self)
        except AccountingError as exc:
            self.set_exception(exc)

    # -- what the pool's wait and the connection's reply call (future-like) ------------------

    def done(self) -> bool:
        return self.over

    def exception(self) -> BaseException | None:
        return None

    def set_result(self, result: Any) -> None:
        conn = self.conn
        if conn is None:
            # The pool's grant: a connection, or None (a slot of ours to connect in).
            if result is None:
                task = asyncio.get_running_loop().create_task(self._connect())
                _connecting.add(task)
                task.add_done_callback(_connecting.discard)
            else:
                self.send(result)
            return
        self.conn = None
        self.over = True
        self.pool.release(conn)
        self.slot.set_result(result)

    def set_exception(self, exception: BaseException) -> None:
        self.over = True
        conn = self.conn
        if conn is not None:
            self.conn = None
            self.pool.release(conn)
        self.slot.set_exception(exception)

    async def _connect(self) -> None:
        try:
            conn = await self.pool.open_slot()
        except AccountingError as exc:
            self.set_exception(exc)
        except Exception as exc:  # a bug must not leave the request unanswered
            self.set_exception(AccountingError(errors.INTERNAL, repr(exc)))
        else:
            self.send(conn)
