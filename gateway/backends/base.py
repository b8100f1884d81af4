"""The contract every accounting backend fulfils; the request path sees only this.

A backend owns its Redis connections and nothing else: it never decides policy
(fail open or deny), never logs per request and never touches HTTP. It adds to
one key and either returns the new value, returns None (no value to report:
calibration, or an increment acknowledged before it reached Redis), or raises
`AccountingError`.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..cluster import ClusterRouter, NodeClient
from ..config import Config, RedisTarget
from ..connection import ReplySlot
from ..errors import AccountingError
from ..holding import Commit
from ..limit.algorithms import Decision
from ..limit.limiter import Limiter
from ..limit.scripts import Script
from ..resp import Reply, ReplyError, encode


@dataclass(slots=True)
class HeldOutcome:
    """How the held requests of one batch ended, for the gateway's counters."""

    requests: int
    #: From the batch's first held request to its release: an upper bound for each.
    waited_s: float
    #: The flush failed: the responses were released uncounted for now; the increments are retried.
    deferred: AccountingError | None
    #: Keys Redis refused (WRONGTYPE, ...): the error and how many held requests had that key.
    refused: list[tuple[AccountingError, int]]


class Backend(abc.ABC):
    name: ClassVar[str]
    #: False for the calibration mode, which never talks to Redis.
    uses_redis: ClassVar[bool] = True

    def __init__(self, config: Config) -> None:
        self.config = config

    async def start(self) -> None:
        """Prepare connections. Must not fail when Redis is down: the gateway fails open."""
        return None

    @abc.abstractmethod
    async def incr(self, key: str) -> int | None:
        """Add 1 to `key`; the new value, None, or AccountingError."""

    #: True when `incr` only ever waits on futures: no `asyncio.timeout`, no current-task
    #: lookups, nothing that needs a Task. A front end may then drive it without one.
    task_free: bool = False
    #: True when `incr_then` takes increments (raw and multiplexed on one server).
    replies_on_callbacks: bool = False

    def incr_then(self, key: str, slot: ReplySlot) -> bool:
        """Send `INCRBY key 1` with its reply going to `slot` (its `set_result` gets the reply as
        read, `set_exception` an AccountingError), from inside the connection's read: no
        coroutine, no future. False when this increment cannot go on callbacks alone (say the
        pool would have to connect first); the caller then awaits `incr`."""
        return False

    #: True when the backend offers `incr_now` (batched with --batch-ack none).
    adds_at_once: bool = False

    def incr_now(self, key: str) -> None:
        """Add 1 to `key` and return at once: the increment is the backend's to deliver, and
        nothing waits for it (no coroutine, no future). Raises AccountingError like `incr` when
        it cannot take the increment. Only backends with `adds_at_once`."""
        raise NotImplementedError(f"{self.name} does not add without waiting")

    #: True when the backend offers `incr_held` (batched with --batch-ack flush).
    holds_responses: bool = False
    #: Set by the gateway when `holds_responses`: called once per commit with held
    #: requests, when it is confirmed or fails.
    on_held: Callable[[HeldOutcome], None] | None = None

    def incr_held(self, key: str) -> Commit:
        """Add 1 to `key` without waiting; the response must be held until the returned commit
        releases it (`gateway.holding`). Only backends with `holds_responses`."""
        raise NotImplementedError(f"{self.name} does not hold responses")

    async def run_script(self, script: Script, keys: tuple[str, ...], args: tuple[int, ...]) -> Reply:
        """Run `script` (the limit's decision: INCRBY, window, decision) in one round trip:
        EVALSHA, resent once as EVAL if Redis answers NOSCRIPT (which means nothing ran).
        A Redis error reply is returned, not raised; AccountingError as for `incr`."""
        raise NotImplementedError(f"{self.name} does not run scripts")

    #: True when the backend decides limits locally (batched): the request path then calls
    #: `decide_local` instead of `run_script`, and `start_limiting` once.
    decides_locally: ClassVar[bool] = False

    def start_limiting(self, limiter: Limiter) -> None:
        raise NotImplementedError(f"{self.name} does not decide limits locally")

    def decide_local(self, key: str) -> Decision:
        """Decide one request of `key` without Redis, from the state the last flush returned
        plus what this process allowed since; record the use of quota for the next flush."""
        raise NotImplementedError(f"{self.name} does not decide limits locally")

    def hurry(self) -> None:
        """Shutdown has begun: whatever waits to be sent should go now, not at its usual time."""
        return None

    async def ping(self) -> None:
        """Raise AccountingError unless Redis answers now (readiness)."""
        return None

    def stats(self) -> dict[str, Any]:
        """Connection counters for /stats (pool size, idle, in use, waiting, ...)."""
        return {}

    async def close(self) -> None:
        """Finish or fail what is in flight and close every connection."""
        return None


class RedisAccess(Protocol):
    """The admin side of a backend's Redis: one server (`cluster.Direct`) or a cluster."""

    async def ping(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class OwnCodecBackend(Backend):
    """A backend on the project's own codec; `start()` sets `redis`, which answers
    readiness, stats and close whether it is one server or a cluster."""

    redis: RedisAccess
    router: ClusterRouter | None = None

    async def _start_cluster(self, make_node: Callable[[RedisTarget], NodeClient]) -> None:
        """--redis-cluster: a router with one `make_node(master)` per master answers for Redis."""
        c = self.config
        self.router = ClusterRouter(
            c.seeds, make_node, connect_timeout=c.connect_timeout, command_timeout=c.command_timeout
        )
        await self.router.start()
        self.redis = self.router

    async def ping(self) -> None:
        await self.redis.ping()

    def stats(self) -> dict[str, Any]:
        return self.redis.stats()

    async def close(self) -> None:
        await self.redis.close()


def noscript(reply: Reply) -> bool:
    """Redis does not have the script: nothing ran, so sending it again is safe."""
    return isinstance(reply, ReplyError) and reply.prefix == "NOSCRIPT"


async def eval_sha_first(
    send: Callable[[bytes], Awaitable[Reply]], script: Script, keys: tuple[str, ...], args: tuple[int, ...]
) -> Reply:
    """EVALSHA through `send`; on NOSCRIPT the one EVAL that loads the script again."""
    reply = await send(encode("EVALSHA", script.sha, len(keys), *keys, *args))
    if noscript(reply):
        reply = await send(encode("EVAL", script.body, len(keys), *keys, *args))
    return reply
