"""Naive: a new Redis connection per request through redis-py (the seed's "basic usage").

Connect, INCRBY, close. At most --pool-size of these are open at once, so a
burst of requests cannot exhaust Redis's maxclients or the local port range;
excess requests wait up to --pool-wait-ms, as in the pooled modes. After a failed
connect or login, requests fail at once with the failure's kind until the retry
time (`gateway.backoff`) instead of each opening a connection bound to fail.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc

from .. import errors
from ..backoff import ConnectBackoff
from ..errors import AccountingError
from ..limit.scripts import Script
from ..resp import Reply
from ._redispy import connection_kwargs, gated_connection_class, settle, translate
from .base import Backend


class NaiveBackend(Backend):
    name = "naive"

    async def start(self) -> None:
        self._kwargs = connection_kwargs(self.config)
        self._backoff = ConnectBackoff()
        self._connection_class = gated_connection_class(self._backoff, self.config)
        self._slots = asyncio.Semaphore(self.config.pool_size)
        self._open = 0
        self._waiting = 0
        self._created = 0
        self._errors = 0
        self._wait_timeouts = 0

    async def incr(self, key: str) -> int:
        return int(await self._one(("INCRBY", key, 1)))  # type: ignore[arg-type]

    async def run_script(self, script: Script, keys: tuple[str, ...], args: tuple[int, ...]) -> Reply:
        """EVALSHA on the request's own connection, and EVAL on it after a NOSCRIPT. An error
        reply is raised as AccountingError, as for INCRBY."""
        return await self._one(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    async def _one(self, command: tuple[object, ...], script: Script | None = None) -> Reply:
        """Connect, send `command`, read its reply, close; for a script, EVAL after NOSCRIPT."""
        self._waiting += 1
        try:
            async with asyncio.timeout(self.config.pool_wait):
                await self._slots.acquire()
        except TimeoutError:
            self._wait_timeouts += 1
            raise AccountingError(errors.POOL_TIMEOUT, "no connection slot free") from None
        finally:
            self._waiting -= 1
        self._open += 1
        conn = self._connection_class(**self._kwargs)
        try:
            await conn.connect()
            self._created += 1
            await conn.send_command(*command)
            try:
                value = await conn.read_response()
            except rexc.NoScriptError:
                if script is None:
                    raise
                await conn.send_command("EVAL", script.body, *command[2:])
                value = await conn.read_response()
        except AccountingError:
            self._errors += 1  # refused by the connect backoff
            raise
        except (rexc.RedisError, OSError) as exc:
            self._errors += 1
            err = translate(exc)
            settle(self._backoff, exc, err)
            raise err from None
        except BaseException as exc:
            settle(self._backoff, exc)
            raise
        finally:
            await conn.disconnect()
            self._open -= 1
            self._slots.release()
        settle(self._backoff, None)
        return value  # type: ignore[no-any-return]

    async def ping(self) -> None:
        conn = aioredis.Connection(**self._kwargs)
        try:
            await conn.connect()
            await conn.send_command("PING")
            await conn.read_response()
        except (rexc.RedisError, OSError) as exc:
            raise translate(exc) from None
        finally:
            await conn.disconnect()

    def stats(self) -> dict[str, Any]:
        return {
            "max": self.config.pool_size,
            "size": self._open,
            "idle": 0,
            "in_use": self._open,
            "waiting": self._waiting,
            "created": self._created,
            "errors": self._errors,
            "wait_timeouts": self._wait_timeouts,
            "fast_failures": self._backoff.refused,
        }
