"""The three limiting algorithms as pure functions of (state, now): no I/O, no clock.

Each algorithm has two steps, both pure:

- `decide(state, now)`: may one more request go? Returns the `Decision` and the
  state after it (unchanged when the request is limited: only allowed requests
  use quota).
- `add(state, now, n)`: account `n` requests that were already allowed
  elsewhere (the batched mode's flush, where decisions were made before the
  counts reached Redis). Never refuses.

The Lua scripts in `gateway.limit.scripts` are these functions transcribed; the
unit tests check the Python, the integration tests check that Redis agrees.

Invariants: time is a float in seconds on whatever clock the caller uses (the
gateway uses Redis' `TIME`, so every process shares one clock); states are
plain tuples so a Redis reply converts to one without a class per algorithm;
`remaining` is never negative and `retry_after_s` is 0 exactly when allowed.

Arithmetic on time is done in whole microseconds, as the scripts do (Redis'
`TIME` has that resolution): seconds since the epoch as a float carry about
2.4e-7 s of rounding, enough to move a decision taken at an exact emission
interval or window fraction, so the same requests would be decided differently
here and in Redis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, TypeVar

# Float slack when comparing quantities built from products of periods and rates.
_EPS = 1e-9
_MICRO = 1_000_000


def _us(now: float) -> int:
    """A time in whole microseconds, as the scripts see Redis' clock."""
    return round(now * _MICRO)


S = TypeVar("S")


MIN_PERIOD_S: Final = 0.001
MAX_PERIOD_S: Final = 3650 * 86400.0


@dataclass(frozen=True, slots=True)
class Rate:
    """`limit` requests per `period_s` seconds; `burst` is GCRA's capacity (requests allowed
    at once after a quiet period), which is `limit` unless set."""

    limit: int
    period_s: float
    burst: int = 0

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period_s <= 0:
            raise ValueError("a rate needs a limit >= 1 and a period > 0")
        if not MIN_PERIOD_S <= self.period_s <= MAX_PERIOD_S:
            # The scripts count in whole microseconds: a period that rounds to none divided by
            # zero, and one past 2**53 of them loses its arithmetic's exactness.
            raise ValueError("a rate's period must be between 1 ms and 3650 days")
        if self.burst == 0:
            object.__setattr__(self, "burst", self.limit)
        if self.burst < 1:
            raise ValueError("burst must be >= 1")

    @property
    def period_us(self) -> int:
        """The period in whole microseconds, as the scripts take it."""
        return round(self.period_s * _MICRO)

    @property
    def interval_us(self) -> float:
        """GCRA's emission interval in microseconds: the steady spacing between allowed requests."""
        return self.period_us / self.limit


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: Requests still allowed now (after this one, when it was allowed).
    remaining: int
    #: Seconds until the quota is whole again (fixed: the window's end; sliding: the current
    #: window's end; GCRA: until the bucket is empty).
    reset_s: float
    #: Seconds until a request would be allowed; 0 when this one was.
    retry_after_s: float


class Algorithm(Generic[S]):
    name: ClassVar[str]
    #: The state of a client never seen (or whose key expired).
    empty: S

    def __init__(self, rate: Rate) -> None:
        self.rate = rate

    def decide(self, state: S, now: float) -> tuple[Decision, S]:
        raise NotImplementedError

    def add(self, state: S, now: float, n: int) -> S:
        raise NotImplementedError

    def idle(self, state: S, now: float) -> bool:
        """True when `state` says nothing any more: the client is as if never seen."""
        raise NotImplementedError

    def from_reply(self, values: list[int]) -> S:
        """The state from a flush script's reply (`gateway.limit.scripts`), in microseconds."""
        raise NotImplementedError


# Fixed window: (window index, allowed in it).
FixedState = tuple[int, int]


class FixedWindow(Algorithm[FixedState]):
    """At most `limit` allowed requests per aligned window of `period_s`. Exact within a
    window; across a boundary a client can get 2 x limit in one period's time."""

    name = "fixed"
    empty: FixedState = (0, 0)

    def _current(self, state: FixedState, now: float) -> tuple[int, int, float]:
        period, now_us = self.rate.period_us, _us(now)
        window = now_us // period
        count = state[1] if state[0] == window else 0
        return window, count, ((window + 1) * period - now_us) / _MICRO

    def decide(self, state: FixedState, now: float) -> tuple[Decision, FixedState]:
        limit = self.rate.limit
        window, count, reset = self._current(state, now)
        if count < limit:
            count += 1
            return Decision(True, limit - count, reset, 0.0), (window, count)
        return Decision(False, 0, reset, reset), (window, count)

    def add(self, state: FixedState, now: float, n: int) -> FixedState:
        window, count, _ = self._current(state, now)
        return window, count + n

    def idle(self, state: FixedState, now: float) -> bool:
        return state[0] < math.floor(now / self.rate.period_s)

    def from_reply(self, values: list[int]) -> FixedState:
        return values[0], values[1]


# Sliding-window counter: (window index, allowed in it, allowed in the window before).
SlidingState = tuple[int, int, int]


class SlidingWindow(Algorithm[SlidingState]):
    """Cloudflare's two-counter approximation of a sliding window: the previous window's
    count weighted by how much of it still overlaps the last `period_s`, plus the current
    window's count. Exact when requests are spread evenly over the previous window."""

    name = "sliding"
    empty: SlidingState = (0, 0, 0)

    def _current(self, state: SlidingState, now: float) -> tuple[int, int, int, float]:
        period, now_us = self.rate.period_us, _us(now)
        window = now_us // period
        if state[0] == window:
            count, prev = state[1], state[2]
        elif state[0] == window - 1:
            count, prev = 0, state[1]
        else:
            count, prev = 0, 0
        return window, count, prev, (now_us - window * period) / _MICRO

    def decide(self, state: SlidingState, now: float) -> tuple[Decision, SlidingState]:
        limit, period = self.rate.limit, self.rate.period_s
        window, count, prev, elapsed = self._current(state, now)
        estimate = prev * (1 - elapsed / period) + count
        reset = period - elapsed
        if estimate + 1 <= limit + _EPS:
            count += 1
            remaining = max(0, math.floor(limit - estimate - 1 + _EPS))
            return Decision(True, remaining, reset, 0.0), (window, count, prev)
        # Limited: when does the weighted estimate fall to limit - 1, with nothing more allowed?
        if count + 1 <= limit and prev > 0:
            wait = period * (1 - (limit - 1 - count) / prev) - elapsed
        else:
            # Not in this window: in the next one `count` becomes the weighted previous count.
            wait = reset + max(0.0, period * (1 - (limit - 1) / count)) if count else reset
        wait = max(wait, 0.0)
        return Decision(False, 0, reset, wait), (window, count, prev)

    def add(self, state: SlidingState, now: float, n: int) -> SlidingState:
        window, count, prev, _ = self._current(state, now)
        return window, count + n, prev

    def idle(self, state: SlidingState, now: float) -> bool:
        return state[0] < math.floor(now / self.rate.period_s) - 1

    def from_reply(self, values: list[int]) -> SlidingState:
        return values[0], values[1], values[2]


# GCRA: the theoretical arrival time in microseconds, as the script keeps it (0: none yet).
GcraState = float


class Gcra(Algorithm[GcraState]):
    """The generic cell rate algorithm, as redis-cell's CL.THROTTLE: one request every
    `period_s / limit` on average, up to `burst` at once. Exact: no window to be wrong
    about, one number per client."""

    name = "gcra"
    empty: GcraState = 0.0

    def decide(self, state: GcraState, now: float) -> tuple[Decision, GcraState]:
        interval = self.rate.interval_us
        capacity = self.rate.burst * interval
        now_us = _us(now)
        tat = max(state, now_us)
        new_tat = tat + interval
        allow_at = new_tat - capacity
        if now_us + 0.001 < allow_at:
            return Decision(False, 0, (tat - now_us) / _MICRO, (allow_at - now_us) / _MICRO), state
        remaining = max(0, math.floor((capacity - (new_tat - now_us)) / interval + _EPS))
        return Decision(True, remaining, (new_tat - now_us) / _MICRO, 0.0), new_tat

    def add(self, state: GcraState, now: float, n: int) -> GcraState:
        return max(state, _us(now)) + n * self.rate.interval_us

    def idle(self, state: GcraState, now: float) -> bool:
        return state <= _us(now)

    def from_reply(self, values: list[int]) -> GcraState:
        return float(values[0])


ALGORITHMS: dict[str, type[Algorithm[Any]]] = {
    "fixed": FixedWindow,
    "sliding": SlidingWindow,
    "gcra": Gcra,
}


_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}


def parse_rate(text: str) -> Rate:
    """`N/UNIT` or `N/<number>UNIT` (`100/s`, `6000/min`, `5/200ms`), optionally followed by
    `:burst=B`. Units: ms, s, min (or m), h, d. ValueError names what is wrong."""
    body, _, options = text.strip().partition(":")
    count_text, slash, period_text = body.partition("/")
    if not slash:
        raise ValueError(f"invalid rate {text!r}: expected N/UNIT, e.g. 100/s or 6000/min")
    try:
        limit = int(count_text)
    except ValueError:
        raise ValueError(f"invalid rate {text!r}: {count_text!r} is not a whole number") from None
    period_text = period_text.strip().lower()
    digits = len(period_text) - len(period_text.lstrip("0123456789."))
    number, unit = period_text[:digits], period_text[digits:]
    if unit not in _UNITS:
        raise ValueError(f"invalid rate {text!r}: unit must be one of ms, s, min, h, d")
    try:
        period = (float(number) if number else 1.0) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"invalid rate {text!r}: {number!r} is not a number") from None
    burst = 0
    if options:
        name, eq, value = options.partition("=")
        if name.strip() != "burst" or not eq:
            raise ValueError(f"invalid rate {text!r}: the only option is burst=N")
        try:
            burst = int(value)
        except ValueError:
            raise ValueError(f"invalid rate {text!r}: burst {value!r} is not a whole number") from None
        if burst < 1:
            raise ValueError(f"invalid rate {text!r}: burst must be >= 1")
    try:
        return Rate(limit, period, burst)  # its own bounds: the limit, the period, the burst
    except ValueError as exc:
        raise ValueError(f"invalid rate {text!r}: {exc}") from None
