"""Backoff for connects that keep failing, shared by every pool of Redis connections.

Owns one decision: may this caller open a new connection now, or must it fail at
once? After a connect fails (refused, timed out, or refused by Redis itself: a
wrong password, maxclients, LOADING), new connects wait for a retry time that
doubles with each failure up to a ceiling; until then, and while the single
connect allowed after it is in progress, callers get the last failure's kind at
once. Without it every request would pay a connect (and an AUTH) bound to fail,
and Redis would see thousands of them a second. A connect that succeeds ends the
backoff. No I/O here and no timers: the pools ask at checkout.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from .errors import AccountingError


class ConnectBackoff:
    def __init__(
        self,
        initial: float = 0.05,
        most: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._initial = initial
        self._most = most
        self._clock = clock
        self._delay = 0.0
        self._retry_at = 0.0
        self._probing = False
        #: The last connect's failure while connects are failing, else None.
        self.failing: AccountingError | None = None
        #: Connects refused here without being tried.
        self.refused = 0

    def admit(self) -> None:
        """Return if a connect may start now; else raise AccountingError of the last failure's kind.

        An admitted connect must end in `succeeded`, `failed` or `abandoned`."""
        failing = self.failing
        if failing is None:
            return
        now = self._clock()
        if self._probing or now < self._retry_at:
            self.refused += 1
            wait_ms = max(0.0, self._retry_at - now) * 1000
            raise AccountingError(failing.kind, f"{failing} (connects backed off; next in {wait_ms:.0f} ms)")
        self._probing = True  # this connect decides; the others fail fast meanwhile

    def succeeded(self) -> None:
        self._probing = False
        self.failing = None
        self._delay = 0.0

    def failed(self, exc: AccountingError) -> None:
        """A connect failed; also for a refusal seen only at the first command (maxclients)."""
        self._probing = False
        self._delay = min(max(self._delay * 2, self._initial), self._most)
        # Half fixed, half jitter: a minimum pause, and gateways that failed together do not retry together.
        self._retry_at = self._clock() + self._delay * random.uniform(0.5, 1.0)
        self.failing = exc

    def abandoned(self) -> None:
        """The admitted connect was cancelled: it decided nothing."""
        self._probing = False

    def waiting(self) -> bool:
        """True while `admit` would refuse: connects are failing and the retry time has not
        come, or the one connect allowed after it is in progress. Asks without counting a
        refusal, for background connects that simply try again later."""
        if self.failing is None:
            return False
        return self._probing or self._clock() < self._retry_at
