"""What a check before reuse costs: the round trip of the PING `gateway.connection.ping_check`
sends, next to the INCRBY it precedes, on one connection to a local redis-server.

    python -m loadtest.checkcost [--n 2000]

Only the first request to take a pooled connection after it sat idle past
--pool-check-after-ms pays it; against a path that forgot the connection, the check
ends at the command timeout instead (that delay is measured by the chaos scenario
"flows idle 1 s forgotten: check").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from gateway.config import parse_redis_url
from gateway.connection import open_connection, ping_check
from gateway.resp import encode

from .procs import RedisProcess


async def measure(n: int) -> dict[str, float]:
    server = RedisProcess().start()
    try:
        conn = await open_connection(
            parse_redis_url(server.url),
            connect_timeout=1.0,
            command_timeout=1.0,
        )
        incr = encode("INCRBY", "ip:check-cost", 1)
        pings, incrs = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            assert await ping_check(conn)
            t1 = time.perf_counter()
            await conn.send_packed(incr)[0]
            t2 = time.perf_counter()
            pings.append(t1 - t0)
            incrs.append(t2 - t1)
        conn.abort()
        return {
            "check_median_us": statistics.median(pings) * 1e6,
            "check_p99_us": sorted(pings)[int(0.99 * n)] * 1e6,
            "incrby_median_us": statistics.median(incrs) * 1e6,
        }
    finally:
        server.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.checkcost", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="checks measured (default 2000)")
    a = p.parse_args(argv)
    r = asyncio.run(measure(a.n))
    print(
        f"check (PING round trip): median {r['check_median_us']:.0f} us, p99 {r['check_p99_us']:.0f} us; "
        f"the INCRBY after it: median {r['incrby_median_us']:.0f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
