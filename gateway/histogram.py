"""A fixed-bucket histogram cheap enough for the request path, and mergeable.

prometheus-client's Histogram takes a lock and walks its buckets on every
observation; this one is a bisect and two additions. Its snapshot is plain data
(bounds, per-bucket counts, sum) so that the /stats of several workers can be
added up and then exposed as one Prometheus histogram. No I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Seconds: 50 µs (a batched answer on an idle loop) to 2.5 s (past every timeout default).
LATENCY_BOUNDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Keys per batched flush.
SIZE_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = bounds
        # One count per bound (value <= bound, not cumulative) plus the +Inf overflow.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, value: float, count: int) -> None:
        """`count` observations of one value (the requests a batched flush answers together)."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def snapshot(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


def cumulative(snapshot: dict[str, Any]) -> list[tuple[str, int]]:
    """Prometheus buckets (`le`, cumulative count), ending with +Inf."""
    out = []
    total = 0
    for bound, n in zip([*snapshot["bounds"], float("inf")], snapshot["counts"], strict=True):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return out
