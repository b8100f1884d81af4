"""/metrics in Prometheus text format, and the optional access log."""

from __future__ import annotations

import ipaddress
import logging
import re

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..helpers import RedisServer, free_port, make_config, running_gateway


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize("metrics_mode", ["raw", "batched"])
async def test_metrics_reflect_stats(metrics_mode: str, redis_server: RedisServer) -> None:
    redis_server.client().lpush("ip:198.51.100.1", "x")  # a key of the wrong type: a failure kind
    admin = ("127.0.0.1", free_port())
    trust = (ipaddress.ip_network("127.0.0.1/32"),)
    cfg = make_config(redis_server.url, metrics_mode, admin_listen=admin, trusted_proxies=trust)
    async with running_gateway(cfg) as (_gw, base), aiohttp.ClientSession() as s:
        for _ in range(7):
            async with s.get(base + "/", allow_redirects=False) as r:
                assert r.status == 302
        for _ in range(3):  # counted under the wrong-type key
            async with s.get(base + "/", allow_redirects=False, headers={"X-Forwarded-For": "198.51.100.1"}) as r:
                assert r.status == 302
        async with s.get(f"http://{admin[0]}:{admin[1]}/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    samples = _samples(text)
    mode = (("mode", metrics_mode),)
    assert samples[("gateway_requests_total", (*mode, ("outcome", "counted")))] == 7
    assert samples[("gateway_requests_total", (*mode, ("outcome", "failed")))] == 3
    assert samples[("gateway_accounting_failures_total", (("kind", "redis:WRONGTYPE"), *mode))] == 3
    assert samples[("gateway_redis_max", mode)] == (20 if metrics_mode == "raw" else 1)
    assert samples[("gateway_redis_created_total", mode)] >= 1
    # Every increment, failed ones included, is one latency observation.
    assert samples[("gateway_accounting_latency_seconds_count", mode)] == 10
    assert samples[("gateway_accounting_latency_seconds_bucket", (("le", "+Inf"), *mode))] == 10
    assert 0 < samples[("gateway_accounting_latency_seconds_sum", mode)] < 10
    buckets = sorted(
        (float(labels[0][1]), v)
        for (name, labels), v in samples.items()
        if name == "gateway_accounting_latency_seconds_bucket"
    )
    assert [v for _le, v in buckets] == sorted(v for _le, v in buckets)  # cumulative
    if metrics_mode == "batched":
        assert samples[("gateway_redis_flushes_total", mode)] >= 1
        assert ("gateway_redis_pending_increments", mode) in samples
        flushes = samples[("gateway_redis_flushes_total", mode)]
        assert samples[("gateway_batch_flush_keys_count", mode)] == flushes
        # Sequential requests: each flush held one key.
        assert samples[("gateway_batch_flush_keys_sum", mode)] == flushes
        assert samples[("gateway_batch_flush_latency_seconds_count", mode)] == flushes
    assert samples[("gateway_client_connections", ())] >= 1


async def test_access_log_combined(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(redis_server.url, "raw", access_log="combined")
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        async with running_gateway(cfg) as (_gw, base), aiohttp.ClientSession() as s:
            async with s.get(base + "/some/path?x=1", allow_redirects=False, headers={"User-Agent": "probe/1"}) as r:
                assert r.status == 302
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 1
    # aiohttp's byte count (%b) includes the response headers.
    assert re.fullmatch(r'127\.0\.0\.1 - - \[[^]]+\] "GET /some/path\?x=1 HTTP/1\.1" 302 \d+ "-" "probe/1"', lines[0])


async def test_access_log_off_by_default(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        async with running_gateway(make_config(redis_server.url, "raw")) as (_gw, base), aiohttp.ClientSession() as s:
            async with s.get(base + "/", allow_redirects=False) as r:
                assert r.status == 302
    assert not [r for r in caplog.records if r.name.startswith("aiohttp.access") or r.name == "gateway.access"]
