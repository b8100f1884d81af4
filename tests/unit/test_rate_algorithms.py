"""The limiting algorithms with a controlled clock: exact counts at 0.5x, 1x and 2x the
limit, the fixed window's 2x across a boundary, the sliding estimate, GCRA's spacing."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.limit.algorithms import ALGORITHMS, Algorithm, FixedWindow, Gcra, Rate, SlidingWindow, parse_rate


def run(algo: Algorithm[Any], times: list[float]) -> list[bool]:
    state = algo.empty
    out = []
    for t in times:
        decision, state = algo.decide(state, t)
        out.append(decision.allowed)
    return out


def evenly(rate_per_s: float, seconds: float, start: float = 1000.0) -> list[float]:
    n = round(rate_per_s * seconds)
    return [start + i / rate_per_s for i in range(n)]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_steady_rates(name: str, factor: float) -> None:
    algo = ALGORITHMS[name](Rate(10, 1.0))
    # Start a hair after a window boundary so the windowed algorithms see whole windows.
    times = evenly(10 * factor, 10.0, start=1000.0001)
    allowed = sum(run(algo, times))
    expected = min(len(times), 100)
    assert abs(allowed - expected) <= 10, (allowed, expected)
    if factor < 1.0 or (factor == 1.0 and name != "sliding"):
        assert allowed == len(times)  # under the limit nothing is refused
    elif factor == 1.0:
        # Exactly at the limit the two-counter estimate counts the previous window's first
        # request as if still inside the last second: one refusal per window (10%), its
        # documented worst case for evenly spaced requests.
        assert allowed >= 0.9 * len(times)


def test_fixed_allows_twice_the_limit_across_a_boundary() -> None:
    algo = FixedWindow(Rate(10, 1.0))
    # 10 at the very end of one window, 10 at the very start of the next: 20 within 0.02 s.
    times = [1000.98 + i * 0.001 for i in range(10)] + [1001.0 + i * 0.001 for i in range(10)]
    assert sum(run(algo, times)) == 20
    # The sliding counter and GCRA refuse most of the second ten.
    assert sum(run(SlidingWindow(Rate(10, 1.0)), times)) <= 11
    assert sum(run(Gcra(Rate(10, 1.0)), times)) <= 11


def test_fixed_window_decisions() -> None:
    algo = FixedWindow(Rate(3, 1.0))
    state = algo.empty
    remaining = []
    for t in (5.1, 5.2, 5.3):
        d, state = algo.decide(state, t)
        remaining.append(d.remaining)
    assert remaining == [2, 1, 0]
    d, state = algo.decide(state, 5.75)
    assert not d.allowed and d.remaining == 0
    assert d.retry_after_s == pytest.approx(0.25) and d.reset_s == pytest.approx(0.25)
    d, state = algo.decide(state, 6.0)
    assert d.allowed and d.remaining == 2


def test_sliding_weights_the_previous_window() -> None:
    algo = SlidingWindow(Rate(10, 1.0))
    state = algo.add(algo.empty, 10.5, 10)  # 10 allowed in window 10
    # At 11.25, 75% of window 10 still overlaps: estimate 7.5, so 2 more fit (7.5 + 1 + 1 <= 10).
    d1, state = algo.decide(state, 11.25)
    d2, state = algo.decide(state, 11.25)
    d3, state = algo.decide(state, 11.25)
    assert (d1.allowed, d2.allowed, d3.allowed) == (True, True, False)
    assert d2.remaining == 0
    # Retry when the estimate 0.75*... falls to 9 - 2 = 7: prev weight 0.7 -> at 11.3.
    assert d3.retry_after_s == pytest.approx(0.05)
    d4, _ = algo.decide(state, 11.25 + d3.retry_after_s + 1e-6)
    assert d4.allowed


def test_sliding_full_current_window_waits_into_the_next() -> None:
    algo = SlidingWindow(Rate(4, 1.0))
    state = algo.add(algo.empty, 20.1, 4)
    d, state = algo.decide(state, 20.5)
    assert not d.allowed
    # Next window starts in 0.5 s with prev = 4; estimate 4*(1-e) <= 3 at e = 0.25.
    assert d.retry_after_s == pytest.approx(0.75)
    assert algo.decide(state, 20.5 + 0.75 + 1e-6)[0].allowed
    assert not algo.decide(state, 20.5 + 0.74)[0].allowed


def test_gcra_burst_then_spacing() -> None:
    algo = Gcra(Rate(10, 1.0, burst=3))
    state = algo.empty
    decisions = []
    for _ in range(4):
        d, state = algo.decide(state, 50.0)
        decisions.append(d)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].retry_after_s == pytest.approx(0.1)
    assert not algo.decide(state, 50.09)[0].allowed
    assert algo.decide(state, 50.1)[0].allowed


def test_gcra_default_burst_is_the_limit() -> None:
    algo = Gcra(Rate(5, 1.0))
    assert sum(run(algo, [7.0] * 8)) == 5


def test_add_counts_without_refusing() -> None:
    for name, cls in ALGORITHMS.items():
        algo = cls(Rate(2, 1.0))
        state = algo.add(algo.empty, 3.5, 5)
        d, _ = algo.decide(state, 3.6)
        assert not d.allowed, name


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/s", Rate(100, 1.0)),
        ("6000/min", Rate(6000, 60.0)),
        ("5/200ms", Rate(5, 0.2)),
        ("10/2s", Rate(10, 2.0)),
        ("100/s:burst=50", Rate(100, 1.0, 50)),
        ("1/h", Rate(1, 3600.0)),
        ("1/ms", Rate(1, 0.001)),
        ("1/3650d", Rate(1, 3650 * 86400.0)),
    ],
)
def test_parse_rate(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    "text",
    ["100", "x/s", "100/week", "0/s", "10/0s", "10/s:burst=0", "10/s:size=3", "1/0.0001ms", "1/0.5ms", "1/3651d"],
)
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(text)


# Redis' TIME in seconds since the epoch: a float that large carries about 2.4e-7 s of rounding.
EPOCH = 1_764_000_000.0


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("text", ["5/s:burst=2", "10/s", "100/s:burst=7", "4/200ms", "1/min:burst=3"])
def test_decisions_do_not_depend_on_the_clock_s_magnitude(name: str, text: str) -> None:
    # The same requests, at the same spacing, decide the same way and report the same
    # remaining quota on a clock near 0 as on the epoch clock the gateway uses, at exact
    # emission intervals and window fractions too, where rounding would flip the floor of
    # `remaining`. Times are whole microseconds, as Redis' TIME gives them, and the rates'
    # intervals too: there the scripts' arithmetic is exact, and so must this be.
    rate = parse_rate(text)
    algo = ALGORITHMS[name](rate)
    step = rate.period_s / rate.limit
    offsets = [0.0, 0.0, 0.0, step, step, 2 * step, 2.5 * step, 4 * step, 4 * step, 9 * step, 9 * step + 1e-3]
    offsets += [0.3 * rate.period_s + 1e-6 * k for k in range(3)] + [1.75 * rate.period_s, 3.5 * rate.period_s]
    offsets = sorted(round(o * 1e6) / 1e6 for o in offsets)
    seen = []
    for start in (100.0, EPOCH + 100.0):
        state = algo.empty
        out = []
        for offset in offsets:
            decision, state = algo.decide(state, start + offset)
            out.append((decision.allowed, decision.remaining))
        seen.append(out)
    assert seen[0] == seen[1]
