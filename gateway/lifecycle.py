"""When a pooled or shared connection is opened, checked, retired: the policy, as pure arithmetic.

Owns the rules only; `gateway.pool.Pool` and `gateway.multiplexer.Multiplexer` apply them.
No I/O, no clock of its own (every method takes `now`), no randomness it does not take
as an argument, so every rule is testable in memory.

- `min_size`: connections opened at start and kept open (reopened in the background).
- `idle_timeout`: a connection idle this long is closed; none ever stays idle longer, so a
  middlebox that silently forgets idle flows (a cloud load balancer, a NAT) never holds
  the only copy of a connection's state.
- `check_after`: a connection idle longer than this is checked before it carries a request.
- `max_lifetime` and `lifetime_jitter`: a connection expires `max_lifetime` plus a uniform
  random share of `lifetime_jitter` after it was opened (the jitter spreads reconnects,
  so gateways that connected together do not all reconnect together). A lifetime of 0
  means "once": a connection serves one checkout.
- `max_uses`: a connection is retired when it comes back from its Nth checkout.

Idle time is not stamped per checkout (that would cost every request a clock read): the
pool's sweeper ages idle connections in generations, one per sweep, and a generation
carries `since`, the earliest moment its connections can have become idle. Rules that
bound idle time therefore compare against the *longest* idle a connection in the
generation can have, so a limit is never overrun; an idle connection is closed at most two
sweep periods early (a generation spans one period, and the next sweep comes one later).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# Sweeps per shortest limit: a limit is acted on at most 2/SWEEPS_PER_LIMIT of it early.
SWEEPS_PER_LIMIT = 8
# With a minimum size, a lost connection is noticed and reopened within this.
REFILL_PERIOD_S = 0.25
MIN_PERIOD_S = 0.005


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """What a pool does with its connections over time. None switches a rule off."""

    min_size: int = 0
    idle_timeout: float | None = None
    check_after: float | None = None
    max_lifetime: float | None = None
    lifetime_jitter: float = 0.0
    max_uses: int | None = None

    def __post_init__(self) -> None:
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0 (None: never)")
        if self.check_after is not None and self.check_after < 0:
            raise ValueError("check_after must be >= 0 (None: never)")
        if self.max_lifetime is not None and self.max_lifetime < 0:
            raise ValueError("max_lifetime must be >= 0 (0: one checkout; None: unlimited)")
        if self.lifetime_jitter < 0:
            raise ValueError("lifetime_jitter must be >= 0")
        if self.max_uses is not None and self.max_uses < 1:
            raise ValueError("max_uses must be >= 1 (None: unlimited)")

    @property
    def active(self) -> bool:
        """Anything to do over time: the pool then runs a sweeper."""
        return bool(self.min_size) or any(
            v is not None for v in (self.idle_timeout, self.check_after, self.max_lifetime, self.max_uses)
        )

    @property
    def retires(self) -> bool:
        """Connections carry an expiry or a use count, looked at each time one comes back."""
        return self.max_lifetime is not None or self.max_uses is not None

    def expires_at(self, opened: float, uniform: Callable[[], float]) -> float:
        """When a connection opened at `opened` expires; `uniform()` is a number in [0, 1).

        The seed's three flavours: simple (no jitter), fuzzy (jitter), once (lifetime 0)."""
        if self.max_lifetime is None:
            return math.inf
        if self.max_lifetime == 0:
            return opened  # once: expired as soon as it comes back
        return opened + self.max_lifetime + self.lifetime_jitter * uniform()

    def sweep_period(self) -> float:
        """Seconds between sweeps: an eighth of the shortest time limit, and often enough to
        reopen a lost connection of the minimum within `REFILL_PERIOD_S`."""
        limits = [v for v in (self.idle_timeout, self.check_after, self.max_lifetime) if v]
        period = min(limits) / SWEEPS_PER_LIMIT if limits else math.inf
        if self.min_size:
            period = min(period, REFILL_PERIOD_S)
        if self.check_after == 0:
            period = min(period, REFILL_PERIOD_S)
        if math.isinf(period):
            period = 1.0  # max_uses alone: the sweeper only ages generations
        return max(period, MIN_PERIOD_S)

    def idle_expired(self, since: float, now: float, period: float) -> bool:
        """A generation idle since `since` must close now: by the next sweep its longest idle
        would exceed the timeout."""
        return self.idle_timeout is not None and now + period - since >= self.idle_timeout

    def needs_check(self, since: float, now: float) -> bool:
        """A connection of a generation idle since `since` may have been idle longer than
        `check_after`: check it before use."""
        return self.check_after is not None and now - since > self.check_after
