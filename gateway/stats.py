"""Adding up the /stats documents of several workers into one. No I/O.

Counters and gauges add up: requests, failures by kind, connections open,
pool `max` (so the sum is the Redis connection budget of the whole gateway,
workers x pool size). Histograms add bucket by bucket. A few fields are not
additive and say so in `_COMBINE`: uptime is the oldest worker's, a "last ..."
value the largest, a flag is raised if any worker raises it, and a cluster's
master count and slot coverage are each worker's view (the largest, the least). Text that differs
between workers (it should not: they share one Config) becomes a sorted list
rather than being silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_COMBINE: dict[str, Callable[[list[Any]], Any]] = {
    "uptime_s": max,
    "last_flush_ms": max,
    "last_flush_keys": max,
    # Each worker maps the same cluster: the view, not a sum; the least complete map shows.
    "masters": max,
    "slots_mapped": min,
}


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document with the shape of each input, values combined field by field."""
    return _merge_dicts([d for d in docs if d is not None])


def _merge_dicts(docs: list[dict[str, Any]]) -> dict[str, Any]:
    keys: list[str] = []
    for doc in docs:
        keys.extend(k for k in doc if k not in keys)
    out = {}
    for key in keys:
        values = [doc[key] for doc in docs if doc.get(key) is not None]
        out[key] = _merge_values(key, values)
    return out


def _merge_values(key: str, values: list[Any]) -> Any:
    if not values:
        return None
    if key in _COMBINE:
        return _COMBINE[key](values)
    first = values[0]
    if isinstance(first, bool):
        return any(values)
    if isinstance(first, (int, float)):
        total = sum(v for v in values if isinstance(v, (int, float)))
        return round(total, 6) if isinstance(total, float) else total
    if isinstance(first, dict):
        dicts = [v for v in values if isinstance(v, dict)]
        if "bounds" in first and "counts" in first:
            return _merge_histograms(dicts)
        return _merge_dicts(dicts)
    distinct = sorted({str(v) for v in values})
    return first if len(distinct) == 1 else distinct


def _merge_histograms(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    bounds = snaps[0]["bounds"]
    counts = [0] * len(snaps[0]["counts"])
    total = 0.0
    for snap in snaps:
        if snap["bounds"] != bounds:
            raise ValueError("histograms with different buckets cannot be added")
        counts = [a + b for a, b in zip(counts, snap["counts"], strict=True)]
        total += snap["sum"]
    return {"bounds": bounds, "counts": counts, "sum": total}
