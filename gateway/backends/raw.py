"""Raw: the project's own RESP codec over the project's own pool, no Redis library.

The seed's fastest mode, done properly: real source address, length-prefixed
bulk strings, the reply actually read, and a connection with a reply still
outstanding never reused.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..accounting import read_incr_reply
from ..connection import open_connection
from ..pool import Pool
from ..resp import encode
from .base import Backend


class RawBackend(Backend):
    name = "raw"

    async def start(self) -> None:
        c = self.config
        connect = partial(
            open_connection, c.redis, connect_timeout=c.connect_timeout, command_timeout=c.command_timeout
        )
        self.pool = Pool(connect, c.pool_size, c.pool_wait)

    async def incr(self, key: str) -> int:
        pool = self.pool
        conn = await pool.acquire()
        try:
            reply = await conn.send_packed(encode("INCRBY", key, 1))[0]
        finally:
            pool.release(conn)
        return read_incr_reply(reply)

    async def ping(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("PING")

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()

    async def close(self) -> None:
        await self.pool.close()
