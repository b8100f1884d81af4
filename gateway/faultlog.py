"""Logs accounting failures once per burst of each kind instead of once per request.

When Redis goes away at 30 000 req/s, a line (let alone a traceback) per request
would bury the log and cost more CPU than the requests. So does one bad key
among many good ones: if any success closed the burst, each failure after it
would open a new one. Hence bursts per failure kind (`timeout`,
`redis:WRONGTYPE`, ...):

- the first failure of a kind logs one line, with the error and the policy;
- while any kind keeps failing, one summary line per `report_every` seconds
  counts the failures of every kind since the last line;
- a kind's burst closes, with one "recovered" line, at the first success that
  comes at least `quiet` seconds after that kind's last failure. Kinds that close
  together share the line. With no traffic, nothing is logged.

The counts in /stats are kept by the gateway, exactly; this only decides what is
worth a log line.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .errors import INTERNAL, AccountingError


@dataclass(slots=True)
class _Burst:
    started: float
    last: float
    total: int


class FailureLog:
    def __init__(
        self,
        logger: logging.Logger,
        policy_text: str,
        report_every: float = 10.0,
        quiet: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._policy = policy_text
        self._every = report_every
        self._quiet = quiet
        self._clock = clock
        self._bursts: dict[str, _Burst] = {}
        self._reported = 0.0
        self._window: Counter[str] = Counter()
        # No burst can close before this time: spares a success the look at every burst.
        self._next_close = 0.0

    @property
    def failing(self) -> bool:
        """A burst of some kind is open: the gateway reports its successes."""
        return bool(self._bursts)

    def failure(self, err: AccountingError, count: int = 1) -> None:
        """`count` requests failed with `err` (more than one when a batch settles at once)."""
        now = self._clock()
        if not self._bursts:
            self._reported = now
            self._window.clear()
        burst = self._bursts.get(err.kind)
        if burst is None:
            self._bursts[err.kind] = _Burst(now, now, count)
            if len(self._bursts) == 1:
                self._next_close = now + self._quiet
            self._log.warning(
                "Redis accounting failing (%s: %s); %s",
                err.kind,
                err,
                self._policy,
                # A bug deserves its traceback, but once per burst, not per request.
                exc_info=err if err.kind == INTERNAL else None,
            )
            return
        burst.last = now
        burst.total += count
        self._window[err.kind] += count
        if now - self._reported >= self._every:
            kinds = ", ".join(f"{k}={n}" for k, n in self._window.most_common())
            self._log.warning(
                "Redis accounting still failing: %d failures in the last %.0f s (%s); last: %s",
                sum(self._window.values()),
                now - self._reported,
                kinds,
                err,
            )
            self._reported = now
            self._window.clear()

    def success(self) -> None:
        """An increment succeeded: closes the bursts whose kind has been quiet long enough."""
        if not self._bursts:
            return
        now = self._clock()
        if now < self._next_close:
            return
        quiet = self._quiet
        closed = [(kind, b) for kind, b in self._bursts.items() if now - b.last >= quiet]
        for kind, _ in closed:
            del self._bursts[kind]
            self._window.pop(kind, None)
        if self._bursts:
            self._next_close = min(b.last for b in self._bursts.values()) + quiet
        if closed:
            self._log.warning(
                "Redis accounting recovered from %s (no such failure for %.0f s)",
                ", ".join(f"{kind}: {b.total} failures over {b.last - b.started:.1f} s" for kind, b in closed),
                quiet,
            )
