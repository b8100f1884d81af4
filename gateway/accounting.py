"""Pure accounting rules: which key a client is counted under, and what a reply means.

No I/O. Every backend uses these, so all modes write identical keys and read
replies identically; the benchmark then compares transports, not rules.
"""

from __future__ import annotations

from .errors import PROTOCOL, AccountingError, reply_error_kind
from .resp import Reply, ReplyError


def counter_key(prefix: str, ip: str) -> str:
    """The Redis key for one client address."""
    return prefix + ip


def incr_command(key: str) -> bytes:
    """`INCRBY <key> 1` as RESP: the bytes `resp.encode("INCRBY", key, 1)` makes, in one
    format operation instead of a loop over the arguments, because raw and multiplexed
    mode send it for every request."""
    k = key.encode()
    return b"*3\r\n$6\r\nINCRBY\r\n$%d\r\n%b\r\n$1\r\n1\r\n" % (len(k), k)


def read_incr_reply(reply: Reply) -> int:
    """The new counter value, or AccountingError for an error or unexpected reply."""
    if type(reply) is int:
        return reply
    if isinstance(reply, ReplyError):
        raise AccountingError(reply_error_kind(reply.prefix), str(reply))
    raise AccountingError(PROTOCOL, f"INCRBY answered {reply!r}, expected an integer")
