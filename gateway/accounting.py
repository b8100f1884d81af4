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


def read_incr_reply(reply: Reply) -> int:
    """The new counter value, or AccountingError for an error or unexpected reply."""
    if type(reply) is int:
        return reply
    if isinstance(reply, ReplyError):
        raise AccountingError(reply_error_kind(reply.prefix), str(reply))
    raise AccountingError(PROTOCOL, f"INCRBY answered {reply!r}, expected an integer")
