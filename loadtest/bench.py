"""The benchmark: every gateway mode and every HAProxy+Lua mode, in one run.

For each target and round it starts a fresh redis-server and the target, pins
the target to one core and the injector and Redis to the others, warms up,
drives the target for a fixed time (wrk by default, locust on request), and
records req/s, latency, the target's CPU split, peak RSS, peak Redis
connections, Redis commands per request, and count accuracy. Targets are
interleaved round by round and medians reported, so drift hits all alike.

Count accuracy compares the Redis counters with the 302s the injector saw. A
time-limited injector stops with up to one request per connection still in
flight; the target counted those but the injector never saw their answers. So
`extra` is expected to lie between 0 and the connection count, and a negative
value means counts were lost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from gateway import native

from .procs import RedisClusterProcesses, RedisProcess, free_port, stop_process, wait_port

ROOT = Path(__file__).resolve().parents[1]
RUNNER_NAME = "bench-runner"  # the runner's own Redis connections, left out of the peak
GATEWAY_MODES = (
    "off",
    "naive",
    "pooled",
    "raw",
    "multiplexed",
    "batched",
    "batched-noack",
    "off-aiohttp",
    "batched-aiohttp",
    "off-interpreted",
    "batched-interpreted",
)
# Targets that are a mode plus options, to measure a trade-off in the same run. The default
# front end is the own one (--http httptools); the `-aiohttp` variants run aiohttp's.
GATEWAY_VARIANTS = {
    "off-aiohttp": ["--mode", "off", "--http", "aiohttp"],
    "batched-aiohttp": ["--mode", "batched", "--http", "aiohttp"],
    "raw-aiohttp": ["--mode", "raw", "--http", "aiohttp"],
    "multiplexed-aiohttp": ["--mode", "multiplexed", "--http", "aiohttp"],
    "batched-noack": ["--mode", "batched", "--batch-ack", "none"],
    "off-w2": ["--mode", "off", "--workers", "2"],
    "batched-win05": ["--mode", "batched", "--batch-window-ms", "0.5"],
    "batched-win1": ["--mode", "batched", "--batch-window-ms", "1"],
    "raw-cluster": ["--mode", "raw"],
    "multiplexed-cluster": ["--mode", "multiplexed"],
    "batched-cluster": ["--mode", "batched"],
    "raw-w2": ["--mode", "raw", "--workers", "2"],
    "batched-w2": ["--mode", "batched", "--workers", "2"],
    # The proxy action: the same modes, forwarding to the benchmark's upstream (--upstream is added).
    "proxy-off": ["--mode", "off"],
    "proxy-naive": ["--mode", "naive"],
    "proxy-pooled": ["--mode", "pooled"],
    "proxy-raw": ["--mode", "raw"],
    "proxy-multiplexed": ["--mode", "multiplexed"],
    "proxy-batched": ["--mode", "batched"],
    # The request path interpreted (GATEWAY_PURE=1), beside the compiled build (gateway.native).
    "off-interpreted": ["--mode", "off"],
    "batched-interpreted": ["--mode", "batched"],
    "proxy-batched-interpreted": ["--mode", "batched"],
}
# Each Redis mode with --limit beside the same mode without: what deciding costs per request.
# The limit is one no client reaches, so every request is allowed and the count check holds
# (`make bench-limits`; docs/limits.md). On demand, like the scaling targets below.
LIMIT_BENCH_RATE = "1000000/s"
LIMIT_MODES = ("naive-limit", "pooled-limit", "raw-limit", "multiplexed-limit", "batched-limit")
GATEWAY_VARIANTS.update({m: ["--mode", m.removesuffix("-limit"), "--limit", LIMIT_BENCH_RATE] for m in LIMIT_MODES})
# HAProxy's raw listener with a stick-table limit (per process), the peer of raw-limit.
HAPROXY_LIMIT_MODES = ("raw-limited",)
# Measured only when named in --targets: with two workers the gateway takes every core,
# sharing one with the injector and Redis, so these are not part of the per-core table.
SCALING_MODES = ("off-w2", "raw-w2", "batched-w2")
# Also on demand: batched with a timed window instead of flushing at the end of each loop tick.
WINDOW_MODES = ("batched-win05", "batched-win1")
# And on demand: the own-codec modes against a 3-master Redis Cluster (all on the Redis core).
# Use --client-ips to spread the keys over the masters.
CLUSTER_MODES = ("raw-cluster", "multiplexed-cluster", "batched-cluster")
HAPROXY_MODES = ("calibration", "naive", "pooled", "raw", "seed-pooled", "seed-raw")
# Proxy targets: count, then forward every request to an upstream (haproxy/upstream.cfg, an HAProxy
# answering 200 itself) that runs on the injector's and Redis' core(s), not the target's.
PROXY_GATEWAY_MODES = ("proxy-off", "proxy-naive", "proxy-pooled", "proxy-raw", "proxy-multiplexed", "proxy-batched")
PROXY_HAPROXY_MODES = ("proxy-calibration", "proxy-naive", "proxy-pooled", "proxy-raw")
# seed-pooled and seed-raw run the seed's published Lua (lua_reference/seed.lua, docs/reference.md):
# beside pooled and raw they show what the reference's additions cost. No gateway mode peers them.
# Which HAProxy listener is the same mode as which gateway mode.
PEER_MODE = {
    "off": "calibration",
    "calibration": "off",
    "naive": "naive",
    "pooled": "pooled",
    "raw": "raw",
    "off-aiohttp": "calibration",
    "raw-aiohttp": "raw",
    "proxy-off": "proxy-calibration",
    "proxy-calibration": "proxy-off",
    "proxy-naive": "proxy-naive",
    "proxy-pooled": "proxy-pooled",
    "proxy-raw": "proxy-raw",
    "raw-limit": "raw-limited",
    "raw-limited": "raw-limit",
}
# Ratios the report states when both targets ran: (what, numerator, denominator).
RATIOS = (
    ("own front end ÷ aiohttp, calibration", "gateway/off", "gateway/off-aiohttp"),
    ("own front end ÷ aiohttp, batched", "gateway/batched", "gateway/batched-aiohttp"),
    ("own front end ÷ the floor (bare uvloop + httptools), calibration", "gateway/off", "floor/calibration"),
    ("the floor ÷ aiohttp, calibration", "floor/calibration", "gateway/off-aiohttp"),
    ("gateway calibration ÷ HAProxy calibration", "gateway/off", "haproxy/calibration"),
    ("batched ÷ its own calibration", "gateway/batched", "gateway/off"),
    ("batched ÷ HAProxy pooled", "gateway/batched", "haproxy/pooled"),
    ("multiplexed ÷ HAProxy raw", "gateway/multiplexed", "haproxy/raw"),
    ("raw ÷ HAProxy raw", "gateway/raw", "haproxy/raw"),
    ("pooled ÷ HAProxy pooled", "gateway/pooled", "haproxy/pooled"),
    ("batched ÷ seed's pooled Lua", "gateway/batched", "haproxy/seed-pooled"),
    ("multiplexed ÷ seed's raw Lua", "gateway/multiplexed", "haproxy/seed-raw"),
    ("raw ÷ seed's raw Lua", "gateway/raw", "haproxy/seed-raw"),
    ("HAProxy reference ÷ seed's code, pooled", "haproxy/pooled", "haproxy/seed-pooled"),
    ("HAProxy reference ÷ seed's code, raw", "haproxy/raw", "haproxy/seed-raw"),
    ("proxy: gateway batched ÷ HAProxy pooled Lua", "gateway/proxy-batched", "haproxy/proxy-pooled"),
    ("proxy: gateway calibration ÷ HAProxy calibration", "gateway/proxy-off", "haproxy/proxy-calibration"),
    ("proxy: HAProxy proxying ÷ HAProxy answering itself", "haproxy/proxy-calibration", "haproxy/calibration"),
    ("compiled ÷ interpreted, calibration", "gateway/off", "gateway/off-interpreted"),
    ("compiled ÷ interpreted, batched", "gateway/batched", "gateway/batched-interpreted"),
    ("compiled ÷ interpreted, proxy batched", "gateway/proxy-batched", "gateway/proxy-batched-interpreted"),
)
# The same, by CPU per request rather than req/s: for the pairs whose faster side may be held at
# the injector's ceiling (its core full), how many times less CPU it spends on a request.
_BY_CPU = {
    ("gateway/off", "gateway/off-aiohttp"),
    ("gateway/off", "floor/calibration"),
    ("floor/calibration", "gateway/off-aiohttp"),
    ("gateway/off", "haproxy/calibration"),
    ("gateway/batched", "gateway/off"),
}
CPU_RATIOS = tuple(r for r in RATIOS if (r[1], r[2]) in _BY_CPU)
# An injector using this share of its core or more is the limit: the target's req/s is what the
# injector could send, not what the target could answer.
INJECTOR_BOUND_PCT = 90.0


@dataclass
class Target:
    impl: str  # "gateway", "haproxy", or "floor" (loadtest/floor.py)
    mode: str

    @property
    def name(self) -> str:
        return f"{self.impl}/{self.mode}"

    @property
    def base_mode(self) -> str:
        """The --mode a variant runs (off for off-w2, batched for batched-win1, ...)."""
        args = GATEWAY_VARIANTS.get(self.mode) if self.impl == "gateway" else None
        return args[args.index("--mode") + 1] if args else self.mode

    @property
    def calibration(self) -> bool:
        return self.base_mode in ("off", "calibration", "proxy-calibration")

    @property
    def proxy(self) -> bool:
        return self.mode.startswith("proxy-")


@dataclass
class Sample:
    target: str
    round: int
    rps: float = 0.0
    requests: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_user_pct: float = 0.0
    cpu_sys_pct: float = 0.0
    peak_rss_mb: float = 0.0
    peak_redis_connections: int = 0
    redis_commands_per_request: float = 0.0
    counted: int = 0
    seen_302: int = 0
    extra: int = 0  # counted - seen_302: in flight at stop (expected 0..connections)
    non_3xx: int = 0
    socket_errors: int = 0
    injector_cpu_pct: float = 0.0
    # CPU time per request answered, in microseconds: the target's and the injector's. When the
    # injector's core is full, req/s is the injector's ceiling, and these still compare the targets.
    cpu_us_per_request: float = 0.0
    injector_us_per_request: float = 0.0
    error: str | None = None


@dataclass
class Settings:
    duration: float = 10.0
    warmup: float = 2.0
    rounds: int = 3
    connections: int = 50
    threads: int = 1
    client_ips: int = 1
    distribution: str = "uniform"
    injector: str = "wrk"
    targets: list[str] = field(default_factory=list)
    pin: bool = True
    out: str = "results"
    report: str | None = None


# -- processes ------------------------------------------------------------------


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus is not None else cmd


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (a gateway with --workers is a supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo.extend(int(c) for c in task.read_text().split())
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process tree, all threads included."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for p in process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory, summed over the process tree."""
    total = 0.0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


class Redis(RedisProcess):
    """The benchmark's redis-server."""

    def __init__(self, cpus: str | None) -> None:
        super().__init__("--maxclients", "10000", cpus=cpus)
        self.start()
        self.conn = redis.Redis(port=self.port, socket_timeout=10, client_name=RUNNER_NAME)
        self.ports = [self.port]

    def commands(self) -> int:
        """Commands processed so far; the INFO asking is counted in the next reading."""
        return int(self.conn.info("stats")["total_commands_processed"])

    def counter_total(self) -> int:
        return self.counter_sum(conn=self.conn)

    def close(self) -> None:
        self.conn.close()
        self.cleanup()


class ClusterRedis:
    """A 3-master Redis Cluster standing in for `Redis` in the -cluster targets."""

    def __init__(self, cpus: str | None) -> None:
        self.cluster = RedisClusterProcesses(3, 5000, "--maxclients", "10000", cpus=cpus).start()
        self.url = self.cluster.url
        self.ports = [n.port for n in self.cluster.nodes]
        self.conns = [redis.Redis(port=p, socket_timeout=10, client_name=RUNNER_NAME) for p in self.ports]

    def commands(self) -> int:
        """Commands processed by all masters; each INFO asking is counted in the next reading."""
        return sum(int(c.info("stats")["total_commands_processed"]) for c in self.conns)

    def counter_total(self) -> int:
        return self.cluster.counter_sum()

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.cluster.cleanup()


class ConnectionSampler(threading.Thread):
    """Samples connected_clients every 20 ms; keeps the peak and how many INFOs it sent."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.clients = [redis.Redis(port=p, socket_timeout=5, client_name=RUNNER_NAME) for p in ports]
        for c in self.clients:
            c.ping()
        self.peak = 0
        self.calls = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            # Only the target's connections, over every server: the runner's own are left out.
            total = 0
            for client in self.clients:
                clients = client.client_list(_type="normal")
                total += sum(1 for c in clients if c.get("name") != RUNNER_NAME)
                self.calls += 1
            self.peak = max(self.peak, total)
            self._halt.wait(0.02)

    def finish(self) -> None:
        self._halt.set()
        if self.ident is not None:  # started
            self.join()
        for c in self.clients:
            c.close()


def start_upstream(cpus: str | None) -> tuple[subprocess.Popen[bytes], int]:
    """The proxy targets' upstream: an HAProxy answering 200 itself (haproxy/upstream.cfg)."""
    port = free_port()
    env = {**os.environ, "UPSTREAM_BIND": "127.0.0.1", "UPSTREAM_PORT": str(port)}
    cmd = ["haproxy", "-db", "-f", str(ROOT / "haproxy" / "upstream.cfg")]
    proc = subprocess.Popen(pinned(cmd, cpus), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(port, proc)
    return proc, port


def start_target(
    t: Target, db: Redis | ClusterRedis, cpus: str | None, upstream: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if t.impl == "gateway":
        mode_args = GATEWAY_VARIANTS.get(t.mode, ["--mode", t.mode])
        if upstream is not None:
            mode_args = [*mode_args, "--upstream", f"http://127.0.0.1:{upstream}"]
        cmd = [sys.executable, "-m", "gateway", *mode_args, "--listen", f"127.0.0.1:{port}",
               "--admin-listen", "off", "--redis-url", db.url,
               "--trusted-proxy", "127.0.0.1", "--log-level", "WARNING"]  # fmt: skip
        env = dict(os.environ)
        if t.mode.endswith("-interpreted"):
            env["GATEWAY_PURE"] = "1"  # the same code, not compiled (gateway.native)
    elif t.impl == "floor":
        cmd = [sys.executable, "-m", "loadtest.floor", "--listen", f"127.0.0.1:{port}"]
        env = dict(os.environ)
    else:
        cmd = [str(ROOT / "haproxy" / "run.sh")]
        env = {
            **os.environ,
            "HAPROXY_BIND": "127.0.0.1",
            "REF_REDIS_PORT": str(db.ports[0]),
            "REF_TRUSTED_PROXIES": "127.0.0.1",
            **{
                f"HAPROXY_{m.upper().replace('-', '_')}_PORT": str(free_port())
                for m in HAPROXY_MODES + PROXY_HAPROXY_MODES + HAPROXY_LIMIT_MODES
            },
            "HAPROXY_LIMIT_RATE": LIMIT_BENCH_RATE.split("/")[0],
            "HAPROXY_STATS_PORT": str(free_port()),
            "HAPROXY_UPSTREAM": f"127.0.0.1:{upstream or 1}",
        }
        env[f"HAPROXY_{t.mode.upper().replace('-', '_')}_PORT"] = str(port)
    proc = subprocess.Popen(pinned(cmd, cpus), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(port, proc)
    return proc, port


# -- injectors --------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0


def run_wrk(url: str, s: Settings, duration: float, cpus: str | None) -> dict[str, Any]:
    seconds = max(1, round(duration))  # wrk takes whole seconds
    cmd = ["wrk", "-t", str(s.threads), "-c", str(s.connections), "-d", f"{seconds}s", "--latency",
           "-s", str(ROOT / "loadtest" / "xff.lua"), url + "/", "--", str(s.client_ips), s.distribution]  # fmt: skip
    proc = subprocess.Popen(pinned(cmd, cpus), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=seconds + 60)
    requests = re.search(r"(\d+) requests in", out)
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    if requests is None or "xff.lua" in out:
        # wrk runs on without a script that fails to load: treat that as a failure, not a result.
        raise RuntimeError(f"wrk failed: {out.strip()[-300:]}")
    total = int(requests.group(1))
    non_3xx = int(non.group(1)) if non else 0
    return {
        "requests": total,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(lat.get("50", "0ms")),
        "p99_ms": _ms(lat.get("99", "0ms")),
        "non_3xx": non_3xx,
        "seen_302": total - non_3xx,
        "socket_errors": sum(int(x) for x in errs.groups()) if errs else 0,
    }


def locust_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals and percentiles from locust's --json output (its CSV is not final at quit)."""
    total = sum(e["num_requests"] for e in entries)
    failures = sum(e["num_failures"] for e in entries)
    start = min(e["start_time"] for e in entries)
    end = max(e["last_request_timestamp"] or start for e in entries)
    hist: dict[float, int] = {}
    for e in entries:
        for ms, n in e["response_times"].items():
            hist[float(ms)] = hist.get(float(ms), 0) + n

    def pct(p: float) -> float:
        seen = 0
        for ms in sorted(hist):
            seen += hist[ms]
            if seen >= p * total:
                return ms
        return 0.0

    return {
        "requests": total,
        "rps": total / max(end - start, 1e-9),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "non_3xx": failures,
        "seen_302": total - failures,
        "socket_errors": 0,
    }


def run_locust(url: str, s: Settings, duration: float, cpus: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", str(s.connections), "-r", str(s.connections), "-t", f"{max(1, round(duration))}s",
           "--host", url, "--json", "--only-summary", "--client-ips", str(s.client_ips),
           "--ip-distribution", s.distribution, "--stop-timeout", "5", "--loglevel", "ERROR",
           "--web-port", str(free_port())]  # fmt: skip
    proc = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, timeout=duration + 120)
    try:
        return locust_summary(json.loads(proc.stdout))
    except (json.JSONDecodeError, ValueError, KeyError) as exc:
        raise RuntimeError(f"locust failed: {exc}: {proc.stderr.strip()[-300:]}") from None


# -- one measurement ------------------------------------------------------------------


def measure(t: Target, rnd: int, s: Settings) -> Sample:
    cores = os.cpu_count() or 1
    pin = s.pin and shutil.which("taskset") is not None and cores >= 2
    # A multi-worker gateway gets every core (it has to share one with the injector and Redis).
    target_cpus = (f"0-{cores - 1}" if t.mode in SCALING_MODES else "0") if pin else None
    other_cpus = f"1-{cores - 1}" if pin else None
    sample = Sample(target=t.name, round=rnd)
    db: Redis | ClusterRedis = ClusterRedis(other_cpus) if t.mode in CLUSTER_MODES else Redis(other_cpus)
    proc = upstream = None
    try:
        upstream_port = None
        if t.proxy:
            upstream, upstream_port = start_upstream(other_cpus)
        proc, port = start_target(t, db, target_cpus, upstream_port)
        url = f"http://127.0.0.1:{port}"
        inject = run_wrk if s.injector == "wrk" else run_locust
        if s.warmup > 0:
            inject(url, s, s.warmup, other_cpus)
        time.sleep(0.3)
        counted_before = db.counter_total()
        sampler = ConnectionSampler(db.ports)  # connected now, so its handshake is not in the window
        try:
            commands_before = db.commands()
            u0, s0 = cpu_times(proc.pid)
            sampler.start()
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.monotonic()
            res = inject(url, s, s.duration, other_cpus)
            if not res["requests"]:
                raise RuntimeError(f"no request was answered ({res['socket_errors']} socket errors)")
            elapsed = time.monotonic() - t0
            u1, s1 = cpu_times(proc.pid)
            children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            injector_cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
        finally:
            # Also when the injector fails: the thread would keep polling Redis for the rest of the run.
            sampler.finish()
        time.sleep(0.5)  # let the last in-flight requests and any batch flush land
        # Less the INFOs that took the first reading (one per server), and the sampler's calls.
        commands = db.commands() - commands_before - len(db.ports) - sampler.calls
        sample.peak_rss_mb = round(peak_rss_mb(proc.pid), 1)
        stop_process(proc)
        proc = None
        counted = db.counter_total() - counted_before
        sample.rps = round(res["rps"], 1)
        sample.requests = res["requests"]
        sample.p50_ms = round(res["p50_ms"], 3)
        sample.p99_ms = round(res["p99_ms"], 3)
        sample.non_3xx = res["non_3xx"]
        sample.socket_errors = res["socket_errors"]
        sample.seen_302 = res["seen_302"]
        sample.counted = counted
        sample.extra = counted - res["seen_302"] if not t.calibration else 0
        busy = max(elapsed, 1e-9)
        sample.cpu_user_pct = round(100 * (u1 - u0) / busy, 1)
        sample.cpu_sys_pct = round(100 * (s1 - s0) / busy, 1)
        sample.injector_cpu_pct = round(100 * injector_cpu / busy, 1)
        answered = res["requests"]  # not 0: a run without an answer failed above
        sample.cpu_us_per_request = round(1e6 * ((u1 - u0) + (s1 - s0)) / answered, 2)
        sample.injector_us_per_request = round(1e6 * injector_cpu / answered, 2)
        sample.peak_redis_connections = sampler.peak
        sample.redis_commands_per_request = round(max(commands, 0) / max(res["requests"], 1), 4)
    except Exception as exc:  # one broken target must not cost the whole run
        sample.error = str(exc)
    finally:
        stop_process(proc)
        stop_process(upstream)
        db.close()
    return sample


# -- aggregation and reports ------------------------------------------------------------

NUMERIC = [f for f in Sample.__dataclass_fields__ if f not in ("target", "round", "error")]


def _median_ratio(a: list[Sample], b: list[Sample]) -> float | None:
    rounds = {x.round: x.rps for x in b if x.error is None and x.rps}
    ratios = [x.rps / rounds[x.round] for x in a if x.error is None and x.round in rounds]
    return round(statistics.median(ratios), 3) if ratios else None


def medians(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    by_target: dict[str, list[Sample]] = {}
    for smp in samples:
        by_target.setdefault(smp.target, []).append(smp)
    for name, group in by_target.items():
        ok = [g for g in group if g.error is None]
        row: dict[str, Any] = {"rounds": len(ok), "errors": [g.error for g in group if g.error]}
        for f in NUMERIC:
            values = [getattr(g, f) for g in ok]
            row[f] = statistics.median(values) if values else None
        # Ratios are taken within each round (the calibration ran minutes apart at most),
        # then the median: drift on a shared machine cancels out far better than with
        # a ratio of medians.
        own_cal = {"gateway": "gateway/off", "haproxy": "haproxy/calibration"}.get(name.split("/", 1)[0], name)
        if name.endswith("-interpreted"):
            # Each build against its own calibration; the proxy's interpreted one has none.
            own_cal = "" if "/proxy-" in name else "gateway/off-interpreted"
        elif "/proxy-" in name:
            own_cal = "gateway/proxy-off" if name.startswith("gateway/") else "haproxy/proxy-calibration"
        elif name.endswith("-aiohttp"):
            own_cal = "gateway/off-aiohttp"  # each front end against its own calibration
        row["ratio_to_calibration"] = _median_ratio(by_target.get(name, []), by_target.get(own_cal, []))
        peer = PEER_MODE.get(name.split("/", 1)[1])
        if name.startswith("gateway/") and peer:
            row["ratio_to_haproxy"] = _median_ratio(group, by_target.get(f"haproxy/{peer}", []))
        if name.split("/", 1)[1] in SCALING_MODES:
            one = f"gateway/{Target('gateway', name.split('/', 1)[1]).base_mode}"
            row["ratio_to_one_worker"] = _median_ratio(group, by_target.get(one, []))
        row["rps_by_round"] = {g.round: g.rps for g in ok}
        row["cpu_us_by_round"] = {g.round: g.cpu_us_per_request for g in ok}
        # Accuracy is judged on every round, not the median: one loss anywhere counts.
        row["min_extra"] = min((g.extra for g in ok), default=None)
        row["max_extra"] = max((g.extra for g in ok), default=None)
        out[name] = row
    return out


def ratios_of(summary: dict[str, dict[str, Any]], a: str, b: str, by: str = "rps") -> tuple[float | None, int, int]:
    """Median per-round ratio of a's req/s to b's, and in how many rounds a was ahead.

    With by="cpu", the ratio of b's CPU per request to a's: how many times fewer CPU a needs for
    a request, which still compares two targets when the injector caps a's req/s."""
    if by == "cpu":
        a, b = b, a
    ra = summary[a].get("rps_by_round" if by == "rps" else "cpu_us_by_round") or {}
    rb = summary[b].get("rps_by_round" if by == "rps" else "cpu_us_by_round") or {}
    pairs = [(ra[r], rb[r]) for r in ra if rb.get(r)]
    if not pairs:
        return None, 0, 0
    value = round(statistics.median(x / y for x, y in pairs), 3)
    return value, sum(x > y for x, y in pairs), len(pairs)


def _fmt_rps(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def _p99(row: dict[str, Any]) -> str:
    return f"{row['p99_ms']:.2f}" if row.get("p99_ms") is not None else "–"


def markdown(summary: dict[str, dict[str, Any]], s: Settings, skipped: dict[str, str]) -> str:
    lines = [
        "| Mode | Gateway req/s | vs own calibration | CPU user/sys | HAProxy+Lua req/s | vs own calibration "
        "| CPU user/sys | Gateway ÷ HAProxy |",
        "|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for mode in GATEWAY_MODES:
        g = summary.get(f"gateway/{mode}")
        peer = PEER_MODE.get(mode)
        h = summary.get(f"haproxy/{peer}") if peer else None
        if g is None and (h is None or mode != "off"):
            continue  # not measured in this run
        label = {
            "off": "calibration (off)",
            "batched-noack": "batched, --batch-ack none",
            "off-aiohttp": "calibration (off), --http aiohttp",
            "batched-aiohttp": "batched, --http aiohttp",
            "raw-aiohttp": "raw, --http aiohttp",
            "multiplexed-aiohttp": "multiplexed, --http aiohttp",
            "off-interpreted": "calibration (off), interpreted",
            "batched-interpreted": "batched, interpreted",
        }.get(mode, mode)

        def ratio(row: dict[str, Any] | None, field: str) -> str:
            value = (row or {}).get(field)
            return f"{value:.2f}×" if value else "–"

        def cpu(row: dict[str, Any] | None) -> str:
            if not row or row["cpu_user_pct"] is None:
                return "–"
            total = row["cpu_user_pct"] + row["cpu_sys_pct"]
            if not total:
                return "–"
            return f"{100 * row['cpu_user_pct'] / total:.0f}% / {100 * row['cpu_sys_pct'] / total:.0f}%"

        g_rps, h_rps = (g or {}).get("rps"), (h or {}).get("rps")
        lines.append(
            f"| {label} | {_fmt_rps(g_rps)} | {ratio(g, 'ratio_to_calibration')} | {cpu(g)} | "
            f"{_fmt_rps(h_rps) if peer else 'n/a'} | {ratio(h, 'ratio_to_calibration') if peer else 'n/a'} | "
            f"{cpu(h) if peer else 'n/a'} | {ratio(g, 'ratio_to_haproxy') if peer else 'n/a'} |"
        )
    proxied = [m for m in PROXY_GATEWAY_MODES if f"gateway/{m}" in summary] or (
        ["proxy-off"] if "haproxy/proxy-calibration" in summary else []
    )
    if proxied:
        lines += [
            "",
            "| Proxy (count, then forward to the upstream) | Gateway req/s | p99 ms | HAProxy+Lua req/s | p99 ms "
            "| Gateway ÷ HAProxy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for mode in proxied:
            g = summary.get(f"gateway/{mode}") or {}
            peer = PEER_MODE.get(mode)
            h = (summary.get(f"haproxy/{peer}") or {}) if peer else {}
            r = g.get("ratio_to_haproxy")

            lines.append(
                f"| {mode.removeprefix('proxy-').replace('off', 'calibration (off)')} | {_fmt_rps(g.get('rps'))} "
                f"| {_p99(g)} | {_fmt_rps(h.get('rps')) if peer else 'n/a'} | {_p99(h) if peer else 'n/a'} "
                f"| {f'{r:.2f}×' if r else '–'} |"
            )
    lines += [
        "",
        "| Target | req/s | p50 ms | p99 ms | target CPU % (user+sys) | peak RSS MB | peak Redis conns "
        "| Redis cmds/req | counted − 302s seen (min..max) | non-3xx | injector CPU % | CPU µs/req "
        "| injector µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        if row["rps"] is None:
            lines.append(f"| {name} | failed: {'; '.join(row['errors'])[:80]} |||||||||||")
            continue
        acc = "n/a" if Target(*name.split("/", 1)).calibration else f"{row['min_extra']}..{row['max_extra']}"
        lines.append(
            f"| {name} | {row['rps']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['cpu_user_pct'] + row['cpu_sys_pct']:.0f} | {row['peak_rss_mb']:.0f} | "
            f"{row['peak_redis_connections']:.0f} | {row['redis_commands_per_request']:.3f} | {acc} | "
            f"{row['non_3xx']:.0f} | {row['injector_cpu_pct']:.0f} | {row['cpu_us_per_request']:.1f} | "
            f"{row['injector_us_per_request']:.1f} |"
        )
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} |||||||||||")
    stated = [(what, a, b, ratios_of(summary, a, b)) for what, a, b in RATIOS if a in summary and b in summary]
    if stated:
        lines += ["", "| Ratio (median of per-round ratios) | value | rounds ahead |", "|---|---:|---:|"]
        for what, _a, _b, (value, ahead, rounds) in stated:
            lines.append(f"| {what} | {f'{value:.2f}×' if value else '–'} | {ahead} of {rounds} |")
    by_cpu = [(what, ratios_of(summary, a, b, by="cpu")) for what, a, b in CPU_RATIOS if a in summary and b in summary]
    if by_cpu:
        lines += [
            "",
            "| Ratio by CPU per request (median of per-round ratios) | value | rounds ahead |",
            "|---|---:|---:|",
        ]
        for what, (value, ahead, rounds) in by_cpu:
            lines.append(f"| {what} | {f'{value:.2f}×' if value else '–'} | {ahead} of {rounds} |")
    bound = [
        f"{name} ({row['injector_cpu_pct']:.0f}%, {row['injector_us_per_request']:.1f} µs per request)"
        for name, row in summary.items()
        if row["rps"] is not None and row["injector_cpu_pct"] >= INJECTOR_BOUND_PCT
    ]
    if bound:
        lines += [
            "",
            f"The injector used {INJECTOR_BOUND_PCT:.0f}% of its core or more against: {', '.join(bound)}. "
            "For these the req/s is the injector's ceiling, not the target's: compare them by CPU per request.",
        ]
    scaling = [m for m in SCALING_MODES if f"gateway/{m}" in summary]
    if scaling:
        lines += [
            "",
            "| Workers (every core, shared with the injector and Redis) | req/s | vs 1 worker, same mode "
            "| gateway CPU % | injector CPU % |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in scaling:
            row = summary[f"gateway/{m}"]
            if row["rps"] is None:
                continue
            r1 = row.get("ratio_to_one_worker")
            lines.append(
                f"| gateway/{m} | {row['rps']:,.0f} | {f'{r1:.2f}×' if r1 else '–'} | "
                f"{row['cpu_user_pct'] + row['cpu_sys_pct']:.0f} | {row['injector_cpu_pct']:.0f} |"
            )
    lines += [
        "",
        f"Medians of {s.rounds} interleaved round(s); ratios are medians of per-round ratios. "
        f"{s.duration:g} s per run after {s.warmup:g} s warm-up; "
        f"{s.injector}, {s.connections} connections, {s.threads} injector thread(s); "
        f"{s.client_ips} client IP(s), {s.distribution}. "
        "`counted − 302s seen` is the Redis counter total minus the 302s the injector saw: requests still in "
        f"flight when a timed injector stops are counted but not seen, so 0..{s.connections} is exact accounting "
        "and a negative value would be a lost count.",
    ]
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(GATEWAY_MODES)
    g = [(summary.get(f"gateway/{m}") or {}).get("rps") or 0 for m in modes]
    h = [
        (summary.get(f"haproxy/{PEER_MODE[m]}") or {}).get("rps") or 0
        if m in PEER_MODE and not m.endswith("-aiohttp")
        else 0
        for m in modes
    ]
    x = range(len(modes))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar([i - 0.2 for i in x], g, 0.4, label="gateway (own HTTP/1.1 front end, uvloop)")
    ax.bar([i + 0.2 for i in x], h, 0.4, label="HAProxy + Lua")
    for i, v in enumerate(g):
        if v:
            ax.annotate(f"{v / 1000:.1f}k", (i - 0.2, v), ha="center", va="bottom", fontsize=8)
    for i, v in enumerate(h):
        if v:
            ax.annotate(f"{v / 1000:.1f}k", (i + 0.2, v), ha="center", va="bottom", fontsize=8)
    names = {
        "off": "calibration",
        "batched-noack": "batched\n(ack none)",
        "off-aiohttp": "calibration\n(aiohttp)",
        "batched-aiohttp": "batched\n(aiohttp)",
    }
    ax.set_xticks(list(x), [names.get(m, m) for m in modes], fontsize=8)
    ax.set_ylabel("requests per second (one core)")
    ax.set_title("Per-IP accounting in Redis: cost of each way of talking to Redis")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(path: Path, result: dict[str, Any], table: str, chart_png: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = path.with_suffix(".png")
    shutil.copyfile(chart_png, image)
    m = result["machine"]
    text = f"""# Benchmarks

Generated by `{result["command"]}` on {time.strftime("%Y-%m-%d", time.gmtime())}.

Machine: {m["cpu"] or "unknown CPU"}, {m["cores"]} cores; Python {m["python"]};
{m["haproxy"]}; {m["redis"]}; {m["wrk"]}.
The gateway's request path: {m.get("build", "unknown")} (gateway.native; `-interpreted` targets: GATEWAY_PURE=1).
The target runs pinned to core 0; the injector and redis-server share the other core(s).

![req/s per mode, gateway beside HAProxy+Lua]({image.name})

{table}
Raw samples of every round are in the run's `results.json`.
"""
    path.write_text(text)


# -- command line -------------------------------------------------------------------------


def all_targets() -> list[Target]:
    return (
        [Target("gateway", m) for m in GATEWAY_MODES + PROXY_GATEWAY_MODES]
        + [Target("gateway", "proxy-batched-interpreted")]
        + [Target("haproxy", m) for m in HAPROXY_MODES + PROXY_HAPROXY_MODES]
        + [Target("floor", "calibration")]
    )


def known_targets() -> list[Target]:
    return (
        all_targets()
        + [Target("gateway", m) for m in SCALING_MODES + WINDOW_MODES + CLUSTER_MODES + LIMIT_MODES]
        + [Target("haproxy", m) for m in HAPROXY_LIMIT_MODES]
    )


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measurement per run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--connections", type=int, default=50, help="concurrent connections (default 50)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--client-ips", type=int, default=1, help="distinct client IPs in X-Forwarded-For (default 1)")
    p.add_argument("--distribution", choices=["uniform", "skewed"], default="uniform")
    p.add_argument("--injector", choices=["wrk", "locust"], default="wrk")
    p.add_argument("--targets", default="all", help="comma-separated, e.g. gateway/raw,haproxy/raw (default all)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--report", help="also write a markdown page (table, chart, machine, command) to this path")
    a = p.parse_args(argv)
    targets = [t.name for t in all_targets()] if a.targets == "all" else [x.strip() for x in a.targets.split(",")]
    known = {t.name for t in known_targets()}
    unknown = [t for t in targets if t not in known]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Settings(a.duration, a.warmup, a.rounds, a.connections, a.threads, a.client_ips, a.distribution,
                    a.injector, targets, not a.no_pin, a.out, a.report)  # fmt: skip


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name, cmd in {
        "haproxy": ["haproxy", "-v"],
        "redis": ["redis-server", "--version"],
        "wrk": ["wrk", "-v"],
    }.items():
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            versions[name] = (out.stdout or out.stderr).splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            versions[name] = "not installed"
    return {"cpu": model, "cores": os.cpu_count(), "python": interpreter(), "build": native.state, **versions}


def interpreter() -> str:
    """The gateway's interpreter and how it was built: a libpython loaded as a shared library, and
    a build without profile-guided optimization, each cost the gateway a share of its speed."""
    linked = "static libpython"
    try:
        if "libpython3" in Path("/proc/self/maps").read_text():
            linked = "shared libpython"
    except OSError:
        linked = "libpython unknown"
    config = sysconfig.get_config_var("CONFIG_ARGS") or ""
    optimized = ", --enable-optimizations" if "--enable-optimizations" in config else ""
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return f"{sys.version.split()[0]} ({executable}, {linked}{optimized})"


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    targets = [t for t in known_targets() if t.name in s.targets]
    skipped: dict[str, str] = {}
    if shutil.which("haproxy") is None:
        skipped.update({t.name: "haproxy is not installed" for t in targets if t.impl == "haproxy"})
    if s.injector == "wrk" and shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk, or use --injector locust", file=sys.stderr)
        return 2
    targets = [t for t in targets if t.name not in skipped]
    if not (s.pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2):
        print("note: not pinning (needs taskset and at least 2 cores)", file=sys.stderr)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    per_run = s.duration + s.warmup + 2.5
    total = len(targets) * s.rounds
    samples: list[Sample] = []
    started = time.monotonic()
    for rnd in range(1, s.rounds + 1):
        for i, t in enumerate(targets):
            done = (rnd - 1) * len(targets) + i
            left = (total - done) * (time.monotonic() - started) / done if done else total * per_run
            print(f"[round {rnd}/{s.rounds}] {t.name} ({done + 1}/{total}), about {left:.0f} s left",
                  file=sys.stderr, flush=True)  # fmt: skip
            smp = measure(t, rnd, s)
            print(f"    {smp.rps:,.0f} req/s, p99 {smp.p99_ms:.2f} ms" + (f", ERROR {smp.error}" if smp.error else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
            samples.append(smp)
    summary = medians(samples)
    result = {
        "settings": asdict(s),
        "machine": machine(),
        "command": "python -m loadtest " + " ".join(sys.argv[1:] if argv is None else argv),
        "summary": summary,
        "skipped": skipped,
        "samples": [asdict(x) for x in samples],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(summary, s, skipped)
    (out / "table.md").write_text(table)
    chart(summary, out / "chart.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'chart.png'}", file=sys.stderr)
    if s.report:
        write_report(Path(s.report), result, table, out / "chart.png")
        print(f"wrote {s.report}", file=sys.stderr)
    return 0 if all(x.error is None for x in samples) else 1
