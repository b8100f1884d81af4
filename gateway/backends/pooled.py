"""Pooled: redis-py's asyncio client over its BlockingConnectionPool.

The library the seed recommends for production, bounded to --pool-size with a
checkout that waits up to --pool-wait-ms. Pool counters come from the pool's
own lists; "created" and "waiting" are counted here because it keeps no tally.

With --redis-cluster it is redis-py's RedisCluster instead: --pool-size
connections per node, slots and redirects handled by the library. Its per-node
pool does not wait for a free connection: past the limit a command fails at once
(`pool_timeout`).

Connects go through a `ConnectBackoff`: after a failed connect or login, requests
that would need a new connection fail at once, with the failure's kind, until the
retry time (single-server mode; the cluster client makes its own connections).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster

from .. import errors
from ..backoff import ConnectBackoff
from ..errors import AccountingError
from ..limit.scripts import Script
from ..resp import Reply
from ._redispy import connection_kwargs, gated_connection_class, settle, translate
from .base import Backend

T = TypeVar("T")


class PooledBackend(Backend):
    name = "pooled"

    async def start(self) -> None:
        self._created = 0
        self._errors = 0
        self._wait_timeouts = 0
        self._inflight = 0
        self._backoff = ConnectBackoff()

        def connected() -> None:
            self._created += 1

        kwargs = connection_kwargs(self.config)
        self._cluster: RedisCluster | None = None
        self._client: aioredis.Redis | RedisCluster
        if self.config.cluster:
            for name in ("host", "port", "db"):
                kwargs.pop(name)
            self._cluster = RedisCluster(
                startup_nodes=[ClusterNode(t.host, t.port) for t in self.config.seeds],
                max_connections=self.config.pool_size,
                # Slots served by a node that is down must not stop the others from counting.
                require_full_coverage=False,
                **kwargs,
            )
            self._client = self._cluster
            # The slot map is loaded on first use; a cluster that is down then fails open.
            with contextlib.suppress(rexc.RedisError, OSError):
                await self._cluster.initialize()
            return
        self._pool = aioredis.BlockingConnectionPool(
            max_connections=self.config.pool_size,
            timeout=self.config.pool_wait,
            connection_class=gated_connection_class(self._backoff, self.config, connected),
            **kwargs,
        )
        self._client = aioredis.Redis(connection_pool=self._pool, retry=kwargs["retry"])

    async def incr(self, key: str) -> int:
        return int(await self._call(self._client.incrby(key, 1)))

    async def run_script(self, script: Script, keys: tuple[str, ...], args: tuple[int, ...]) -> Reply:
        """One EVALSHA through redis-py (EVAL once on NOSCRIPT); an error reply is raised as
        AccountingError, as for INCRBY."""
        return await self._call(self._evalsha(script, keys, args))

    async def _evalsha(self, script: Script, keys: tuple[str, ...], args: tuple[int, ...]) -> Reply:
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)  # type: ignore[no-any-return]
        except rexc.NoScriptError:
            return await self._client.eval(script.body, len(keys), *keys, *args)  # type: ignore[no-any-return]

    async def _call(self, command: Awaitable[T]) -> T:
        """Await one redis-py command: its failure translated and counted, its outcome told to
        the connect backoff (`settle`)."""
        self._inflight += 1
        try:
            value = await command
        except AccountingError:
            self._errors += 1  # refused by the connect backoff
            raise
        except (rexc.RedisError, OSError) as exc:
            err = translate(exc)
            if err.kind == errors.POOL_TIMEOUT:
                self._wait_timeouts += 1
            else:
                self._errors += 1
                settle(self._backoff, exc, err)
            raise err from None
        except BaseException as exc:
            settle(self._backoff, exc)
            raise
        finally:
            self._inflight -= 1
        settle(self._backoff, None)
        return value

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (rexc.RedisError, OSError) as exc:
            raise translate(exc) from None

    def stats(self) -> dict[str, Any]:
        if self._cluster is not None:
            nodes = self._cluster.get_nodes()
            size = sum(len(n._connections) for n in nodes)
            idle = sum(len(n._free) for n in nodes)
            in_use = size - idle
            limit = self.config.pool_size * max(1, len(nodes))
        else:
            idle = len(self._pool._available_connections)
            in_use = len(self._pool._in_use_connections)
            limit = self.config.pool_size
        return {
            "max": limit,
            "size": idle + in_use,
            "idle": idle,
            "in_use": in_use,
            "waiting": max(0, self._inflight - in_use),
            # redis-py's cluster client takes no connection class to count connects with.
            "created": self._created if self._cluster is None else None,
            "errors": self._errors,
            "wait_timeouts": self._wait_timeouts,
            "fast_failures": self._backoff.refused,
        }

    async def close(self) -> None:
        await self._client.aclose()
        if self._cluster is None:
            await self._pool.disconnect()
