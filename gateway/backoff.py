"""Backoff for connects that keep failing, shared by every pool of Redis connections.

Owns one decision: may this caller open a new connection now, or must it fail at
once? After a connect fails (refused, timed out, or refused by Redis itself: a
wrong password, maxclients, LOADING), new connects wait for a retry time that
doubles with each failure up to a ceiling; until then, and while the single
connect allowed after it is in progress, callers get the last failure's kind at
once. Without it every request would pay a connect (and an AUTH) bound to fail,
and Redis would see thousands of them a second. A connect that succeeds ends the
backoff. No I/O here and no timers: the pools ask at checkout.

A handshake is not proof: a server can answer it and then drop every command (a
proxy with no Redis behind it answers PING itself). So a connection the peer fails
with its first commands unanswered counts as a failed connect (`lost`), and while
connects are failing, the one admitted after the retry time ends the backoff only
once it has answered a command (`connected` makes it the trial); until then the
others still fail fast, as they would during its connect.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol

from .errors import AccountingError


class Trial(Protocol):
    """What the backoff asks of the connection whose first command decides."""

    @property
    def usable(self) -> bool:
        """Open and not failed: safe to hand out."""

    @property
    def proven(self) -> bool:
        """A command after the connect had its answer."""

    @property
    def dud(self) -> AccountingError | None:
        """Why the peer failed it with its first commands unanswered, if it did."""


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
        self._trial: Trial | None = None
        #: The last connect's failure while connects are failing, else None.
        self.failing: AccountingError | None = None
        #: Connects refused here without being tried.
        self.refused = 0
        #: Connects since the last reply on any connection, for connections that send nothing at
        #: connect (redis-py's without AUTH or SELECT) and so are proven only by a command.
        self.unanswered = 0

    def admit(self) -> None:
        """Return if a connect may start now; else raise AccountingError of the last failure's kind.

        An admitted connect must end in `succeeded`, `failed` or `abandoned`."""
        failing = self.failing
        if failing is None or self._settled():
            return
        now = self._clock()
        if self._probing or now < self._retry_at:
            self.refused += 1
            wait_ms = max(0.0, self._retry_at - now) * 1000
            raise AccountingError(failing.kind, f"{failing} (connects backed off; next in {wait_ms:.0f} ms)")
        self._probing = True  # this connect decides; the others fail fast meanwhile

    def _settled(self) -> bool:
        """Whether the trial connection (if any) has answered: then connects work again."""
        trial = self._trial
        if trial is None:
            return False
        if trial.proven:
            self.succeeded()
            return True
        dud = trial.dud
        if dud is not None:
            self.failed(dud)  # failed by the peer, and not given back yet (`lost` would say so)
        elif not trial.usable:
            self.abandoned()  # discarded before it decided anything (its request cancelled)
        return False

    def connected(self, conn: Trial) -> None:
        """An admitted connect finished its handshake. While connects are failing, `conn`
        becomes the trial: the backoff ends when it answers a command, and goes on (doubled)
        if the peer fails it first (`lost`)."""
        if self.failing is None:
            self.succeeded()
        else:
            self._trial = conn  # and `_probing` stays set: no other connect meanwhile

    def lost(self, conn: Trial, exc: AccountingError) -> None:
        """The peer failed `conn` with its first commands unanswered: a failed connect. Once
        per outage and trial, not for every such connection already open when it began."""
        if self.failing is None or conn is self._trial:
            self.failed(exc)

    def lost_unanswered(self, exc: AccountingError) -> None:
        """A connection failed while no reply had come on any connection since one connected
        (`unanswered`): the server takes the connect and drops the command. A failed connect,
        once per outage and then once per connect admitted, not for every request that saw it."""
        if self.failing is None or self._probing:
            self.failed(exc)

    def succeeded(self) -> None:
        self._probing = False
        self._trial = None
        self.failing = None
        self._delay = 0.0

    def failed(self, exc: AccountingError) -> None:
        """A connect failed; also for a refusal seen only at the first command (maxclients)."""
        self._probing = False
        self._trial = None
        self._delay = min(max(self._delay * 2, self._initial), self._most)
        # Half fixed, half jitter: a minimum pause, and gateways that failed together do not retry together.
        self._retry_at = self._clock() + self._delay * random.uniform(0.5, 1.0)
        self.failing = exc

    def abandoned(self) -> None:
        """The admitted connect was cancelled: it decided nothing."""
        self._probing = False
        self._trial = None

    def waiting(self) -> bool:
        """True while `admit` would refuse: connects are failing and the retry time has not
        come, or the one connect allowed after it is in progress. Asks without counting a
        refusal, for background connects that simply try again later."""
        if self.failing is None or self._settled():
            return False
        return self._probing or self._clock() < self._retry_at
