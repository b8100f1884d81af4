"""Accuracy of the rate limit, in the shape of Cloudflare's measurement: many clients, rates
spread around the limit, every decision compared with an exact sliding log.

Each client (one address in X-Forwarded-For; the gateway trusts 127.0.0.1) sends a
Poisson stream at `factor` x the limit, factors spread log-uniformly over
[--min-factor, --max-factor]. Every request's status and time (midway between send and
answer) is recorded; afterwards each decision is judged per client against an exact
sliding log (at most `limit` allowed requests in any `period`):

- *wrongly allowed / wrongly limited*: against the log of what the gateway itself had
  allowed in the period before the request (each decision on its own, as Cloudflare
  judged theirs: the history is the real one);
- *ideal*: an ideal limiter replayed over the same requests, with its own history (one
  early difference shifts the later ones, so these are larger);
- the last column is the most any one client got allowed in any period, divided by the
  limit (1.00: never above it; the fixed window reaches 2.00).

Each (algorithm, target) pair gets a fresh redis-server and fresh gateway processes;
`batched-x2` is two batched processes sharing one Redis, the client's requests spread
over both, which is where local decisions overshoot until the flush corrects them.

    python -m loadtest.accuracy --clients 100 --limit 5/s --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import random
import subprocess
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from gateway.limit.algorithms import ALGORITHMS, Rate, parse_rate

from .procs import RedisProcess, free_port, stop_process, wait_port

TARGETS = {
    # name: (mode, processes)
    "raw": ("raw", 1),
    "multiplexed": ("multiplexed", 1),
    "batched": ("batched", 1),
    "batched-x2": ("batched", 2),
}


@dataclass
class Outcome:
    algorithm: str
    target: str
    requests: int
    j: Judgement
    rate: Rate

    def row(self) -> str:
        pct = 100 / max(self.requests, 1)
        j = self.j
        return (
            f"| {self.algorithm} | {self.target} | {self.requests:,} | {j.allowed * pct:.1f}% | "
            f"{j.wrongly_allowed * pct:.2f}% | {j.wrongly_limited * pct:.2f}% | "
            f"{j.ideal_allowed * pct:.1f}% | {j.ideal_wrongly_allowed * pct:.2f}% | "
            f"{j.ideal_wrongly_limited * pct:.2f}% | {j.worst / self.rate.limit:.2f} |"
            + (f" {j.errors} errors |" if j.errors else "")
        )


def schedule(clients: int, rate: Rate, lo: float, hi: float, duration: float, seed: int) -> list[tuple[float, str]]:
    """(send offset in seconds, client address), sorted: a Poisson stream per client."""
    rng = random.Random(seed)
    out = []
    for i in range(clients):
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        per_s = rate.limit / rate.period_s * math.exp(rng.uniform(math.log(lo), math.log(hi)))
        t = rng.expovariate(per_s)
        while t < duration:
            out.append((t, ip))
            t += rng.expovariate(per_s)
    out.sort()
    return out


async def drive(ports: list[int], plan: list[tuple[float, str]], connections: int) -> list[tuple[str, float, int]]:
    """Send `plan` over `connections` keep-alive connections (spread over `ports`); each
    request's client, decision time and status (0: no answer)."""
    results: list[tuple[str, float, int]] = []
    queue: deque[tuple[float, str]] = deque(plan)
    start = time.monotonic() + 0.2

    async def worker(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                offset, ip = queue.popleft()
                delay = start + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.monotonic()
                writer.write(f"GET /x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {ip}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                results.append((ip, (sent + time.monotonic()) / 2, status))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    await asyncio.gather(*(worker(ports[i % len(ports)]) for i in range(connections)))
    return results


@dataclass
class Judgement:
    allowed: int = 0
    # Each decision against the log of what the gateway itself allowed before it.
    wrongly_allowed: int = 0
    wrongly_limited: int = 0
    # The decisions of an ideal limiter replayed over the same requests (errors cascade).
    ideal_allowed: int = 0
    ideal_wrongly_allowed: int = 0
    ideal_wrongly_limited: int = 0
    worst: int = 0
    errors: int = 0


def judge(results: list[tuple[str, float, int]], rate: Rate) -> Judgement:
    """Every decision against an exact sliding log (at most `limit` allowed in any period)."""
    per_client: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for ip, t, status in results:
        per_client[ip].append((t, status))
    j = Judgement()
    period, limit = rate.period_s, rate.limit
    for events in per_client.values():
        events.sort()
        ideal: deque[float] = deque()
        granted: list[float] = []
        for t, status in events:
            if status not in (302, 429):
                j.errors += 1
                continue
            got = status == 302
            # What the exact log says given what this gateway really allowed before t.
            exact = len(granted) - bisect.bisect_right(granted, t - period) < limit
            j.allowed += got
            j.wrongly_allowed += got and not exact
            j.wrongly_limited += exact and not got
            while ideal and ideal[0] <= t - period:
                ideal.popleft()
            ideal_ok = len(ideal) < limit
            if ideal_ok:
                ideal.append(t)
            j.ideal_allowed += ideal_ok
            j.ideal_wrongly_allowed += got and not ideal_ok
            j.ideal_wrongly_limited += ideal_ok and not got
            if got:
                granted.append(t)
                j.worst = max(j.worst, len(granted) - bisect.bisect_right(granted, t - period))
    return j


def run_one(algorithm: str, target: str, args: argparse.Namespace, plan: list[tuple[float, str]]) -> Outcome:
    mode, processes = TARGETS[target]
    redis = RedisProcess().start()
    procs = []
    try:
        ports = []
        for _ in range(processes):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--mode", mode, "--listen", f"127.0.0.1:{port}",
                 "--admin-listen", "off", "--redis-url", redis.url, "--trusted-proxy", "127.0.0.1",
                 "--limit", args.limit, "--limit-algorithm", algorithm, "--log-level", "WARNING"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(proc)
            wait_port(port, proc)
            ports.append(port)
        results = asyncio.run(drive(ports, plan, args.connections))
    finally:
        for proc in procs:
            stop_process(proc)
        redis.cleanup()
    return Outcome(algorithm, target, len(results), judge(results, parse_rate(args.limit)), parse_rate(args.limit))


def simulate(algorithm: str, args: argparse.Namespace, plan: list[tuple[float, str]]) -> Outcome:
    """The pure algorithm (`gateway.limit.algorithms`) over the same plan, no gateway, no
    network: the algorithm's own error, which the gateway's should match."""
    rate = parse_rate(args.limit)
    algo = ALGORITHMS[algorithm](rate)
    states: dict[str, Any] = {}
    results = []
    for t, ip in plan:
        decision, state = algo.decide(states.get(ip, algo.empty), t)
        if decision.allowed:
            states[ip] = state
        results.append((ip, t, 302 if decision.allowed else 429))
    return Outcome(algorithm, "simulated", len(results), judge(results, rate), rate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=100, help="client addresses (default 100)")
    p.add_argument("--limit", default="5/s", help="the gateway's --limit (default 5/s)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load per run (default 5)")
    p.add_argument("--min-factor", type=float, default=0.5, help="slowest client, x the limit (default 0.5)")
    p.add_argument("--max-factor", type=float, default=2.0, help="fastest client, x the limit (default 2)")
    p.add_argument("--connections", type=int, default=20, help="keep-alive connections (default 20)")
    p.add_argument("--algorithms", default="fixed,sliding,gcra")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--simulate", action="store_true", help="the pure algorithms only: no gateway, no Redis")
    args = p.parse_args(argv)
    rate = parse_rate(args.limit)
    plan = schedule(args.clients, rate, args.min_factor, args.max_factor, args.duration, args.seed)
    print(f"{len(plan):,} requests from {args.clients} clients per run", file=sys.stderr)
    rows = []
    for algorithm in args.algorithms.split(","):
        for target in ["simulated"] if args.simulate else args.targets.split(","):
            out = simulate(algorithm, args, plan) if args.simulate else run_one(algorithm, target, args, plan)
            print(out.row(), file=sys.stderr, flush=True)
            rows.append(out.row())
    print(
        "| algorithm | target | requests | allowed | wrongly allowed | wrongly limited "
        "| ideal allows | allowed, ideal not | limited, ideal not | most in one period ÷ limit |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
