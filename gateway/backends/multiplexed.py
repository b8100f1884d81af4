"""Multiplexed: every request's INCRBY goes over one (or --mux-connections) shared
connection; commands from the same loop tick leave in one write.

No checkout, no pool wait: a request costs an encode, a future and a parse.
"""

from __future__ import annotations

from typing import Any

from ..accounting import read_incr_reply
from ..multiplexer import Multiplexer
from ..resp import encode
from .base import Backend


class MultiplexedBackend(Backend):
    name = "multiplexed"

    async def start(self) -> None:
        c = self.config
        self.mux = Multiplexer(
            c.redis,
            connections=c.mux_connections,
            connect_timeout=c.connect_timeout,
            command_timeout=c.command_timeout,
            dedicated_pool_size=c.pool_size,
            dedicated_wait=c.pool_wait,
        )
        await self.mux.start(wait=c.connect_timeout)

    async def incr(self, key: str) -> int:
        reply = await self.mux.connection().send_packed(encode("INCRBY", key, 1))[0]
        return read_incr_reply(reply)

    async def ping(self) -> None:
        await self.mux.execute("PING")

    def stats(self) -> dict[str, Any]:
        return self.mux.stats()

    async def close(self) -> None:
        await self.mux.close()
