"""What the interpreter's build costs the gateway: its own request path, in memory, timed.

The own front end's connection protocol is fed one calibration request per read, as a
socket would deliver them, and answers into a transport that keeps nothing: the
parser callbacks, the request path and the encoding, with no kernel work. That is
the part of a request's cost an interpreter changes, so two interpreters compare
here without the benchmark's socket noise.

    python -m loadtest.interpreter                       # this interpreter: ns per request
    python -m loadtest.interpreter --compare /path/to/other-venv/bin/python

`--compare` runs this module under both interpreters in turns, pinned to one core, and
prints both medians and their ratio. Each interpreter needs the project's dependencies
(a venv's python; the checkout itself is put on its path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class _NullTransport:
    """Keeps nothing but the number of answers."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def ns_per_request(requests: int) -> float:
    from gateway.backends.off import OffBackend
    from gateway.config import Config
    from gateway.http.httptools_impl import HttpToolsFrontEnd, _Connection
    from gateway.pipeline import Pipeline

    config = Config(mode="off")
    front = HttpToolsFrontEnd(Pipeline(config, OffBackend(config)), config)
    conn = _Connection(front)
    transport = _NullTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:10060\r\n\r\n"  # what wrk sends
    feed = conn.data_received
    for _ in range(1000):
        feed(request)
    started = time.perf_counter_ns()
    for _ in range(requests):
        feed(request)
    elapsed = time.perf_counter_ns() - started
    if transport.writes != requests + 1000:
        raise RuntimeError(f"{transport.writes} answers to {requests + 1000} requests")  # timed nothing real
    return elapsed / requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.interpreter", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200_000, help="requests per sample (default 200000)")
    p.add_argument("--rounds", type=int, default=7, help="samples per interpreter (default 7)")
    p.add_argument("--compare", metavar="PYTHON", help="another interpreter, sampled in turns with this one")
    a = p.parse_args(argv)
    if a.compare is None:
        print(f"{ns_per_request(a.requests):.0f}")
        return 0
    pythons = {"this": sys.executable, "other": a.compare}
    samples: dict[str, list[float]] = {name: [] for name in pythons}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(a.rounds):
        for name, python in pythons.items():
            cmd = ["taskset", "-c", "0", python, "-m", "loadtest.interpreter", "--requests", str(a.requests)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
            samples[name].append(float(out.stdout))
    for name, python in pythons.items():
        values = ", ".join(f"{v:.0f}" for v in samples[name])
        print(f"{python}: median {statistics.median(samples[name]):.0f} ns per request ({values})")
    ratios = [o / t for t, o in zip(samples["this"], samples["other"], strict=True)]
    print(f"other ÷ this, per round: median {statistics.median(ratios):.2f}× ({', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
