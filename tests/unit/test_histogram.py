"""The request-path histogram: bucket placement and Prometheus buckets."""

from __future__ import annotations

import pytest

from gateway.histogram import Histogram, cumulative


def test_values_land_in_the_first_bucket_they_fit() -> None:
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.5, 1.0, 1.5, 2.0, 4.9, 5.0, 7.0, 100.0):
        h.observe(v)
    assert h.counts == [2, 2, 2, 2]  # <=1, <=2, <=5, +Inf
    snap = h.snapshot()
    assert snap["sum"] == pytest.approx(121.9)
    assert cumulative(snap) == [("1.0", 2), ("2.0", 4), ("5.0", 6), ("+Inf", 8)]


def test_snapshot_is_a_copy() -> None:
    h = Histogram((1.0,))
    snap = h.snapshot()
    h.observe(0.1)
    assert snap["counts"] == [0, 0]


def test_bounds_must_increase() -> None:
    with pytest.raises(ValueError):
        Histogram((2.0, 1.0))
