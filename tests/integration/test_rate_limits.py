"""--limit against a real redis-server: decisions at 0.5x, 1x and 2x the limit per
algorithm, the fixed window's 2x across a boundary, the response fields on both front
ends, every Redis mode, shared limits across processes, failures and the admin views.

Clients are told apart by X-Forwarded-For (127.0.0.1 is a trusted proxy), so one test
can be many clients. Windows are short (200 ms to 1 s) to keep the suite fast; the
window boundaries come from Redis' clock (`TIME`), which is the clock the scripts use.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from gateway.backends import BACKENDS
from gateway.config import Config, ConfigError
from gateway.limit.algorithms import Rate, parse_rate

from ..helpers import RedisServer, free_port, http_get, make_config, running_gateway
from .test_front_ends import _open, _read_response

TRUSTED = (ipaddress.ip_network("127.0.0.1/32"),)
ALGORITHMS = ["fixed", "sliding", "gcra"]


def _cfg(redis: RedisServer, limit: str, algorithm: str = "sliding", mode: str = "raw", **kw: Any) -> Config:
    return make_config(
        redis.url, mode, limit=parse_rate(limit), limit_algorithm=algorithm, trusted_proxies=TRUSTED, **kw
    )


class Client:
    """One keep-alive connection sending as `ip`; records each request's send time and status."""

    def __init__(self, base: str, ip: str) -> None:
        self.base, self.ip = base, ip
        self.sent: list[tuple[float, int]] = []
        self.last: tuple[int, dict[str, str], bytes] | None = None

    async def __aenter__(self) -> Client:
        self.reader, self.writer = await _open(self.base)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def get(self, path: str = "/x") -> int:
        started = time.time()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {self.ip}\r\n\r\n".encode())
        self.last = await _read_response(self.reader)
        self.sent.append((started, self.last[0]))
        return self.last[0]

    async def paced(self, rate_per_s: float, seconds: float) -> None:
        """Requests at `rate_per_s` for `seconds`, one at a time (late ones are not made up twice)."""
        start = time.monotonic()
        for i in range(round(rate_per_s * seconds)):
            delay = start + i / rate_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.get()

    def allowed(self) -> int:
        return sum(1 for _, status in self.sent if status != 429)


def sliding_log(times: list[float], rate: Rate) -> int:
    """How many of requests at `times` an exact sliding log would allow: at most `limit` allowed
    requests in any `period_s`."""
    log: deque[float] = deque()
    allowed = 0
    for t in times:
        while log and log[0] <= t - rate.period_s:
            log.popleft()
        if len(log) < rate.limit:
            log.append(t)
            allowed += 1
    return allowed


def redis_time(redis: RedisServer) -> float:
    sec, usec = redis.client().time()
    return float(sec) + usec / 1e6


async def sleep_until_window(redis: RedisServer, period: float, offset: float) -> None:
    """Until `offset` seconds after the next window boundary on Redis' clock (offset may be < 0)."""
    now = redis_time(redis)
    boundary = math.floor(now / period) * period + period
    while boundary + offset < now + 0.005:
        boundary += period
    await asyncio.sleep(boundary + offset - now)


# -- decisions per algorithm --------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_half_and_full_limit_all_allowed_double_gets_the_limit(redis_server: RedisServer, algorithm: str) -> None:
    limit = 10
    async with running_gateway(_cfg(redis_server, f"{limit}/s", algorithm)) as (_gw, base):
        # Start just after a boundary: every request below falls in one fixed window.
        await sleep_until_window(redis_server, 1.0, 0.01)
        for ip, n in (("10.0.0.1", limit // 2), ("10.0.0.2", limit), ("10.0.0.3", 2 * limit)):
            async with Client(base, ip) as c:
                for _ in range(n):
                    await c.get()
                assert c.allowed() == min(n, limit), (ip, c.sent)
                # The counter counts every request, limited or not, as without a limit.
                assert int(redis_server.client().get(f"ip:{ip}")) == n


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
async def test_paced_rates_against_an_exact_sliding_log(
    redis_server: RedisServer, algorithm: str, factor: float
) -> None:
    """Requests paced at factor x 50/s for 1 s (5 windows of 200 ms) versus what an exact sliding
    log allows for the same send times, within each algorithm's documented bound."""
    rate = Rate(10, 0.2)
    async with running_gateway(_cfg(redis_server, "10/200ms", algorithm)) as (_gw, base):
        async with Client(base, "10.1.0.1") as c:
            await c.paced(factor * rate.limit / rate.period_s, 1.0)
    exact = sliding_log([t for t, _ in c.sent], rate)
    allowed = c.allowed()
    n = len(c.sent)
    if factor == 0.5:
        assert allowed == n  # well under the limit nothing is refused
    windows = 1.0 / rate.period_s
    if algorithm == "fixed":
        # Never more than limit per aligned window: the log's count, give or take a window's worth.
        assert allowed <= rate.limit * (windows + 1) and allowed >= exact - rate.limit, (allowed, exact)
    elif algorithm == "sliding":
        assert abs(allowed - exact) <= 0.1 * n + 2, (allowed, exact)
    else:
        # GCRA allows its burst on top of the steady rate: at most `burst` more than the log.
        assert exact - 0.1 * n - 2 <= allowed <= exact + rate.burst, (allowed, exact)


async def test_fixed_window_allows_twice_the_limit_across_a_boundary(redis_server: RedisServer) -> None:
    limit, period = 10, 1.0
    outcomes = {}
    for algorithm in ("fixed", "sliding"):
        redis_server.client().flushall()
        async with running_gateway(_cfg(redis_server, f"{limit}/s", algorithm)) as (_gw, base):
            async with Client(base, "10.2.0.1") as c:
                await sleep_until_window(redis_server, period, -0.08)
                for _ in range(limit):
                    await c.get()
                await sleep_until_window(redis_server, period, 0.01)
                for _ in range(limit):
                    await c.get()
                span = c.sent[-1][0] - c.sent[0][0]
                outcomes[algorithm] = c.allowed()
        assert span < period / 2  # all of them well inside one period
    # Fixed: 2 x limit within a fraction of a second. Sliding: the previous window still weighs.
    assert outcomes["fixed"] == 2 * limit
    assert outcomes["sliding"] <= limit + 1


# -- response fields, on both front ends -----------------------------------------------


async def test_429_fields_and_limit_headers(redis_server: RedisServer, http: str) -> None:
    cfg = _cfg(redis_server, "3/10s", "fixed", http=http, limit_headers=True)
    async with running_gateway(cfg) as (_gw, base):
        async with Client(base, "10.3.0.1") as c:
            if redis_time(redis_server) % 10 > 9:  # not across a boundary of the fixed window
                await sleep_until_window(redis_server, 10.0, 0.02)
            seen = []
            for _ in range(4):
                await c.get()
                assert c.last is not None
                seen.append(c.last)
    remaining = [h["ratelimit"] for s, h, _ in seen[:3]]
    assert [r.split(";")[1] for r in remaining] == ["r=2", "r=1", "r=0"]
    for status, headers, _ in seen[:3]:
        assert status == 302 and headers["ratelimit-policy"] == '"default";q=3;w=10'
    status, headers, body = seen[3]
    assert status == 429 and body == b"too many requests\n"
    assert headers["ratelimit-policy"] == '"default";q=3;w=10'
    retry = int(headers["retry-after"])
    assert 1 <= retry <= 10
    assert headers["ratelimit"] == f'"default";r=0;t={retry}'


async def test_without_limit_headers_allowed_responses_are_unchanged(redis_server: RedisServer, http: str) -> None:
    async with running_gateway(_cfg(redis_server, "1/10s", "gcra", http=http)) as (_gw, base):
        async with Client(base, "10.3.0.2") as c:
            assert await c.get() == 302
            assert c.last is not None and "ratelimit" not in c.last[1]
            assert await c.get() == 429
            assert "ratelimit" in c.last[1] and "retry-after" in c.last[1]


# -- every mode --------------------------------------------------------------------


async def test_every_redis_mode_limits(redis_server: RedisServer, redis_mode: str) -> None:
    async with running_gateway(_cfg(redis_server, "5/5s", "gcra", redis_mode)) as (gw, base):
        async with Client(base, "10.4.0.1") as c:
            for _ in range(8):
                await c.get()
        assert [s for _, s in c.sent] == [302] * 5 + [429] * 3
        limits = gw.stats()["limits"]
        assert (limits["allowed"], limits["limited"], limits["clients_limited"]) == (5, 3, 1)
    assert int(redis_server.client().get("ip:10.4.0.1")) == 8  # batched: flushed at close


async def test_batched_without_ack_limits_in_line(redis_server: RedisServer) -> None:
    async with running_gateway(_cfg(redis_server, "5/5s", "gcra", "batched", batch_ack="none")) as (gw, base):
        async with Client(base, "10.4.0.9") as c:
            for _ in range(8):
                await c.get()
        assert [s for _, s in c.sent] == [302] * 5 + [429] * 3
        assert gw.pipeline.via_coroutine == 0  # decided and added without waiting
    assert int(redis_server.client().get("ip:10.4.0.9")) == 8


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_every_redis_mode_reports_the_same_remaining_quota(
    redis_server: RedisServer, redis_mode: str, algorithm: str
) -> None:
    # batched decides in the process on Redis' clock, the other modes in Redis' script: the
    # same requests must say the same `r=`. A 200 ms interval is no whole number of binary
    # fractions of a second, which is where seconds since the epoch used to round `r` down.
    cfg = _cfg(redis_server, "5/s:burst=2" if algorithm == "gcra" else "5/s", algorithm, redis_mode,
               limit_headers=True)  # fmt: skip
    ip = f"10.4.{1 + ALGORITHMS.index(algorithm)}.{1 + sorted(BACKENDS).index(redis_mode)}"
    async with running_gateway(cfg) as (_gw, base):
        async with Client(base, ip) as c:
            if redis_time(redis_server) % 1 > 0.8:  # not across a boundary of a window
                await sleep_until_window(redis_server, 1.0, 0.02)
            seen = []
            for _ in range(2):
                await c.get()
                assert c.last is not None and c.last[0] == 302
                seen.append(c.last[1]["ratelimit"].split(";")[1])
    assert seen == (["r=1", "r=0"] if algorithm == "gcra" else ["r=4", "r=3"])


@pytest.mark.parametrize("broken", ["wrong type", "not a number"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_an_unreadable_limit_state_fails_that_client_only(
    redis_server: RedisServer, redis_mode: str, algorithm: str, broken: str
) -> None:
    # One client's limit key holds another type, or a field that is no number. The batched flush
    # script used to abort there: the clients before it in the flush were applied, the sequence
    # marker was not, and the batch was resent every second and applied again (one request
    # counted 5, 6, 7, ... times), while the clients after it were never counted. The decision
    # script counted the request before failing on its limit state.
    r = redis_server.client()
    net = 1 + 2 * ALGORITHMS.index(algorithm) + (broken == "wrong type")
    good, bad, later = (f"10.6.{net}.{1 + sorted(BACKENDS).index(redis_mode) * 3 + k}" for k in range(3))
    lkey = f"{{ip:{bad}}}:limit:{algorithm}"
    if broken == "wrong type":
        r.hset(lkey, "w", "1") if algorithm == "gcra" else r.set(lkey, "1")
    elif algorithm == "gcra":
        r.set(lkey, "soon")
    else:
        r.hset(lkey, mapping={"w": "x", "c": "1"})
    cfg = _cfg(redis_server, "100/min", algorithm, redis_mode, batch_window_ms=50.0)
    async with running_gateway(cfg) as (gw, base):
        async with Client(base, good) as a, Client(base, bad) as b, Client(base, later) as c:
            await asyncio.gather(a.get(), b.get())  # in one flush, for batched
            for _ in range(5):
                await c.get()
            await asyncio.sleep(0.3)  # a resend would have come by now, for batched
            assert [s for _, s in a.sent + b.sent + c.sent] == [302] * 7  # fail open for `bad`
            failures = gw.stats()["failures"]
    assert failures == {"redis:WRONGTYPE" if broken == "wrong type" else "redis:ERR": 1}, failures
    assert int(r.get(f"ip:{good}")) == 1 and int(r.get(f"ip:{later}")) == 5
    assert r.get(f"ip:{bad}") is None  # not counted: its request failed


async def test_a_request_redis_did_not_count_uses_no_quota(redis_server: RedisServer, redis_mode: str) -> None:
    # The client's counter is a list: INCRBY fails. The decision script then stores no limit
    # state; the batched flush script stored the allowed requests' quota all the same.
    r = redis_server.client()
    ip = f"10.6.9.{1 + sorted(BACKENDS).index(redis_mode)}"
    r.rpush(f"ip:{ip}", "x")
    async with running_gateway(_cfg(redis_server, "3/min", "fixed", redis_mode)) as (gw, base):
        async with Client(base, ip) as c:
            for _ in range(5):
                await c.get()
        assert gw.stats()["failures"] == {"redis:WRONGTYPE": 5}
    assert r.exists(f"{{ip:{ip}}}:limit:fixed") == 0


async def test_script_cache_flushed_is_reloaded(redis_server: RedisServer) -> None:
    async with running_gateway(_cfg(redis_server, "5/5s", "sliding", "multiplexed")) as (gw, base):
        async with Client(base, "10.5.0.1") as c:
            assert await c.get() == 302
            redis_server.client().script_flush()
            assert await c.get() == 302
        assert not gw.pipeline.failures


@pytest.mark.parametrize(("policy", "status"), [("allow", 302), ("deny", 503)])
async def test_no_decision_without_redis_takes_the_failure_policy(policy: str, status: int) -> None:
    cfg = make_config(
        f"redis://127.0.0.1:{free_port()}/0", "raw", limit=parse_rate("5/s"), on_redis_error=policy,
        connect_timeout_ms=100.0,
    )  # fmt: skip
    async with running_gateway(cfg) as (gw, base):
        async with Client(base, "10.5.1.1") as c:
            for _ in range(3):
                assert await c.get() == status
        assert gw.stats()["limits"]["allowed"] == 0 and sum(gw.pipeline.failures.values()) == 3


@pytest.mark.parametrize("pmode", ["raw", "multiplexed"])
async def test_redis_paused_then_back(own_redis: RedisServer, pmode: str) -> None:
    """A Redis that stops answering: each request waits at most the command timeout and takes the
    failure policy; nothing is retried, no connection stays checked out, and once Redis answers
    again the limit is enforced again (its state survived)."""
    cfg = _cfg(own_redis, "2/10s", "gcra", pmode, command_timeout_ms=100.0, pool_size=4)
    async with running_gateway(cfg) as (gw, base):
        async with Client(base, "10.5.2.1") as c:
            assert [await c.get() for _ in range(2)] == [302, 302]
            own_redis.pause()
            try:
                started = time.monotonic()
                assert [await c.get() for _ in range(3)] == [302, 302, 302]  # allow: let through
                assert time.monotonic() - started < 3 * 0.1 + 1.0
            finally:
                own_redis.resume()
            await asyncio.sleep(0.2)
            assert await c.get() == 429  # the two allowed before the pause still count
        stats = gw.stats()
    assert sum(stats["failures"].values()) == 3 and stats["limits"]["allowed"] == 2
    if pmode == "raw":
        assert stats["pool"]["in_use"] == 0


async def test_stats_and_metrics(redis_server: RedisServer) -> None:
    cfg = _cfg(redis_server, "2/10s", "fixed", admin_listen=("127.0.0.1", 0))
    async with running_gateway(cfg) as (gw, base):
        async with Client(base, "10.6.0.1") as c:
            for _ in range(5):
                await c.get()
        from gateway.metrics import exposition

        text = exposition(gw._registry).decode()
    assert 'gateway_limit_requests_total{decision="allowed",mode="raw"} 2.0' in text
    assert 'gateway_limit_requests_total{decision="limited",mode="raw"} 3.0' in text
    assert 'gateway_limit_clients_limited{mode="raw"} 1.0' in text


def test_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="mode off never talks to Redis"):
        Config(mode="off", limit=parse_rate("5/s"))
    with pytest.raises(ConfigError, match="gcra only"):
        Config(limit=parse_rate("5/s:burst=2"))
    with pytest.raises(ConfigError, match="hash tag"):
        Config(limit=parse_rate("5/s"), key_prefix="ip}")
    with pytest.raises(ConfigError, match="needs --limit"):
        Config(limit_headers=True)
    Config(limit=parse_rate("5/s"), key_prefix="{ip}:")


# -- shared limits ------------------------------------------------------------------


@contextmanager
def _gateways(redis: RedisServer, count: int, *extra: str) -> Iterator[list[str]]:
    """`count` gateway processes against `redis`; their base URLs (with --workers, one URL)."""
    with ExitStack() as stack:
        bases = []
        for _ in range(count):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{port}", "--admin-listen", "off",
                 "--redis-url", redis.url, "--trusted-proxy", "127.0.0.1", *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            stack.callback(_stop, proc)
            bases.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        for base in bases:
            while True:
                try:
                    http_get(base + "/ok")
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        yield bases


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    _out, err = proc.communicate(timeout=20)
    assert "Traceback" not in err, err


async def _spread(bases: list[str], ip: str, clients_per_base: int, rate_per_s: float, seconds: float) -> list[Client]:
    clients = [Client(b, ip) for b in bases for _ in range(clients_per_base)]
    for c in clients:
        await c.__aenter__()
    try:
        await asyncio.gather(*(c.paced(rate_per_s / len(clients), seconds) for c in clients))
    finally:
        for c in clients:
            await c.__aexit__()
    return clients


@pytest.mark.parametrize("algorithm", ["sliding", "gcra"])
async def test_two_processes_share_one_limit(own_redis: RedisServer, algorithm: str) -> None:
    rate = Rate(20, 0.5)
    with _gateways(own_redis, 2, "--mode", "raw", "--limit", "20/500ms", "--limit-algorithm", algorithm) as bases:
        clients = await _spread(bases, "10.7.0.1", 2, 2 * rate.limit / rate.period_s, 1.5)
    times = sorted(t for c in clients for t, _ in c.sent)
    allowed = sum(c.allowed() for c in clients)
    exact = sliding_log(times, rate)
    # One Redis decides for both: the combined count is what one process would allow.
    assert allowed <= exact + (rate.burst if algorithm == "gcra" else 0.1 * len(times) + 2), (allowed, exact)
    assert allowed >= exact - 0.1 * len(times) - 2, (allowed, exact)
    assert all(c.allowed() > 0 for c in clients)  # both processes took part


async def test_workers_share_one_limit(own_redis: RedisServer) -> None:
    rate = Rate(20, 0.5)
    with _gateways(own_redis, 1, "--workers", "2", "--mode", "multiplexed", "--limit", "20/500ms") as bases:
        clients = await _spread(bases, "10.8.0.1", 4, 2 * rate.limit / rate.period_s, 1.5)
    times = sorted(t for c in clients for t, _ in c.sent)
    allowed = sum(c.allowed() for c in clients)
    exact = sliding_log(times, rate)
    assert abs(allowed - exact) <= 0.1 * len(times) + 2, (allowed, exact)


async def test_batched_processes_overshoot_is_bounded(own_redis: RedisServer) -> None:
    """Two batched processes decide locally between flushes; the flush corrects them, so the
    combined excess over the sliding log stays within a window's quota per process."""
    rate = Rate(20, 0.5)
    with _gateways(own_redis, 2, "--mode", "batched", "--limit", "20/500ms", "--batch-window-ms", "20") as bases:
        clients = await _spread(bases, "10.9.0.1", 2, 2 * rate.limit / rate.period_s, 1.5)
    times = sorted(t for c in clients for t, _ in c.sent)
    allowed = sum(c.allowed() for c in clients)
    exact = sliding_log(times, rate)
    assert exact - 0.1 * len(times) - 2 <= allowed <= exact + rate.limit, (allowed, exact)


def test_stats_json_of_a_limited_gateway(redis_server: RedisServer) -> None:
    admin, port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--redis-url", redis_server.url, "--limit", "1/10s", "--limit-algorithm", "gcra"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                http_get(f"http://127.0.0.1:{admin}/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        statuses = [http_get(f"http://127.0.0.1:{port}/x")[0] for _ in range(3)]
        doc = json.loads(http_get(f"http://127.0.0.1:{admin}/stats")[1])
    finally:
        _stop(proc)
    assert statuses == [302, 429, 429]
    assert doc["limits"] == {
        "algorithm": "gcra", "rate": "1/10s:burst=1", "allowed": 1, "limited": 2, "clients_limited": 1,
    }  # fmt: skip


# -- the HAProxy reference ------------------------------------------------------------


def test_haproxy_limited_listener_is_per_process(own_redis: RedisServer) -> None:
    """The stick table limits one HAProxy process; a second one allows the client again."""
    import shutil

    from ..helpers import HAProxyReference

    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    refs = [
        HAProxyReference(own_redis.port, HAPROXY_LIMIT_RATE="3", HAPROXY_LIMIT_PERIOD="10s").start() for _ in range(2)
    ]
    try:
        first = [http_get(refs[0].url("raw-limited") + "/x")[0] for _ in range(5)]
        second = [http_get(refs[1].url("raw-limited") + "/x")[0] for _ in range(5)]
    finally:
        for ref in refs:
            ref.stop()
    assert first == [302, 302, 302, 429, 429]
    assert second == first  # its own table: the same client gets the full rate again
    assert int(own_redis.client().get("ip:127.0.0.1")) == 10  # every request counted, refused ones too
