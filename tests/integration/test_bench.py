"""The benchmark pipeline end to end (a smoke run), the locustfile, and compose.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.cli import build_parser
from loadtest import bench

from ..helpers import RedisServer, free_port, make_config, running_gateway

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_bench_quick_produces_every_output(tmp_path: Path) -> None:
    # What `make bench-quick` runs, into a temporary directory.
    out = tmp_path / "quick"
    report = tmp_path / "bench.md"
    # The redirect targets; the proxy targets have their own smoke run below.
    names = [t.name for t in bench.all_targets() if not t.proxy]
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "--duration", "1", "--warmup", "1", "--rounds", "1",
         "--targets", ",".join(names), "--out", str(out), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[round 1/1]" in proc.stderr  # progress is shown
    result = json.loads((out / "results.json").read_text())
    summary = result["summary"]
    expected = {f"gateway/{m}" for m in bench.GATEWAY_MODES} | {"floor/calibration"}
    if shutil.which("haproxy"):
        expected |= {f"haproxy/{m}" for m in ("calibration", "naive", "pooled", "raw", "seed-pooled", "seed-raw")}
    assert set(summary) == expected
    for name, row in summary.items():
        assert row["errors"] == [] and row["rps"] > 0, (name, row)
        assert row["non_3xx"] == 0, name
        # CPU per request, the target's and the injector's: what compares targets at the injector's ceiling.
        assert 0 < row["cpu_us_per_request"] < 10_000 and 0 < row["injector_us_per_request"] < 10_000, (name, row)
        if not bench.Target(*name.split("/", 1)).calibration:
            # Exact accounting: no count lost; extras only for requests in flight at the stop.
            assert 0 <= row["min_extra"] <= row["max_extra"] <= 50, (name, row)
            assert row["redis_commands_per_request"] > 0
        else:
            assert row["counted"] == 0
    table = (out / "table.md").read_text()
    assert "| calibration (off) |" in table and "| batched |" in table
    assert "| own front end ÷ the floor (bare uvloop + httptools), calibration |" in table
    assert "| Ratio by CPU per request (median of per-round ratios) | value | rounds ahead |" in table
    assert "| own front end ÷ aiohttp, calibration |" in table.split("Ratio by CPU per request")[1]
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "python -m loadtest" in report.read_text() and (tmp_path / "bench.png").exists()


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("haproxy") is None, reason="needs wrk and haproxy")
def test_bench_proxy_targets_run(tmp_path: Path) -> None:
    # Every proxy target is known to the runner and part of the full run; a few of them, briefly.
    names = {t.name for t in bench.all_targets() if t.proxy}
    assert names == {f"gateway/{m}" for m in bench.PROXY_GATEWAY_MODES} | {
        f"haproxy/{m}" for m in bench.PROXY_HAPROXY_MODES
    } | {"gateway/proxy-batched-interpreted"}
    out = tmp_path / "proxy"
    targets = "gateway/proxy-off,gateway/proxy-batched,haproxy/proxy-pooled"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "--duration", "1", "--warmup", "0", "--rounds", "1",
         "--targets", targets, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == set(targets.split(","))
    for name, row in summary.items():
        assert row["errors"] == [] and row["rps"] > 0 and row["non_3xx"] == 0, (name, row)
    for name in ("gateway/proxy-batched", "haproxy/proxy-pooled"):
        # Every request forwarded was counted (extras only for those in flight at the stop).
        assert 0 <= summary[name]["min_extra"] <= summary[name]["max_extra"] <= 50, summary[name]
    assert summary["gateway/proxy-off"]["counted"] == 0
    assert "| Proxy (count, then forward to the upstream) |" in (out / "table.md").read_text()


async def test_locustfile_headless_against_gateway(redis_server: RedisServer) -> None:
    import ipaddress

    from loadtest.bench import locust_summary

    cfg = make_config(redis_server.url, "raw", trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    async with running_gateway(cfg) as (gw, base):
        proc = await _run_locust(base)
        assert proc.returncode == 0, proc.stderr[-2000:]
        await gw.backend.close()
    stats = locust_summary(json.loads(proc.stdout))
    assert stats["requests"] > 0 and stats["non_3xx"] == 0
    r = redis_server.client()
    keys = r.keys("ip:10.*")
    assert len(keys) > 5  # spread over client IPs through X-Forwarded-For
    # Every 302 locust saw was counted; a few more may have been in flight when it stopped.
    assert 0 <= sum(int(r.get(k)) for k in keys) - stats["seen_302"] <= 5


async def _run_locust(base: str) -> subprocess.CompletedProcess[str]:
    import asyncio

    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", "5", "-r", "5", "-t", "2s", "--host", base, "--json", "--only-summary",
           "--client-ips", "50", "--ip-distribution", "skewed", "--web-port", str(free_port())]  # fmt: skip
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120)


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "compose.yaml").read_text())  # type: ignore[no-any-return]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_file_is_valid() -> None:
    proc = subprocess.run(["docker-compose", "-f", "compose.yaml", "config", "-q"], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_compose_matches_defaults() -> None:
    services = _compose()["services"]
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    assert default == {"redis", "gateway", "haproxy", "locust-master", "locust-worker"}
    defaults = {a.dest: a.default for a in build_parser()._actions}
    env = services["gateway"]["environment"]
    # The gateway's ports, pool and prefix in compose are its own defaults.
    assert env["GATEWAY_LISTEN"].endswith(":" + defaults["listen"].rsplit(":", 1)[1])
    assert env["GATEWAY_ADMIN_LISTEN"].endswith(":" + defaults["admin_listen"].rsplit(":", 1)[1])
    assert int(env["GATEWAY_POOL_SIZE"]) == int(defaults["pool_size"])
    assert float(env["GATEWAY_POOL_WAIT_MS"]) == float(defaults["pool_wait_ms"])
    assert env["GATEWAY_KEY_PREFIX"] == defaults["key_prefix"]
    assert "10060:10060" in services["gateway"]["ports"]
    # HAProxy's ports and settings are run.sh's defaults.
    run_sh = (ROOT / "haproxy" / "run.sh").read_text()
    listeners = [("CALIBRATION", 10070), ("NAIVE", 10071), ("POOLED", 10072), ("RAW", 10073),
                 ("SEED_POOLED", 10074), ("SEED_RAW", 10075)]  # fmt: skip
    for var, port in listeners:
        assert f"HAPROXY_{var}_PORT:-{port}" in run_sh
        assert f"{port}:{port}" in services["haproxy"]["ports"]
    henv = services["haproxy"]["environment"]
    assert henv["REF_POOL_SIZE"] == env["GATEWAY_POOL_SIZE"] and henv["REF_KEY_PREFIX"] == env["GATEWAY_KEY_PREFIX"]
    assert henv["REF_TRUSTED_PROXIES"] == env["GATEWAY_TRUSTED_PROXIES"]
    assert "--master" in services["locust-master"]["command"]
    assert "locust-master" in services["locust-worker"]["command"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"


def test_compose_cluster_profile() -> None:
    from gateway.cli import config_from_args

    services = _compose()["services"]
    cluster = {name for name, svc in services.items() if "cluster" in svc.get("profiles", [])}
    assert cluster == {"redis-node-1", "redis-node-2", "redis-node-3", "redis-cluster-init", "gateway-cluster"}
    ports = [services[f"redis-node-{i}"]["command"][2] for i in (1, 2, 3)]
    assert ports == ["7001", "7002", "7003"]
    for i in (1, 2, 3):
        assert "--cluster-enabled" in services[f"redis-node-{i}"]["command"]
    init = services["redis-cluster-init"]["command"][0]
    assert all(f"redis-node-{i} " in init and f":{p}" in init for i, p in zip((1, 2, 3), ports, strict=True))
    env = services["gateway-cluster"]["environment"]
    # The gateway accepts its environment as given: a cluster of the three nodes.
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {k: str(v) for k, v in env.items()}):
        config = config_from_args([])
    assert config.cluster and [(t.host, t.port) for t in config.seeds] == [
        (f"redis-node-{i}", int(p)) for i, p in zip((1, 2, 3), ports, strict=True)
    ]
    assert config.mode == "batched" and config.workers >= 1
    proc = subprocess.run(["docker-compose", "-f", "compose.yaml", "--profile", "cluster", "config", "-q"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_makefile_defaults_match_gateway() -> None:
    from gateway.cli import DEFAULT_REDIS_URL

    assert f"REDIS_URL ?= {DEFAULT_REDIS_URL}" in (ROOT / "Makefile").read_text()


def test_redis_cost_measures_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest import rediscost

    if (os.cpu_count() or 1) < 2 or not shutil.which("wrk") or not shutil.which("redis-benchmark"):
        pytest.skip("needs 2 cores, wrk and redis-benchmark")
    assert rediscost.main(["--duration", "1", "--modes", "raw", "--benchmark-requests", "20000"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| raw |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    rps, us = float(cells[1].replace(",", "")), float(cells[3])
    # Every raw request is one INCRBY round trip: Redis spends real, bounded time on each.
    assert rps > 0 and 0.5 < us < 1000
    assert "redis-benchmark -t incr -c 50 -P 16:" in out and "requests per second" in out


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_bench_cluster_target_counts_exactly(tmp_path: Path) -> None:
    # The on-demand cluster targets: a fresh 3-master cluster, keys spread by --client-ips.
    out = tmp_path / "cluster"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "--targets", "gateway/multiplexed-cluster", "--duration", "1",
         "--warmup", "1", "--rounds", "1", "--client-ips", "300", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((out / "results.json").read_text())["summary"]["gateway/multiplexed-cluster"]
    assert row["errors"] == [] and row["rps"] > 0 and row["non_3xx"] == 0
    assert 0 <= row["min_extra"] <= row["max_extra"] <= 50
    # One shared connection per master, all three in use.
    assert row["peak_redis_connections"] == 3
    assert 0.9 < row["redis_commands_per_request"] < 1.2


@pytest.mark.skipif(
    not (shutil.which("valgrind") and shutil.which("wrk")), reason="needs valgrind (make instructions) and wrk"
)
def test_instructions_per_request_are_counted(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest import instructions

    assert instructions.main(["--targets", "batched", "--duration", "1", "--warmup", "1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| gateway/batched |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    per_request, served, commands = float(cells[1].replace(",", "")), int(cells[3].replace(",", "")), float(cells[4])
    # A request through aiohttp and the batcher is tens of thousands of instructions, not zero
    # (nothing counted) and not millions (startup or the warm-up counted too).
    assert served > 0 and 10_000 < per_request < 1_000_000
    if served < 200:
        # Under valgrind on a machine this loaded, requests trickle in one at a time: then each
        # flush carries one, and what batching saves cannot be seen.
        pytest.skip(f"only {served} requests served in the window: too few to show batching")
    assert 0 < commands < 1, f"{commands} Redis commands per request over {served} requests"


def test_the_interpreter_benchmark_times_answered_requests() -> None:
    from loadtest import interpreter

    # ns_per_request raises unless every request it timed was answered.
    assert interpreter.ns_per_request(500) > 0
    python = sys.executable
    cmd = [python, "-m", "loadtest.interpreter", "--compare", python, "--rounds", "1", "--requests", "500"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "other ÷ this, per round" in out.stdout, out.stdout
