"""Redis Cluster for the project's own codec: route by hash slot, follow redirects.

Owns the slot map and one client per master node: a `Pool` (raw mode) or a
`Multiplexer` (multiplexed and batched). Invariants:

- A command goes to the node the slot map names for its key's slot. `-MOVED`
  means it was not executed: the slot map entry is corrected at once, a full
  refresh is scheduled, and the command is sent to the new owner. `-ASK` means
  "this command only": it is sent once to the named node, after `ASKING`, in
  the same write on the same connection, and the map is left as it is.
- A command whose outcome is unknown (timeout, connection lost) is never resent:
  an INCRBY may have been applied. It fails, and a map refresh is scheduled in
  case the node is gone.
- Two redirects in a row are followed at once; later hops wait a few milliseconds
  (ownership changing node by node can bounce a command between two nodes).
- The map is refreshed with `CLUSTER SLOTS` from any known node
  (nodes in the map first, then the seeds), at most one refresh at a time and at
  most every 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import errors
from . import stats as stats_merge
from .config import RedisTarget
from .connection import RedisConnection, open_connection
from .errors import AccountingError
from .multiplexer import Multiplexer
from .pool import Pool
from .resp import Reply, ReplyError, encode
from .slots import SLOTS, parse_cluster_slots, parse_redirect

log = logging.getLogger("gateway.cluster")

Address = tuple[str, int]
ASKING = encode("ASKING")
MAX_REDIRECTS = 8
# After two redirects in a row, wait a little before the next hop: a slot whose ownership is
# being changed node by node can bounce a command between two nodes for a few milliseconds.
REDIRECT_PAUSE_S = 0.005
REFRESH_MIN_INTERVAL_S = 0.1
# While no node gives the map, each failed refresh doubles the interval up to this: a cluster
# that is down is asked a few times a second at first, then every few seconds, not at request rate.
REFRESH_MAX_INTERVAL_S = 5.0


class NodeClient(Protocol):
    async def send(self, packed: bytes, count: int) -> list[Reply]:
        """Send `count` encoded commands in one write on one connection; their replies."""
        ...

    def stats(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class PoolNode:
    """A node reached through a bounded pool: one checkout per command (raw mode)."""

    def __init__(self, pool: Pool[RedisConnection]) -> None:
        self.pool = pool
        pool.start()  # its lifecycle: sweeper and minimum (no-op without one)

    async def send(self, packed: bytes, count: int) -> list[Reply]:
        conn = await self.pool.acquire()
        try:
            futs = conn.send_packed(packed, count)
            return [await futs[0]] if count == 1 else list(await asyncio.gather(*futs))
        finally:
            self.pool.release(conn)

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()

    async def close(self) -> None:
        await self.pool.close()


class MuxNode:
    """A node reached through shared connections (multiplexed and batched modes)."""

    def __init__(self, mux: Multiplexer, connect_timeout: float) -> None:
        self.mux = mux
        self._connect_timeout = connect_timeout
        mux.connect_in_background()

    async def send(self, packed: bytes, count: int) -> list[Reply]:
        if not self.mux.connects:
            # Never connected yet (a node first seen through a redirect): give it a moment.
            await self.mux.wait_connected(self._connect_timeout)
        futs = self.mux.connection().send_packed(packed, count)
        return [await futs[0]] if count == 1 else list(await asyncio.gather(*futs))

    def stats(self) -> dict[str, Any]:
        return self.mux.stats()

    async def close(self) -> None:
        await self.mux.close()


class Direct:
    """One Redis server behind the router's admin side (ping, stats, close), so a backend
    treats one server and a cluster alike everywhere but on its request path."""

    def __init__(self, node: NodeClient) -> None:
        self.node = node

    async def ping(self) -> None:
        await self.node.send(encode("PING"), 1)

    def stats(self) -> dict[str, Any]:
        return self.node.stats()

    async def close(self) -> None:
        await self.node.close()


class ClusterRouter:
    def __init__(
        self,
        seeds: tuple[RedisTarget, ...],
        make_node: Callable[[RedisTarget], NodeClient],
        *,
        connect_timeout: float,
        command_timeout: float,
    ) -> None:
        self._seeds = seeds
        self._make_node = make_node
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._slots: list[Address | None] = [None] * SLOTS
        self._nodes: dict[Address, NodeClient] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._refresh_interval = REFRESH_MIN_INTERVAL_S
        self._failed_in_row = 0  # refreshes in a row that got no map: one warning per outage
        self._closing = False
        self.refreshes = 0
        self.refresh_errors = 0
        self.moved = 0
        self.asked = 0

    # -- the slot map -------------------------------------------------------------

    async def start(self) -> None:
        """Load the slot map; if no node answers, requests fail open until one does."""
        await self.refresh()

    def node(self, addr: Address) -> NodeClient:
        node = self._nodes.get(addr)
        if node is None:
            if self._closing:
                # No new connections once closing (a last flush retried after close, say).
                raise AccountingError(errors.UNAVAILABLE, "cluster client is closed")
            target = dataclasses.replace(self._seeds[0], host=addr[0], port=addr[1], db=0)
            node = self._nodes[addr] = self._make_node(target)
        return node

    async def refresh(self) -> None:
        """Rebuild the slot map from the first node that answers CLUSTER SLOTS."""
        self._last_refresh = time.monotonic()
        known = {a for a in self._slots if a is not None}
        candidates = [*sorted(known), *((t.host, t.port) for t in self._seeds if (t.host, t.port) not in known)]
        last_error: Exception | None = None
        for host, port in candidates:
            target = dataclasses.replace(self._seeds[0], host=host, port=port, db=0)
            try:
                conn = await open_connection(
                    target, connect_timeout=self._connect_timeout, command_timeout=self._command_timeout
                )
            except AccountingError as exc:
                last_error = exc
                continue
            try:
                reply = await conn.execute("CLUSTER", "SLOTS")
                ranges = parse_cluster_slots(reply, host)
            except (AccountingError, ValueError) as exc:
                last_error = exc
                continue
            finally:
                conn.abort()
            if not ranges:
                last_error = ValueError(f"{host}:{port} serves no slots (cluster not set up?)")
                continue
            slots: list[Address | None] = [None] * SLOTS
            for r in ranges:
                for s in range(r.start, r.end + 1):
                    slots[s] = (r.host, r.port)
            self._slots = slots
            self.refreshes += 1
            if self._failed_in_row:
                log.warning("cluster: slot map loaded again after %d failed refreshes", self._failed_in_row)
            self._failed_in_row = 0
            self._refresh_interval = REFRESH_MIN_INTERVAL_S
            return
        self.refresh_errors += 1
        self._failed_in_row += 1
        self._refresh_interval = min(self._refresh_interval * 2, REFRESH_MAX_INTERVAL_S)
        if self._failed_in_row == 1:
            log.warning(
                "cluster: no seed or known node gave the slot map (%s); retrying on demand, at most every %.1f s",
                last_error,
                REFRESH_MAX_INTERVAL_S,
            )
        else:
            log.debug("cluster: slot map refresh %d failed: %s", self._failed_in_row, last_error)

    def schedule_refresh(self) -> None:
        if self._closing or (self._refresh_task is not None and not self._refresh_task.done()):
            return
        if time.monotonic() - self._last_refresh < self._refresh_interval:
            return
        self._refresh_task = asyncio.create_task(self.refresh())

    def redirected(self, slot: int, addr: Address) -> None:
        """A MOVED reply: the slot has a new owner now; the rest of the map may have changed too."""
        self.moved += 1
        self._slots[slot] = addr
        self.schedule_refresh()

    # -- commands -----------------------------------------------------------------------

    async def execute(self, slot: int, packed: bytes, count: int = 1) -> Reply:
        """Send encoded commands for keys of one slot; the last reply, redirects followed."""
        ask: Address | None = None
        for hop in range(MAX_REDIRECTS):
            if hop >= 2:
                await asyncio.sleep(REDIRECT_PAUSE_S * (hop - 1))
            addr = ask or self._slots[slot]
            if addr is None:
                self.schedule_refresh()
                raise AccountingError(errors.CONNECT, f"no cluster node known for slot {slot} (refreshing the map)")
            try:
                if ask is not None:
                    replies = await self.node(addr).send(ASKING + packed, count + 1)
                else:
                    replies = await self.node(addr).send(packed, count)
            except AccountingError:
                self.schedule_refresh()
                raise
            reply = replies[-1]
            redirect = parse_redirect(reply, addr[0])
            if redirect is None:
                if ask is not None and isinstance(replies[0], ReplyError):
                    return replies[0]  # ASKING itself refused
                return reply
            if redirect.ask:
                self.asked += 1
                ask = (redirect.host, redirect.port)
            else:
                ask = None
                self.redirected(redirect.slot, (redirect.host, redirect.port))
        raise AccountingError(errors.PROTOCOL, f"more than {MAX_REDIRECTS} redirects for slot {slot}")

    # -- admin and lifecycle ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        doc = stats_merge.merge([n.stats() for n in self._nodes.values()])
        masters = {a for a in self._slots if a is not None}
        doc["cluster"] = {
            "masters": len(masters),
            "slots_mapped": sum(1 for a in self._slots if a is not None),
            "refreshes": self.refreshes,
            "refresh_errors": self.refresh_errors,
            "moved": self.moved,
            "asked": self.asked,
        }
        return doc

    async def ping(self) -> None:
        addrs = {a for a in self._slots if a is not None}
        if not addrs:
            await self.refresh()
            addrs = {a for a in self._slots if a is not None}
            if not addrs:
                raise AccountingError(errors.CONNECT, "no cluster node reachable")
        for addr in sorted(addrs):
            reply = (await self.node(addr).send(encode("PING"), 1))[0]
            if isinstance(reply, ReplyError):
                raise AccountingError(errors.reply_error_kind(reply.prefix), f"{addr[0]}:{addr[1]}: {reply}")

    async def close(self) -> None:
        self._closing = True
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh_task
        await asyncio.gather(*(n.close() for n in self._nodes.values()), return_exceptions=True)
