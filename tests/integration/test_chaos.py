"""Fault scenarios (loadtest/chaos.py) as assertions: real redis-server, real gateway."""

from __future__ import annotations

import pytest

from loadtest import chaos

ALL = chaos.ALL_MODES


@pytest.mark.parametrize("fault_mode", ALL)
async def test_redis_paused(fault_mode: str) -> None:
    out = await chaos.paused(fault_mode)
    # Every request answered with the allow policy, none refused, none lost by the client.
    assert out.answered == out.sent and out.status_5xx == 0 and out.other_status == 0, out
    # Bounded by pool wait + connect + command timeouts (1 + 0.5 + 0.5 s), with slack for a loaded machine.
    assert out.max_ms < 3000, out
    # Counting again within 1 s of SIGCONT.
    assert out.recovery_s is not None and out.recovery_s <= 1.0, out
    assert out.mismatches == 0, out
    if fault_mode == "batched":
        assert out.drift == 0, out  # idempotent flushes: nothing lost, nothing doubled
        assert out.max_ms < 1500, out  # a request never waits for the outage to end
    else:
        # Commands that timed out may still have run when Redis resumed: applied, unconfirmed.
        assert 0 <= out.drift <= out.failures.get("timeout", 0) + out.failures.get("connection_lost", 0), out
    assert out.log_lines <= 6, out  # once per burst, not per request
    assert out.conns_left == 0, out


@pytest.mark.parametrize("fault_mode", ALL)
async def test_connections_killed(fault_mode: str) -> None:
    out = await chaos.connections_killed(fault_mode)
    assert out.answered == out.sent and out.status_5xx == 0, out
    assert out.mismatches == 0, out  # no reply delivered to the wrong request
    assert out.peak_conns <= out.extra["limit"], out
    if fault_mode == "batched":
        assert out.drift == 0, out
    else:
        assert out.drift >= 0, out  # never a lost confirmed count
    assert out.conns_left == 0, out


@pytest.mark.parametrize("fault_mode", ALL)
async def test_redis_restarted(fault_mode: str) -> None:
    out = await chaos.restarted(fault_mode)
    assert out.answered == out.sent and out.status_5xx == 0, out
    assert out.extra["counted_after_restart"] > 0, out  # counting continued
    if fault_mode == "batched":
        assert out.drift == 0, out
    else:
        # Applied without confirmation: requests in flight when Redis stopped (20 clients), and
        # commands that timed out and were applied later anyway (Redis slow while it restarts).
        assert 0 <= out.drift <= 20 + out.failures.get("timeout", 0), out
    assert out.conns_left == 0, out


@pytest.mark.parametrize(
    ("kind", "error_mode", "expected"),
    [
        ("wrongtype", "raw", {"redis:WRONGTYPE"}),
        ("maxclients", "raw", {"redis:ERR", "connection_lost"}),
        ("maxclients", "multiplexed", {"redis:ERR", "connection_lost"}),
        ("auth", "raw", {"redis:WRONGPASS"}),
        ("auth", "pooled", {"redis:WRONGPASS"}),
        ("auth", "naive", {"redis:WRONGPASS"}),
        ("maxclients", "pooled", {"redis:ERR", "connection_lost"}),
        ("auth", "multiplexed", {"redis:WRONGPASS"}),
        ("readonly", "raw", {"redis:READONLY"}),
    ],
)
async def test_error_replies_counted_by_kind(kind: str, error_mode: str, expected: set[str]) -> None:
    out = await chaos.error_replies(kind, error_mode)
    assert out.answered == out.sent > 0 and out.status_5xx == 0, out  # keeps serving
    assert set(out.failures) <= expected and sum(out.failures.values()) == out.answered, out
    assert 1 <= out.log_lines <= 3, out
    if kind in ("auth", "maxclients"):
        # Connects back off while Redis refuses them: a few a second, not one per request
        # (about 4,600 a second in raw mode before).
        assert out.extra["redis_connects_per_s"] <= 30, out


async def test_one_bad_key_logs_a_few_lines_and_the_others_count_exactly() -> None:
    # 200 addresses, one key of the wrong type: 421 (raw) to 1,396 (batched) warning lines in
    # 5 s when any success closed the failure burst. Now one burst for the kind. (The burst
    # logic is shared by every mode: tests/unit/test_faultlog.py.)
    out = await chaos.bad_key("raw")
    assert out.answered == out.sent > 0 and out.status_5xx == 0, out
    assert set(out.failures) == {"redis:WRONGTYPE"}, out
    assert out.drift == 0, out  # the 199 others counted exactly
    assert 1 <= out.log_lines <= 2, out
    assert out.conns_left == 0, out


@pytest.mark.parametrize("fault_mode", chaos.ALL_MODES)
async def test_client_disconnects_leave_no_dirty_connection(fault_mode: str) -> None:
    out = await chaos.client_disconnects(fault_mode)
    assert out.answered == out.sent > 0 and out.mismatches == 0, out
    assert out.extra["in_use_after"] == 0, out
    assert out.drift == 0, out
    # Received, so counted, though nobody read the answer: every client left only once its
    # request had reached the gateway.
    assert out.extra["abandoned_received"] == chaos.ABANDONED, out
    assert out.extra["abandoned_counted"] == out.extra["abandoned_received"], out
    assert out.conns_left == 0, out


async def test_slowloris_does_not_starve_normal_clients() -> None:
    out = await chaos.slowloris()
    assert out.answered == out.sent > 100 and out.status_5xx == 0, out
    assert out.p99_ms < 500, out
    assert out.extra["head_timeouts"] == 300, out


@pytest.mark.parametrize("shutdown_mode", ["batched", "raw"])
async def test_graceful_shutdown(shutdown_mode: str) -> None:
    out = await chaos.graceful_shutdown(shutdown_mode)
    assert out.extra["returncode"] == 0 and not out.extra["traceback"], out
    assert out.extra["exit_s"] < 6, out
    assert out.answered > 0 and out.status_5xx == 0, out
    # Every answered request is in Redis (batched: flushed at shutdown); a request whose
    # answer was cut by the close may be counted without being seen.
    assert 0 <= out.drift <= 20, out
    assert out.conns_left == 0, out


@pytest.mark.parametrize("fault", ["restarted", "down", "stalled"])
async def test_upstream_faults_under_load(fault: str) -> None:
    out = await chaos.upstream_fault(fault)
    assert out.sent > 100
    assert out.answered == out.sent  # every request answered (no client-side error or timeout)
    assert out.mismatches == 0  # never another request's response
    assert out.drift == 0  # counts exact
    assert out.conns_left == 0 and out.extra["in_use_after"] == 0  # no upstream connection leaked
    assert out.max_ms < 2000  # within the bound whatever the upstream does
    if fault == "restarted":
        assert out.status_5xx == 0  # the other server takes the traffic; stale GETs are retried
    else:
        assert out.status_5xx > 0 and set(out.extra["statuses"]) <= {200, 502, 503, 504}
    assert out.log_lines <= 10  # a line per state change, not per request
