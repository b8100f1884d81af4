"""The limiter the request path asks: turns a script's reply into a decision, and a
decision into the response fields of draft-ietf-httpapi-ratelimit-headers-11.

Owns the limit's counters (allowed, limited, clients currently limited) and the
429 response. Does no I/O: the backend runs the script (`Backend.run_script`),
this reads its reply. A reply it cannot read raises `AccountingError`, so a
broken script or an unexpected Redis answer takes the failure policy
(`--on-redis-error`) like any other failure, never a 500.

Fields: `RateLimit-Policy: "default";q=<limit>;w=<window s>` and
`RateLimit: "default";r=<remaining>;t=<seconds>` on every 429 (with
`Retry-After`), and with `--limit-headers` on allowed responses too. On a 302
the fields describe this gateway's quota, not the redirect target's: the draft
warns that a client following a redirect must not carry them over to the other
origin; the docs say so.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .. import errors
from ..errors import AccountingError
from ..resp import Reply, ReplyError
from .algorithms import ALGORITHMS, Algorithm, Decision, Rate
from .scripts import Script, decide_script, limit_key

_MICRO = 1_000_000
# Clients remembered as currently limited; beyond this the oldest entries are pruned first.
_TRACKED_MAX = 100_000


def _seconds(value: float) -> int:
    """Whole seconds for a header field, rounded up: a client waiting that long is never early."""
    return max(0, math.ceil(value - 1e-9))


class Limiter:
    def __init__(self, rate: Rate, algorithm: str) -> None:
        self.rate = rate
        self.algorithm_name = algorithm
        self.algorithm: Algorithm[Any] = ALGORITHMS[algorithm](rate)
        self.script: Script = decide_script(algorithm)
        #: The script's ARGV: limit, period in microseconds, burst.
        self.args: tuple[int, int, int] = (rate.limit, rate.period_us, rate.burst)
        self.policy = f'"default";q={rate.limit};w={max(1, _seconds(rate.period_s))}'
        self.allowed = 0
        self.limited = 0
        # Client address -> monotonic time until which it was last told to wait.
        self._limited_until: dict[str, float] = {}

    def keys(self, total_key: str) -> tuple[str, str]:
        return total_key, limit_key(total_key, self.algorithm_name)

    @staticmethod
    def read(reply: Reply) -> tuple[int, Decision]:
        """The total counter and the decision from a decide script's reply."""
        if isinstance(reply, ReplyError):
            raise AccountingError(errors.reply_error_kind(reply.prefix), str(reply))
        values = [v for v in reply if type(v) is int] if isinstance(reply, list) else []
        if len(values) != 5 or not isinstance(reply, list) or len(reply) != 5:
            raise AccountingError(errors.PROTOCOL, f"limit script answered {reply!r}")
        total, allowed, remaining, reset_us, retry_us = (int(v) for v in values)
        return total, Decision(allowed == 1, remaining, reset_us / _MICRO, retry_us / _MICRO)

    def fields(self, decision: Decision) -> tuple[tuple[str, str], ...]:
        t = decision.retry_after_s if not decision.allowed else decision.reset_s
        return (
            ("RateLimit-Policy", self.policy),
            ("RateLimit", f'"default";r={decision.remaining};t={_seconds(t)}'),
        )

    def count(self, ip: str, decision: Decision) -> None:
        if decision.allowed:
            self.allowed += 1
            return
        self.limited += 1
        tracked = self._limited_until
        if len(tracked) >= _TRACKED_MAX and ip not in tracked:
            self._prune(time.monotonic())
            if len(tracked) >= _TRACKED_MAX:
                del tracked[next(iter(tracked))]
        tracked[ip] = time.monotonic() + decision.retry_after_s

    def _prune(self, now: float) -> None:
        for ip in [ip for ip, until in self._limited_until.items() if until <= now]:
            del self._limited_until[ip]

    def clients_limited(self) -> int:
        """Clients told to wait whose wait has not ended yet."""
        self._prune(time.monotonic())
        return len(self._limited_until)

    def stats(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm_name,
            "rate": f"{self.rate.limit}/{self.rate.period_s:g}s:burst={self.rate.burst}",
            "allowed": self.allowed,
            "limited": self.limited,
            "clients_limited": self.clients_limited(),
        }
