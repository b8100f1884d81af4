"""Why an increment did not reach Redis, as one exception type with a `kind`.

Backends translate whatever their library raises into `AccountingError`, so the
request path handles one type, and /stats counts failures by a small, stable
set of kinds instead of by exception class names.
"""

from __future__ import annotations

# Kinds, as they appear in /stats under "failures" (and in /metrics as gateway_accounting_failures{kind}).
POOL_TIMEOUT = "pool_timeout"  # no connection became free within --pool-wait-ms
CONNECT = "connect_error"  # refused, unreachable, TLS or AUTH/SELECT failed
TIMEOUT = "timeout"  # connected, but the reply did not come within the command timeout
CONNECTION_LOST = "connection_lost"  # the connection broke with the command in flight
PROTOCOL = "protocol_error"  # the server sent something that is not RESP
DEFERRED = "deferred"  # batched mode: Redis unreachable; the increment is kept and retried
OVERFLOW = "overflow"  # batched mode: pending increments reached --batch-max-pending
UNAVAILABLE = "unavailable"  # the backend is closed or not started
INTERNAL = "internal"  # a bug: logged with a traceback, once per burst


class AccountingError(Exception):
    """An increment failed; `kind` says how. Redis error replies use `redis:<CODE>`."""

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(message or kind)
        self.kind = kind


def reply_error_kind(prefix: str) -> str:
    """Kind for a Redis error reply, by its code (WRONGTYPE, READONLY, ...)."""
    code = prefix.strip().upper()
    if not code.isalpha() or len(code) > 20:
        code = "ERR"
    return f"redis:{code}"
