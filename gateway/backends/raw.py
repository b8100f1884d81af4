"""Raw: the project's own RESP codec over the project's own pool, no Redis library.

The seed's fastest mode, done properly: real source address, length-prefixed
bulk strings, the reply actually read, and a connection with a reply still
outstanding never reused. With --redis-cluster, one such pool per master node,
keys routed by hash slot (`gateway.cluster`).
"""

from __future__ import annotations

from functools import partial

from ..accounting import read_incr_reply
from ..cluster import Direct, PoolNode
from ..config import Config, RedisTarget
from ..connection import RedisConnection, open_connection, ping_check
from ..pool import Pool
from ..resp import encode
from ..slots import key_slot
from .base import OwnCodecBackend


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
            return read_incr_reply(await self.router.execute(key_slot(key), encode("INCRBY", key, 1)))
        pool = self.pool
        conn = await pool.acquire()
        try:
            reply = await conn.send_packed(encode("INCRBY", key, 1))[0]
        finally:
            pool.release(conn)
        return read_incr_reply(reply)
