"""Multiplexed: every request's INCRBY goes over one (or --mux-connections) shared
connection; commands from the same loop tick leave in one write.

No checkout, no pool wait: a request costs an encode, a future and a parse.
With --redis-cluster, one multiplexer per master node, keys routed by hash slot.
"""

from __future__ import annotations

from ..accounting import incr_command, read_incr_reply
from ..cluster import Direct, MuxNode
from ..config import Config, RedisTarget
from ..connection import ReplySlot
from ..errors import AccountingError
from ..limit.scripts import Script
from ..multiplexer import Multiplexer
from ..resp import Reply
from ..slots import key_slot
from .base import OwnCodecBackend, eval_sha_first


class MultiplexedBackend(OwnCodecBackend):
    name = "multiplexed"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        # One server: an increment waits only on its reply's future. A cluster's router may
        # refresh its slot map inside the request, which wants a task.
        self.task_free = not config.cluster
        self.replies_on_callbacks = not config.cluster

    async def start(self) -> None:
        c = self.config
        if c.cluster:
            await self._start_cluster(lambda t: MuxNode(self._mux(t), c.connect_timeout))
        else:
            self.mux = self._mux(c.redis)
            self.redis = Direct(MuxNode(self.mux, c.connect_timeout))
            await self.mux.start(wait=c.connect_timeout)

    def _mux(self, target: RedisTarget) -> Multiplexer:
        c = self.config
        return Multiplexer(
            target,
            connections=c.mux_connections,
            connect_timeout=c.connect_timeout,
            command_timeout=c.command_timeout,
            lifecycle=c.lifecycle,
        )

    def incr_then(self, key: str, slot: ReplySlot) -> bool:
        try:
            self.mux.connection().send_to(incr_command(key), slot)
        except AccountingError as exc:
            slot.set_exception(exc)
        return True

    async def incr(self, key: str) -> int:
        if self.router is not None:
            return read_incr_reply(await self.router.execute(key_slot(key), incr_command(key)))
        reply = await self.mux.connection().send_one(incr_command(key))
        return read_incr_reply(reply)

    async def run_script(self, script: Script, keys: tuple[str, ...], args: tuple[int, ...]) -> Reply:
        router = self.router
        if router is not None:
            slot = key_slot(keys[0])  # a client's keys share its slot (gateway.limit.scripts)
            return await eval_sha_first(lambda packed: router.execute(slot, packed), script, keys, args)
        mux = self.mux
        return await eval_sha_first(lambda packed: mux.connection().send_packed(packed)[0], script, keys, args)
