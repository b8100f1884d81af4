"""What each gateway mode costs Redis: redis-server CPU time per request.

    python -m loadtest.rediscost [--duration S] [--modes raw,multiplexed,batched]

For each mode: a fresh redis-server pinned to core 1, the gateway pinned to
core 0, wrk (one thread, 50 connections, one client address) on core 1; Redis'
user+system CPU over the measured run divided by the requests served, and from
it the rate one Redis core could sustain for that mode. Then redis-benchmark's
INCR rate (50 clients, without and with pipelining) as Redis' own ceiling.
Used for the 16-core estimate in the README; needs wrk, redis-benchmark, taskset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .bench import Settings, cpu_times, run_wrk
from .procs import RedisProcess, free_port, stop_process, wait_port

ROOT = Path(__file__).resolve().parents[1]


def measure_mode(mode: str, seconds: int) -> dict[str, float]:
    redis = RedisProcess("--maxclients", "10000", cpus="1").start()
    gateway = None
    try:
        port = free_port()
        gateway = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "gateway", "--mode", mode, "--listen", f"127.0.0.1:{port}",
             "--admin-listen", "off", "--redis-url", redis.url, "--log-level", "WARNING"],
            cwd=ROOT,
        )  # fmt: skip
        wait_port(port, gateway)
        url = f"http://127.0.0.1:{port}"
        wrk = Settings()  # one thread, 50 connections, one client address (no header)
        run_wrk(url, wrk, 1, "1")  # warm-up
        assert redis.proc is not None
        cpu0, t0 = sum(cpu_times(redis.proc.pid)), time.monotonic()
        res = run_wrk(url, wrk, seconds, "1")
        cpu = sum(cpu_times(redis.proc.pid)) - cpu0
        elapsed = time.monotonic() - t0
        requests = res["requests"]
        return {
            "rps": res["rps"],
            "redis_cpu_pct": 100 * cpu / elapsed,
            "redis_us_per_request": 1e6 * cpu / max(requests, 1),
            "requests_per_redis_core": requests / cpu if cpu else float("inf"),
        }
    finally:
        stop_process(gateway)
        redis.cleanup()


def redis_benchmark(pipeline: int, requests: int) -> str:
    redis = RedisProcess("--maxclients", "10000", cpus="1").start()
    try:
        cmd = ["taskset", "-c", "0", "redis-benchmark", "-p", str(redis.port), "-t", "incr", "-c", "50",
               "-n", str(requests), "-P", str(pipeline), "-q"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
        lines = [line for line in out.replace("\r", "\n").splitlines() if "requests per second" in line]
        return lines[-1].strip() if lines else out.strip()[-200:]
    finally:
        redis.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.rediscost", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds of wrk per mode (default 10)")
    p.add_argument("--modes", default="raw,multiplexed,batched", help="comma-separated gateway modes")
    p.add_argument("--benchmark-requests", type=int, default=400_000, help="redis-benchmark -n (0 skips it)")
    a = p.parse_args(argv)
    missing = [t for t in ("wrk", "taskset", "redis-benchmark") if shutil.which(t) is None]
    if missing or (os.cpu_count() or 1) < 2:
        print(f"needs 2 cores and {', '.join(missing) or 'nothing else'}", file=sys.stderr)
        return 2
    print("| Mode | req/s | Redis CPU | Redis CPU µs per request | requests per Redis core-second |")
    print("|---|---:|---:|---:|---:|")
    for mode in [m.strip() for m in a.modes.split(",") if m.strip()]:
        r = measure_mode(mode, a.duration)
        print(f"| {mode} | {r['rps']:,.0f} | {r['redis_cpu_pct']:.1f}% | {r['redis_us_per_request']:.2f} | "
              f"{r['requests_per_redis_core']:,.0f} |", flush=True)  # fmt: skip
    if a.benchmark_requests:
        for pipeline in (1, 16):
            print(f"\nredis-benchmark -t incr -c 50 -P {pipeline}: {redis_benchmark(pipeline, a.benchmark_requests)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
