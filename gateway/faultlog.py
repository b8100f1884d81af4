"""Logs accounting failures once per burst instead of once per request.

When Redis goes away at 30 000 req/s, a line (let alone a traceback) per request
would bury the log and cost more CPU than the requests. One line opens a burst,
one summary line per `report_every` seconds follows while it lasts, and one line
closes it when an increment succeeds again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from .errors import INTERNAL, AccountingError


class FailureLog:
    def __init__(
        self,
        logger: logging.Logger,
        policy_text: str,
        report_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._policy = policy_text
        self._every = report_every
        self._clock = clock
        self.failing = False
        self._started = 0.0
        self._reported = 0.0
        self._total = 0
        self._window: Counter[str] = Counter()

    def failure(self, err: AccountingError, count: int = 1) -> None:
        """`count` requests failed with `err` (more than one when a batch settles at once)."""
        now = self._clock()
        if not self.failing:
            self.failing = True
            self._started = self._reported = now
            self._total = count
            self._window.clear()
            self._log.warning(
                "Redis accounting failing (%s: %s); %s",
                err.kind,
                err,
                self._policy,
                # A bug deserves its traceback, but once per burst, not per request.
                exc_info=err if err.kind == INTERNAL else None,
            )
            return
        self._total += count
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
        if self.failing:
            self.failing = False
            self._log.warning(
                "Redis accounting recovered after %d failures over %.1f s",
                self._total,
                self._clock() - self._started,
            )
