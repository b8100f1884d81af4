"""Instructions per request: what each gateway mode costs, without this machine's noise.

Requests per second on a shared machine drift by ±10% from one run to the next,
which hides differences of a few percent. The number of user-space instructions
the gateway executes per request does not drift: this runs each mode under
valgrind's callgrind, drives it with wrk like the benchmark does, and divides the
instructions counted while wrk ran by the requests the gateway answered in that
window (from its own /stats). Repeated runs agree to about 1%.

What it leaves out, so read it next to the benchmark, not instead of it: kernel
time (socket reads and writes, waking Redis) is not counted, and under
callgrind the gateway runs some 50 times slower, so it sees different timing
(batches are still about half the connections: the clients wait for their
responses either way).

    python -m loadtest.instructions --targets off,batched --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .bench import (
    CLUSTER_MODES,
    GATEWAY_MODES,
    GATEWAY_VARIANTS,
    PROXY_GATEWAY_MODES,
    SCALING_MODES,
    Redis,
    Settings,
    pinned,
    run_wrk,
    start_upstream,
)
from .procs import free_port, stop_process, wait_port

DEFAULT_TARGETS = "off,off-aiohttp,raw,multiplexed,batched,batched-noack,batched-aiohttp"


@dataclass
class Count:
    target: str
    requests: int
    instructions: int
    redis_commands: int

    @property
    def per_request(self) -> float:
        return self.instructions / max(self.requests, 1)


def _served(admin: str) -> int:
    with urllib.request.urlopen(f"http://{admin}/stats", timeout=30) as resp:
        return int(json.load(resp)["requests"]["total"])


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _totals(paths: list[Path]) -> int:
    """Instructions in the dumps: each part's `totals:` line.

    Not `summary:`, which callgrind writes as 0 when instrumentation was switched on
    after the start."""
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total


def measure(mode: str, s: Settings, cpus: tuple[str | None, str | None], keep: Path | None = None) -> Count:
    target_cpus, other_cpus = cpus
    db = Redis(other_cpus)
    proc = upstream = None
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        try:
            mode_args = GATEWAY_VARIANTS.get(mode, ["--mode", mode])
            if mode in PROXY_GATEWAY_MODES:
                # The benchmark's upstream (an HAProxy answering 200), beside the injector.
                upstream, upstream_port = start_upstream(other_cpus)
                # Idle upstream connections kept across the pause between warm-up and count (under
                # callgrind that pause outlasts the 4 s default): the count is the steady state's,
                # not that of 50 connects.
                mode_args = [*mode_args, "--upstream", f"http://127.0.0.1:{upstream_port}",
                             "--upstream-idle-timeout-s", "600"]  # fmt: skip
            port, admin = free_port(), f"127.0.0.1:{free_port()}"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/out.%p",
                   sys.executable, "-m", "gateway", *mode_args,
                   "--listen", f"127.0.0.1:{port}", "--admin-listen", admin, "--redis-url", db.url,
                   "--trusted-proxy", "127.0.0.1", "--log-level", "WARNING"]  # fmt: skip
            proc = subprocess.Popen(pinned(cmd, target_cpus), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(port, proc, timeout=120)  # the interpreter starts slowly under valgrind
            url = f"http://127.0.0.1:{port}"
            run_wrk(url, s, s.warmup, other_cpus)
            time.sleep(0.5)
            served, commands = _served(admin), db.commands()
            _control(proc.pid, "--instr=on")
            run_wrk(url, s, s.duration, other_cpus)
            _control(proc.pid, "--instr=off")
            served, commands = _served(admin) - served, db.commands() - commands - 1
            _control(proc.pid, "--dump")
            stop_process(proc, timeout=60)
            proc = None
            # The dump holds the window; the file written at exit holds nothing (instrumentation off).
            dumps = sorted(Path(tmp).glob("out.*"))
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                for dump in dumps:
                    shutil.copy(dump, keep / f"{mode}.{dump.name}")
            return Count(f"gateway/{mode}", served, _totals(dumps), commands)
        finally:
            stop_process(proc, timeout=60)
            stop_process(upstream)
            db.close()


def table(counts: list[Count]) -> str:
    base = next((c.per_request for c in counts if c.target == "gateway/off"), None)
    lines = [
        "| Target | instructions / request | off ÷ target | requests counted | Redis cmds/req |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in counts:
        ratio = f"{base / c.per_request:.3f}" if base else "–"
        commands = c.redis_commands / max(c.requests, 1)
        lines.append(f"| {c.target} | {c.per_request:,.0f} | {ratio} | {c.requests:,} | {commands:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.instructions", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"gateway modes or variants (default {DEFAULT_TARGETS})")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of wrk load counted (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before counting (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument(
        "--keep-dumps",
        type=Path,
        metavar="DIR",
        help="copy callgrind's dumps here, for callgrind_annotate (where the instructions go)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin the gateway and the injector to separate cores")
    a = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install valgrind wrk)", file=sys.stderr)
            return 2
    # One process against one redis-server: not the cluster targets, nor the multi-worker ones
    # (callgrind would count only the supervisor).
    known = {*GATEWAY_MODES, *GATEWAY_VARIANTS} - {*CLUSTER_MODES, *SCALING_MODES}
    modes = [m.strip().removeprefix("gateway/") for m in a.targets.split(",") if m.strip()]
    unknown = [m for m in modes if m not in known]
    if unknown:
        print(f"unknown target(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    s = Settings(duration=a.duration, warmup=a.warmup, connections=a.connections)
    cores = os.cpu_count() or 1
    pin = not a.no_pin and shutil.which("taskset") is not None and cores >= 2
    cpus = ("0", f"1-{cores - 1}") if pin else (None, None)
    counts, failed = [], []
    for mode in modes:
        print(f"{mode} ...", file=sys.stderr, flush=True)
        try:
            c = measure(mode, s, cpus, a.keep_dumps)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # one target, not the run
            print(f"    ERROR {exc}", file=sys.stderr)
            failed.append(mode)
            continue
        print(f"    {c.per_request:,.0f} instructions/request over {c.requests:,} requests", file=sys.stderr)
        counts.append(c)
    print(table(counts), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
