"""Adding up workers' /stats documents."""

from __future__ import annotations

import pytest

from gateway.stats import merge


def _doc(total: int, failures: dict[str, int], uptime: float, failing: bool, hist: list[int]) -> dict[str, object]:
    return {
        "mode": "batched",
        "uptime_s": uptime,
        "requests": {"total": total, "counted": total - sum(failures.values())},
        "failures": failures,
        "accounting_latency_s": {"bounds": [0.001, 0.01], "counts": hist, "sum": 0.5},
        "pool": {"max": 20, "failing": failing, "last_flush_ms": uptime, "dedicated": {"idle": 1}},
        "connections": None,
    }


def test_counters_add_and_the_rest_combines_by_meaning() -> None:
    a = _doc(10, {"timeout": 2}, 5.0, False, [1, 2, 3])
    b = _doc(7, {"timeout": 1, "redis:ERR": 4}, 9.0, True, [0, 5, 1])
    doc = merge([a, b])
    assert doc["mode"] == "batched"
    assert doc["requests"] == {"total": 17, "counted": 10}
    assert doc["failures"] == {"timeout": 3, "redis:ERR": 4}
    assert doc["uptime_s"] == 9.0  # the oldest worker's, not a sum
    assert doc["pool"] == {"max": 40, "failing": True, "last_flush_ms": 9.0, "dedicated": {"idle": 2}}
    assert doc["accounting_latency_s"] == {"bounds": [0.001, 0.01], "counts": [1, 7, 4], "sum": 1.0}
    assert doc["connections"] is None


def test_differing_text_is_kept_not_dropped() -> None:
    assert merge([{"mode": "raw"}, {"mode": "batched"}])["mode"] == ["batched", "raw"]


def test_no_documents() -> None:
    assert merge([]) == {}


def test_histograms_with_other_buckets_refuse() -> None:
    with pytest.raises(ValueError):
        merge([{"h": {"bounds": [1], "counts": [0, 0], "sum": 0}}, {"h": {"bounds": [2], "counts": [0, 0], "sum": 0}}])


def test_cluster_view_is_not_summed() -> None:
    a = {"pool": {"cluster": {"masters": 3, "slots_mapped": 16384, "moved": 2}}}
    b = {"pool": {"cluster": {"masters": 3, "slots_mapped": 16000, "moved": 1}}}
    assert merge([a, b])["pool"]["cluster"] == {"masters": 3, "slots_mapped": 16000, "moved": 3}
