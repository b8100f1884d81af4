"""Raw: the project's own RESP codec over the project's own pool, no Redis library.

The seed's fastest mode, done properly: real source address, length-prefixed
bulk strings, the reply actually read, and a connection with a reply still
outstanding never reused. With --redis-cluster, one such pool per master node,
keys routed by hash slot (`gateway.cluster`).
"""

from __future__ import annotations

from functools import partial

from ..accounting import incr_command, read_incr_reply
from ..cluster import Direct, PoolNode
from ..config import Config, RedisTarget
from ..connection import RedisConnection, open_connection, ping_check
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
