"""The connect backoff's decisions, on a fake clock: when a connect may start, and when a
connection that finished its handshake ends a backoff."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.backoff import ConnectBackoff
from gateway.errors import AccountingError

LOST = AccountingError("connection_lost", "connection to Redis lost: closed by peer")


@dataclass
class Conn:
    usable: bool = True
    proven: bool = False
    dud: AccountingError | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def failing_backoff(clock: Clock) -> ConnectBackoff:
    b = ConnectBackoff(initial=0.05, most=0.5, clock=clock)
    b.admit()
    b.connected(first := Conn())
    first.dud = LOST  # the peer drops the first command: a failed connect, though it connected
    b.lost(first, LOST)
    assert b.failing is LOST and b.waiting()
    return b


def trial_after_retry(clock: Clock, b: ConnectBackoff) -> Conn:
    """Past the first retry time (25-50 ms): the connect admitted then, connected."""
    clock.now += 0.05
    b.admit()
    b.connected(trial := Conn())
    return trial


def refused(b: ConnectBackoff) -> bool:
    try:
        b.admit()
    except AccountingError:
        return True
    return False


def test_a_connection_lost_with_its_first_command_unanswered_is_a_failed_connect() -> None:
    clock = Clock()
    b = failing_backoff(clock)
    assert refused(b) and b.refused == 1
    clock.now += 0.05  # past the first retry time (25-50 ms)
    assert not refused(b)


def test_after_a_failure_a_connection_ends_the_backoff_only_once_it_has_answered() -> None:
    clock = Clock()
    b = failing_backoff(clock)
    trial = trial_after_retry(clock, b)
    # Its handshake worked, but until a command on it has its reply the others still fail fast.
    clock.now += 10
    assert refused(b) and b.waiting()
    trial.proven = True
    assert not b.waiting() and b.failing is None
    assert not refused(b)


def test_a_trial_the_peer_fails_doubles_the_wait() -> None:
    clock = Clock()
    b = failing_backoff(clock)
    waits = []
    for _ in range(6):
        start = clock.now
        while refused(b):
            clock.now += 0.001
        waits.append(clock.now - start)
        b.connected(trial := Conn())
        trial.dud = LOST
        trial.usable = False
        b.lost(trial, LOST)
    # Half fixed, half jitter: each wait in [d/2, d] for d = 0.05, 0.1, 0.2, 0.4, 0.5, 0.5 after
    # the first failure's 0.05.
    for wait, most in zip(waits, (0.05, 0.1, 0.2, 0.4, 0.5, 0.5), strict=True):
        assert most / 2 - 0.002 <= wait <= most + 0.002, waits


def test_a_trial_failed_but_not_given_back_yet_counts_at_the_next_admit() -> None:
    # Its request awaits the failure in a later loop turn: another checkout may ask first.
    clock = Clock()
    b = failing_backoff(clock)
    trial = trial_after_retry(clock, b)
    trial.dud, trial.usable = LOST, False
    assert refused(b)  # a failed trial: backed off again (now 50-100 ms), not a free probe
    clock.now += 0.049
    assert refused(b)
    b.lost(trial, LOST)  # given back later: already counted, not twice
    clock.now += 0.052
    assert not refused(b)


def test_a_trial_discarded_by_its_own_side_decides_nothing() -> None:
    clock = Clock()
    b = failing_backoff(clock)
    trial = trial_after_retry(clock, b)
    trial.usable = False  # its request was cancelled: discarded without an answer or a failure
    assert not refused(b)  # the next connect is the trial now, at once


def test_connections_lost_unproven_together_count_once() -> None:
    clock = Clock()
    b = ConnectBackoff(initial=0.05, most=0.5, clock=clock)
    conns = [Conn() for _ in range(5)]
    for c in conns:
        b.admit()
        b.connected(c)
    for c in conns:  # five connections opened together, each dropped at its first command
        c.dud, c.usable = LOST, False
        b.lost(c, LOST)
    clock.now += 0.05  # the first failure's retry time: the others did not double it
    assert not refused(b)
    b.connected(Conn(proven=True))
    assert not b.waiting() and b.failing is None
