"""What the redis-py backends share: connection options, exception translation, and the
connect backoff (`gateway.backoff`) applied to redis-py's connections."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import errors
from ..backoff import ConnectBackoff
from ..config import Config
from ..errors import AccountingError


def connection_kwargs(config: Config) -> dict[str, Any]:
    """redis-py options equivalent to the gateway's own connection settings.

    Retries are off: a timed-out INCRBY may already have been applied, and
    re-sending it would count the request twice.
    """
    target = config.redis
    kwargs: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "db": target.db,
        "username": target.username,
        "password": target.password,
        "socket_connect_timeout": config.connect_timeout,
        "socket_timeout": config.command_timeout,
        "retry": Retry(NoBackoff(), 0),
        # RESP2 like the project's own codec, and no CLIENT SETINFO: otherwise each
        # new connection sends HELLO and SETINFO first, round trips the naive
        # mode would pay on every request.
        "protocol": 2,
        "driver_info": None,
    }
    if target.tls:
        kwargs["ssl"] = True
    return kwargs


def translate(exc: Exception) -> AccountingError:
    """Map a redis-py exception onto the gateway's failure kinds."""
    if isinstance(exc, rexc.ResponseError) or getattr(exc, "status_code", None):
        code = getattr(exc, "status_code", None) or (str(exc).split(" ", 1)[0] if str(exc) else "ERR")
        return AccountingError(errors.reply_error_kind(code), str(exc))
    if isinstance(exc, rexc.TimeoutError):
        return AccountingError(errors.TIMEOUT, str(exc) or "Redis command timed out")
    if isinstance(exc, rexc.ConnectionError):
        # MaxConnectionsError: redis-py's cluster pool is full and does not wait.
        if isinstance(exc, rexc.MaxConnectionsError) or "No connection available" in str(exc):
            return AccountingError(errors.POOL_TIMEOUT, str(exc))
        return AccountingError(errors.CONNECT, str(exc))
    if isinstance(exc, (OSError, TimeoutError)):
        return AccountingError(errors.CONNECT, str(exc))
    if isinstance(exc, rexc.RedisError):
        return AccountingError(errors.PROTOCOL, str(exc))
    return AccountingError(errors.INTERNAL, repr(exc))


def refused_connection(exc: BaseException) -> bool:
    """Redis refused the connection itself in reply to a command (`ERR max number of clients
    reached`: redis-py sends nothing at connect without AUTH or SELECT, so the first command
    gets the refusal). A connect failure for the backoff, not a broken connection."""
    return isinstance(exc, rexc.ConnectionError) and bool(getattr(exc, "status_code", None))


def settle(backoff: ConnectBackoff, exc: BaseException | None, err: AccountingError | None = None) -> None:
    """What a command's outcome (`exc` None: a reply) says about connecting: a refusal is a failed
    connect, and so is a connection lost or timed out while no command had its reply since a
    connect; while connects are failing, a reply ends the backoff (a connect that sent nothing,
    no AUTH and no SELECT, is proven only by its first reply)."""
    if exc is None:
        backoff.unanswered = 0
        if backoff.failing is not None:
            backoff.succeeded()
    elif err is not None and refused_connection(exc):
        backoff.failed(err)
    elif err is not None and backoff.unanswered and isinstance(exc, rexc.ConnectionError | rexc.TimeoutError):
        backoff.lost_unanswered(err)
    elif backoff.failing is not None:
        backoff.abandoned()  # cancelled, or lost after replies: decided nothing


def gated_connection_class(
    backoff: ConnectBackoff, config: Config, on_connected: Callable[[], None] | None = None
) -> type[aioredis.Connection]:
    """A redis-py connection class whose connects (socket, AUTH, SELECT) go through `backoff`.

    While connects are failing (a wrong password, say), a connect is refused at once with
    AccountingError instead of opening a socket and sending AUTH for every request. Without
    AUTH or SELECT redis-py sends nothing at connect, so the connect ends the backoff only
    once a command on it has its reply (`settle`). `on_connected` is called after each connect.
    """
    answered_at_connect = bool(config.redis.password or config.redis.db)

    class GatedConnection(aioredis.Connection):
        async def connect(self) -> None:
            if self.is_connected:
                return
            backoff.admit()
            try:
                # redis-py's method has no annotations, and untyped_calls_exclude does not reach super().
                await super().connect()  # type: ignore[no-untyped-call]
            except (rexc.RedisError, OSError) as exc:
                backoff.failed(translate(exc))
                raise
            except BaseException:  # cancelled: this attempt decided nothing
                backoff.abandoned()
                raise
            if answered_at_connect:
                backoff.succeeded()
            else:
                backoff.unanswered += 1
            if on_connected is not None:
                on_connected()

    return GatedConnection
