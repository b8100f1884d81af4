"""Prometheus exposition of the gateway's counters, read at scrape time.

Owns the mapping from /stats to metric families, and nothing on the request
path: every value already exists as a plain counter, so a scrape costs work
and a request costs none. Exposition is prometheus-client's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .histogram import cumulative

StatsSource = Callable[[], dict[str, Any]]

# /stats pool fields that are gauges (current values) and counters (totals).
_POOL_GAUGES = {
    "max": "Most connections the pool may hold",
    "size": "Connections open, including ones connecting",
    "idle": "Idle pooled connections",
    "in_use": "Connections checked out",
    "waiting": "Requests waiting for a connection",
    "in_flight": "Commands sent and not yet answered (shared connections)",
    "pending_keys": "Batched: distinct keys held for the next flush or a retry",
    "pending_increments": "Batched: increments held for the next flush or a retry",
    "last_flush_keys": "Batched: keys in the last confirmed flush",
}
_POOL_COUNTERS = {
    "created": "Redis connections opened",
    "errors": "Redis connects that failed",
    "discarded": "Connections closed as unsafe to reuse",
    "wait_timeouts": "Checkouts that gave up waiting",
    "fast_failures": "Checkouts refused without connecting while connects back off after failing",
    "disconnects": "Shared connections lost",
    "prewarmed": "Connections opened in the background for the pool's minimum",
    "closed_idle": "Connections closed (shared ones replaced) after the idle timeout",
    "expired": "Connections retired at the end of their lifetime (shared ones replaced)",
    "used_up": "Connections retired after their last allowed checkout",
    "checks": "Checks (PING) of idle connections before reuse",
    "check_failures": "Checks that failed (the connection was discarded)",
    "rotation_errors": "Replacements of shared connections that could not connect (the old one kept serving)",
    "flushes": "Batched: flushes confirmed",
    "flush_failures": "Batched: flushes that failed and were kept for retry",
    "duplicate_flushes": "Batched: resent flushes Redis had already applied",
    "flushed_increments": "Batched: increments confirmed through flushes",
    "overflow": "Batched: increments dropped because too many keys were held",
}


def _histogram(name: str, doc: str, mode: str, snapshot: dict[str, Any]) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=["mode"])
    h.add_metric([mode], cumulative(snapshot), snapshot["sum"])
    return h


class GatewayCollector(Collector):
    """Metric families from a /stats document: one gateway's, or the sum of its workers'."""

    def __init__(self, stats: StatsSource) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        mode = stats["mode"]
        requests = CounterMetricFamily("gateway_requests", "Requests by accounting outcome", labels=["mode", "outcome"])
        for outcome in ("counted", "deferred", "failed", "uncounted", "no_client_ip"):
            requests.add_metric([mode, outcome], stats["requests"][outcome])
        yield requests
        failures = CounterMetricFamily(
            "gateway_accounting_failures", "Failed increments by kind", labels=["mode", "kind"]
        )
        for kind, n in sorted(stats["failures"].items()):
            failures.add_metric([mode, kind], n)
        yield failures
        if stats.get("accounting_latency_s"):
            yield _histogram(
                "gateway_accounting_latency_seconds",
                "Time a request spent on its increment, failed ones included",
                mode,
                stats["accounting_latency_s"],
            )
        pool = stats["pool"] or {}
        for field, doc in _POOL_GAUGES.items():
            if isinstance(pool.get(field), (int, float)) and not isinstance(pool.get(field), bool):
                g = GaugeMetricFamily(f"gateway_redis_{field}", doc, labels=["mode"])
                g.add_metric([mode], pool[field])
                yield g
        for field, doc in _POOL_COUNTERS.items():
            if isinstance(pool.get(field), int):
                c = CounterMetricFamily(f"gateway_redis_{field}", doc, labels=["mode"])
                c.add_metric([mode], pool[field])
                yield c
        if isinstance(pool.get("last_flush_ms"), (int, float)):
            g = GaugeMetricFamily(
                "gateway_redis_last_flush_seconds", "Batched: latency of the last flush", labels=["mode"]
            )
            g.add_metric([mode], pool["last_flush_ms"] / 1000)
            yield g
        if pool.get("flush_keys"):
            yield _histogram("gateway_batch_flush_keys", "Batched: keys per confirmed flush", mode, pool["flush_keys"])
        if pool.get("flush_latency_s"):
            yield _histogram(
                "gateway_batch_flush_latency_seconds",
                "Batched: send to confirmation of each confirmed flush",
                mode,
                pool["flush_latency_s"],
            )
        limits = stats.get("limits")
        if limits:
            decided = CounterMetricFamily(
                "gateway_limit_requests", "Requests the rate limit decided, by decision", labels=["mode", "decision"]
            )
            decided.add_metric([mode, "allowed"], limits["allowed"])
            decided.add_metric([mode, "limited"], limits["limited"])
            yield decided
            g = GaugeMetricFamily(
                "gateway_limit_clients_limited", "Clients told to wait (429) whose wait has not ended", labels=["mode"]
            )
            g.add_metric([mode], limits["clients_limited"])
            yield g
        workers = stats.get("workers")
        if workers:
            yield GaugeMetricFamily(
                "gateway_workers", "Worker processes answering the supervisor", workers["answering"]
            )
            yield CounterMetricFamily("gateway_worker_restarts", "Workers restarted after exiting", workers["restarts"])
            yield GaugeMetricFamily(
                "gateway_workers_unresponsive",
                "Workers whose admin socket does not answer the supervisor",
                workers.get("unresponsive", 0),
            )
        conns = stats.get("connections") or {}
        if conns:
            yield GaugeMetricFamily("gateway_client_connections", "Client connections open", conns["open"])
            yield CounterMetricFamily(
                "gateway_client_head_timeouts", "Client connections closed with 408", conns["head_timeouts"]
            )
            yield CounterMetricFamily(
                "gateway_client_rejected", "Client connections refused at the limit", conns["rejected"]
            )
        upstream = stats.get("upstream")
        if upstream:
            yield from _upstream_metrics(upstream)


def _upstream_metrics(upstream: dict[str, Any]) -> Iterator[Metric]:
    """The proxy's per-server families (what HAProxy's stats page shows per server)."""
    servers = upstream["servers"]
    up = GaugeMetricFamily("gateway_upstream_up", "1 if the server gets traffic (up, not ejected)", labels=["server"])
    conns = GaugeMetricFamily(
        "gateway_upstream_connections", "Upstream connections by state", labels=["server", "state"]
    )
    queue = GaugeMetricFamily("gateway_upstream_queue", "Requests waiting for a connection", labels=["server"])
    requests = CounterMetricFamily("gateway_upstream_requests", "Requests sent to the server", labels=["server"])
    retries = CounterMetricFamily("gateway_upstream_retries", "Requests retried after this server", labels=["server"])
    errors = CounterMetricFamily("gateway_upstream_errors", "Failed exchanges by kind", labels=["server", "kind"])
    responses = CounterMetricFamily(
        "gateway_upstream_responses", "Responses by status class", labels=["server", "class"]
    )
    latency = HistogramMetricFamily(
        "gateway_upstream_latency_seconds", "Request sent to response head", labels=["server"]
    )
    for name, s in sorted(servers.items()):
        up.add_metric([name], 1 if s["state"] == "up" else 0)
        for state in ("idle", "in_use"):
            conns.add_metric([name, state], s["connections"][state])
        queue.add_metric([name], s["queue"])
        requests.add_metric([name], s["requests"])
        retries.add_metric([name], s["retries"])
        for kind, n in sorted(s["errors"].items()):
            errors.add_metric([name, kind], n)
        for klass, n in sorted(s["responses"].items()):
            responses.add_metric([name, klass], n)
        snap = s["latency_s"]
        latency.add_metric([name], cumulative(snap), snap["sum"])
    yield from (up, conns, queue, requests, retries, errors, responses, latency)
    no_server = CounterMetricFamily("gateway_upstream_no_server", "Requests answered 503: no server available")
    no_server.add_metric([], upstream["errors"].get("no_server", 0))
    yield no_server


def registry_for(stats: StatsSource) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(stats))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
