"""The open-file budget (gateway.limits): pure computation, no rlimit calls."""

from __future__ import annotations

import pytest

from gateway.config import Config, parse_redis_urls
from gateway.limits import (
    ADMIN_MAX_CONNECTIONS,
    PROCESS_RESERVE,
    UNLIMITED_CEILING,
    plan,
    raised_target,
    redis_connections,
    wanted_soft_limit,
)


@pytest.mark.parametrize(
    ("mode_name", "expected"),
    [("off", 0), ("naive", 20), ("pooled", 20), ("raw", 20), ("multiplexed", 2), ("batched", 1)],
)
def test_redis_connections_per_mode(mode_name: str, expected: int) -> None:
    assert redis_connections(Config(mode=mode_name, pool_size=20, mux_connections=2)) == expected  # type: ignore[arg-type]


def test_redis_connections_cluster_counts_each_node_and_the_slot_map() -> None:
    seeds, cluster = parse_redis_urls("redis+cluster://a:1,b:2,c:3,d:4")
    config = Config(mode="raw", pool_size=5, redis=seeds[0], cluster_seeds=seeds[1:], cluster=cluster)
    assert redis_connections(config) == 5 * 4 + 1
    # Fewer seeds than a cluster has masters: at least three are assumed.
    seeds, cluster = parse_redis_urls("redis+cluster://a:1")
    assert redis_connections(Config(mode="batched", redis=seeds[0], cluster=cluster)) == 3 + 1


def test_plan_lowers_max_connections_under_a_container_limit() -> None:
    budget = plan(Config(mode="raw", pool_size=20, max_connections=10_000), soft=1024, hard=1024)
    assert budget.redis == 20 and budget.admin == ADMIN_MAX_CONNECTIONS and budget.process == PROCESS_RESERVE
    assert budget.max_connections == 1024 - 20 - ADMIN_MAX_CONNECTIONS - PROCESS_RESERVE
    assert budget.lowered
    line = budget.describe()
    assert line.startswith("open-file limit 1024 (hard 1024): max-connections lowered from 10000 to 908")
    assert f"reserving {budget.reserved} for Redis" in line


def test_plan_keeps_max_connections_that_fit() -> None:
    budget = plan(Config(mode="batched", max_connections=500), soft=4096, hard=-1, before=1024)
    assert budget.max_connections == 500 and not budget.lowered
    assert budget.describe().startswith("open-file limit 4096 (hard unlimited, raised from 1024): max-connections 500")


def test_plan_without_admin_listener_reserves_nothing_for_it() -> None:
    budget = plan(Config(mode="off", admin_listen=None), soft=256, hard=256)
    assert budget.admin == 0 and budget.redis == 0
    assert budget.max_connections == 256 - PROCESS_RESERVE


def test_plan_allows_one_connection_when_the_reserve_takes_everything() -> None:
    budget = plan(Config(mode="raw", pool_size=500), soft=64, hard=64)
    assert budget.max_connections == 1


def test_wanted_soft_limit_is_max_connections_plus_the_reserve() -> None:
    config = Config(mode="raw", pool_size=20, max_connections=10_000)
    assert wanted_soft_limit(config) == 10_000 + 20 + ADMIN_MAX_CONNECTIONS + PROCESS_RESERVE
    assert plan(config, soft=wanted_soft_limit(config), hard=-1).max_connections == 10_000


@pytest.mark.parametrize(
    ("current", "hard", "wanted", "expected"),
    [
        (1024, 4096, 10_116, 4096),  # towards the hard limit, no further
        (1024, 1_048_576, 10_116, 10_116),  # only as far as needed
        (1024, -1, 10_000_000, UNLIMITED_CEILING),  # unlimited hard: capped
        (65_536, 1_048_576, 10_116, 65_536),  # never lowered
        (1024, 1024, 10_116, 1024),  # nothing to raise
    ],
)
def test_raised_target(current: int, hard: int, wanted: int, expected: int) -> None:
    assert raised_target(current, hard, wanted) == expected
