import os

import pytest

from gateway.cli import config_from_args
from gateway.config import Config, ConfigError, parse_listen, parse_redis_url


def test_redis_url_full_form() -> None:
    t = parse_redis_url("rediss://alice:s%40cret@redis.example:6380/4")
    assert (t.host, t.port, t.db, t.username, t.password, t.tls) == ("redis.example", 6380, 4, "alice", "s@cret", True)
    assert "s@cret" not in t.url


def test_redis_url_defaults_and_password_only() -> None:
    t = parse_redis_url("redis://:pw@")
    assert (t.host, t.port, t.db, t.username, t.password) == ("127.0.0.1", 6379, 0, None, "pw")
    assert parse_redis_url("redis://h?db=3").db == 3
    assert parse_redis_url("redis://[::1]:7000").host == "::1"


@pytest.mark.parametrize("bad", ["http://x", "redis://h:port", "redis://h/db", "redis://h:99999", "redis://h/-1"])
def test_redis_url_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_redis_url(bad)


def test_listen_forms() -> None:
    assert parse_listen("1.2.3.4:80", "0.0.0.0") == ("1.2.3.4", 80)
    assert parse_listen(":80", "0.0.0.0") == ("0.0.0.0", 80)
    assert parse_listen("80", "0.0.0.0") == ("0.0.0.0", 80)
    assert parse_listen("[::]:80", "0.0.0.0") == ("::", 80)
    with pytest.raises(ConfigError):
        parse_listen("host:http", "0.0.0.0")


def test_config_checks() -> None:
    with pytest.raises(ConfigError):
        Config(pool_size=0)
    with pytest.raises(ConfigError):
        Config(target="ok")
    with pytest.raises(ConfigError):
        Config(mode="bogus")  # type: ignore[arg-type]


def test_environment_and_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_MODE", "pooled")
    monkeypatch.setenv("GATEWAY_POOL_SIZE", "7")
    monkeypatch.setenv("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.0.0/16")
    monkeypatch.setenv("REDIS_URL", "redis://h:1/2")
    c = config_from_args([])
    assert (c.mode, c.pool_size, c.redis.port, c.redis.db) == ("pooled", 7, 1, 2)
    assert [str(n) for n in c.trusted_proxies] == ["10.0.0.0/8", "192.168.0.0/16"]
    c = config_from_args(["--mode", "raw", "--trusted-proxy", "127.0.0.1", "--admin-listen", "off"])
    assert c.mode == "raw" and [str(n) for n in c.trusted_proxies] == ["127.0.0.1/32"] and c.admin_listen is None


def test_bad_environment_value_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GATEWAY_POOL_SIZE", "many")
    with pytest.raises(SystemExit) as exc:
        config_from_args([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pool-size" in err


def test_cluster_seed_urls() -> None:
    from gateway.config import parse_redis_urls

    seeds, cluster = parse_redis_urls("redis+cluster://u:pw@a:7000,b:7001")
    assert cluster and [(t.host, t.port, t.username, t.password) for t in seeds] == [
        ("a", 7000, "u", "pw"),
        ("b", 7001, "u", "pw"),
    ]
    seeds, cluster = parse_redis_urls("redis://a:7000,b:7001", cluster=True)
    assert cluster and [t.port for t in seeds] == [7000, 7001]
    seeds, cluster = parse_redis_urls("redis://a:7000/3")
    assert not cluster and seeds[0].db == 3
    with pytest.raises(ConfigError, match="--redis-cluster"):
        parse_redis_urls("redis://a:7000,b:7001")
    with pytest.raises(ConfigError, match="database 0"):
        parse_redis_urls("redis+cluster://a:7000/2")
    with pytest.raises(ConfigError, match="naive"):
        Config(mode="naive", cluster=True)


def test_command_line_defaults_are_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    # One source of defaults: the options' defaults come from Config's fields (they once said
    # 500 ms for the Redis timeouts where Config said 1000).
    for name in list(os.environ):
        if name.startswith("GATEWAY_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    assert config_from_args([]) == Config()
    assert Config().connect_timeout_ms == Config().command_timeout_ms == 500.0


def test_pool_lifecycle_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("GATEWAY_POOL_")]:
        monkeypatch.delenv(var)
    c = config_from_args([])
    lc = c.lifecycle
    assert (lc.min_size, lc.idle_timeout, lc.check_after, lc.max_lifetime) == (0, 180.0, 30.0, None)
    c = config_from_args(
        ["--pool-min-size", "5", "--pool-idle-timeout-s", "0", "--pool-check-after-ms", "off",
         "--pool-max-lifetime-s", "0", "--pool-lifetime-jitter-s", "0.5"]
    )  # fmt: skip
    lc = c.lifecycle
    assert (lc.min_size, lc.idle_timeout, lc.check_after, lc.max_lifetime, lc.lifetime_jitter) == (
        5,
        None,
        None,
        0,
        0.5,
    )
    monkeypatch.setenv("GATEWAY_POOL_MAX_LIFETIME_S", "600")
    assert config_from_args([]).lifecycle.max_lifetime == 600.0
    with pytest.raises(ConfigError, match="pool-min-size"):
        Config(pool_size=3, pool_min_size=4)
    with pytest.raises(ConfigError, match="one checkout"):
        Config(mode="multiplexed", pool_max_lifetime_s=0)
    with pytest.raises(ConfigError):
        Config(pool_check_after_ms=-1)
