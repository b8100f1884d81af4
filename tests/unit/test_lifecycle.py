"""Pool lifecycle in memory: the policy's arithmetic, and the pool applying it to fake
connections (no sockets)."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.errors import AccountingError
from gateway.lifecycle import MIN_PERIOD_S, REFILL_PERIOD_S, Lifecycle
from gateway.pool import Pool

# -- the policy -------------------------------------------------------------------------


def test_lifetimes_simple_fuzzy_once() -> None:
    assert Lifecycle().expires_at(10.0, lambda: 0.5) == math.inf
    assert Lifecycle(max_lifetime=5).expires_at(10.0, lambda: 0.9) == 15.0  # simple: no jitter
    fuzzy = Lifecycle(max_lifetime=1.0, lifetime_jitter=0.5)
    assert fuzzy.expires_at(10.0, lambda: 0.0) == 11.0
    assert fuzzy.expires_at(10.0, lambda: 0.999) == pytest.approx(11.4995)
    assert Lifecycle(max_lifetime=0).expires_at(10.0, lambda: 0.7) == 10.0  # once


def test_sweep_period_follows_the_shortest_limit() -> None:
    assert Lifecycle(idle_timeout=180, check_after=30).sweep_period() == 30 / 8
    assert Lifecycle(idle_timeout=0.5).sweep_period() == 0.5 / 8
    assert Lifecycle(idle_timeout=180, min_size=3).sweep_period() == REFILL_PERIOD_S
    assert Lifecycle(check_after=0.0001).sweep_period() == MIN_PERIOD_S
    assert Lifecycle(max_lifetime=0, idle_timeout=8).sweep_period() == 1.0  # once has no period


def test_idle_limits_are_never_overrun() -> None:
    p = Lifecycle(idle_timeout=8.0, check_after=2.0)
    period = p.sweep_period()  # 0.25
    # A generation idle since t=0 is closed at the sweep after which it could exceed 8 s.
    assert not p.idle_expired(0.0, 7.7, period)
    assert p.idle_expired(0.0, 7.75, period)
    assert not p.needs_check(0.0, 2.0) and p.needs_check(0.0, 2.01)
    assert not Lifecycle().idle_expired(0.0, 1e9, 1.0) and not Lifecycle().needs_check(0.0, 1e9)


def test_active_and_retires() -> None:
    assert not Lifecycle().active
    assert Lifecycle(min_size=1).active and not Lifecycle(min_size=1).retires
    assert Lifecycle(max_uses=3).retires and Lifecycle(max_lifetime=0).retires


@pytest.mark.parametrize(
    "kw",
    [{"min_size": -1}, {"idle_timeout": 0}, {"check_after": -1}, {"max_lifetime": -1}, {"lifetime_jitter": -1},
     {"max_uses": 0}],
)  # fmt: skip
def test_invalid_policies_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Lifecycle(**kw)  # type: ignore[arg-type]


# -- the pool applying it ---------------------------------------------------------------------


class FakeConn:
    def __init__(self, n: int) -> None:
        self.n = n
        self.usable = True
        self.pending = 0
        self.proven = True  # the pool's connect backoff: it works, and was never a dud
        self.dud = None
        self.aborted = False
        self.healthy = True

    def abort(self) -> None:
        self.aborted = True
        self.usable = False

    async def close(self) -> None:
        self.abort()


class Opener:
    def __init__(self) -> None:
        self.opened: list[FakeConn] = []
        self.fail = False

    async def __call__(self) -> FakeConn:
        await asyncio.sleep(0)
        if self.fail:
            raise AccountingError("connect_error", "refused")
        c = FakeConn(len(self.opened))
        self.opened.append(c)
        return c


async def _check(conn: FakeConn) -> bool:
    await asyncio.sleep(0)
    return conn.healthy


async def test_max_uses_retires_a_connection_when_it_comes_back() -> None:
    opener = Opener()
    pool = Pool(opener, 2, 1.0, lifecycle=Lifecycle(max_uses=3))
    for _ in range(3):
        c = await pool.acquire()
        assert c is opener.opened[0]
        pool.release(c)
    assert opener.opened[0].aborted and pool.stats()["used_up"] == 1 and pool.stats()["size"] == 0
    assert (await pool.acquire()) is opener.opened[1]
    await pool.close()


async def test_lifetime_zero_is_one_checkout_per_connection() -> None:
    opener = Opener()
    pool = Pool(opener, 2, 1.0, lifecycle=Lifecycle(max_lifetime=0))
    for i in range(3):
        c = await pool.acquire()
        assert c.n == i
        pool.release(c)
        assert c.aborted
    assert pool.stats()["expired"] == 3
    await pool.close()


async def test_dirty_connection_is_not_counted_as_retired() -> None:
    pool = Pool(Opener(), 1, 1.0, lifecycle=Lifecycle(max_uses=1))
    c = await pool.acquire()
    c.pending = 1
    pool.release(c)
    s = pool.stats()
    assert s["discarded"] == 1 and s["used_up"] == 0 and s["size"] == 0
    await pool.close()


async def test_idle_connections_closed_after_the_timeout() -> None:
    opener = Opener()
    pool = Pool(opener, 3, 1.0, lifecycle=Lifecycle(idle_timeout=0.08))
    pool.start()
    conns = [await pool.acquire() for _ in range(3)]
    for c in conns:
        pool.release(c)
    await asyncio.sleep(0.04)
    assert pool.stats()["idle"] == 3  # not before 3/4 of the timeout
    await asyncio.sleep(0.08)
    s = pool.stats()
    assert s["idle"] == 0 and s["size"] == 0 and s["closed_idle"] == 3, s
    assert all(c.aborted for c in conns)
    await pool.close()


async def test_busy_connection_is_not_closed_idle() -> None:
    pool = Pool(Opener(), 1, 1.0, lifecycle=Lifecycle(idle_timeout=0.05))
    pool.start()
    first = await pool.acquire()
    for _ in range(20):  # used every 10 ms, for 4 timeouts
        pool.release(first)
        await asyncio.sleep(0.01)
        assert (await pool.acquire()) is first
    pool.release(first)
    assert pool.stats()["closed_idle"] == 0
    await pool.close()


async def test_failed_check_discards_the_idle_ones_and_the_checkout_gets_a_fresh_one() -> None:
    opener = Opener()
    pool = Pool(opener, 4, 1.0, lifecycle=Lifecycle(check_after=0.01), check=_check)
    pool.start()
    conns = [await pool.acquire() for _ in range(3)]
    for c in conns:
        c.healthy = False  # the path forgot them
        pool.release(c)
    await asyncio.sleep(0.05)
    got = await pool.acquire()
    assert got not in conns and got.n == 3  # a fresh connection, no error
    s = pool.stats()
    assert s["checks"] == 1 and s["check_failures"] == 1, s  # one check, not one per connection
    assert s["size"] == 1 and all(c.aborted for c in conns)
    pool.release(got)
    await pool.close()


async def test_a_sweep_during_a_failed_check_forgets_each_connection_once() -> None:
    gate = asyncio.Event()

    async def held_check(conn: FakeConn) -> bool:
        await gate.wait()
        return False  # the path dropped it

    opener = Opener()
    pool = Pool(opener, 4, 1.0, lifecycle=Lifecycle(check_after=0), check=held_check)
    x, a, b, c = [await pool.acquire() for _ in range(4)]
    pool.release(x)
    pool._sweep()  # generation [x]
    pool.release(a)
    pool.release(b)
    pool._sweep()  # generation [a, b]
    x.usable = False  # closed while idle: the next sweep empties its generation
    t = asyncio.create_task(pool.acquire())  # takes b and checks it
    await asyncio.sleep(0)
    pool._sweep()  # during the check: the emptied generation is dropped, the deque replaced
    gate.set()
    got = await t
    pool._sweep()
    live = [o for o in opener.opened if o.usable]
    assert pool.stats()["size"] == len(live) == 2, (pool.stats(), live)  # c and the fresh one
    assert {c, got} == set(live)
    more = [await pool.acquire() for _ in range(2)]  # room for two more, and no more than that
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.acquire(), 0.2)
    assert len([o for o in opener.opened if o.usable]) == 4 and len(more) == 2
    await pool.close()


async def test_good_check_hands_the_connection_out() -> None:
    opener = Opener()
    pool = Pool(opener, 2, 1.0, lifecycle=Lifecycle(check_after=0.01), check=_check)
    pool.start()
    c = await pool.acquire()
    pool.release(c)
    assert (await pool.acquire()) is c  # fresh: no check
    pool.release(c)
    await asyncio.sleep(0.05)
    assert (await pool.acquire()) is c
    assert pool.stats()["checks"] == 1 and pool.stats()["check_failures"] == 0
    pool.release(c)
    await pool.close()


async def test_minimum_opened_kept_and_refilled() -> None:
    opener = Opener()
    pool = Pool(opener, 5, 1.0, lifecycle=Lifecycle(min_size=3))
    await pool.warm(1.0)
    assert pool.stats()["idle"] == 3 and pool.stats()["prewarmed"] == 3
    for c in opener.opened:
        c.usable = False  # lost while idle
    await asyncio.sleep(REFILL_PERIOD_S + 0.1)
    s = pool.stats()
    assert s["idle"] == 3 and s["size"] == 3 and s["prewarmed"] == 6, s
    await pool.close()
    assert all(c.aborted or not c.usable for c in opener.opened)


async def test_minimum_with_connects_failing_backs_off() -> None:
    opener = Opener()
    opener.fail = True
    pool = Pool(opener, 5, 1.0, lifecycle=Lifecycle(min_size=3), backoff_initial=0.05, backoff_max=0.2)
    await pool.warm(0.5)
    await asyncio.sleep(0.6)
    errors = pool.stats()["errors"]
    # Sweeps every 0.25 s, connects backed off (one probe at a time): a handful, not three per sweep.
    assert 1 <= errors <= 6, errors
    opener.fail = False
    await asyncio.sleep(0.6)
    assert pool.stats()["idle"] == 3
    await pool.close()


async def test_close_stops_the_sweeper_and_closes_aged_connections() -> None:
    opener = Opener()
    pool = Pool(opener, 2, 1.0, lifecycle=Lifecycle(idle_timeout=10, check_after=0.01), check=_check)
    pool.start()
    c = await pool.acquire()
    pool.release(c)
    await asyncio.sleep(0.03)  # aged now
    await pool.close()
    assert c.aborted and pool.stats()["idle"] == 0


async def test_pool_made_in_a_running_loop_starts_its_lifecycle_itself() -> None:
    pool = Pool(Opener(), 2, 1.0, lifecycle=Lifecycle(idle_timeout=0.04))  # no start()
    c = await pool.acquire()
    pool.release(c)
    await asyncio.sleep(0.08)
    assert c.aborted and pool.stats()["closed_idle"] == 1
    await pool.close()
