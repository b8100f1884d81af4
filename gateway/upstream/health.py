"""Active health checks: `GET <path>` on every server every interval; rise/fall flip its state.

Owns `Server.up` and `Server.check`. A check is its own short connection (never a
pooled one: a check must not take a slot from requests, nor leave a half-read
response in the pool) with a whole timeout (by default the interval). A 2xx or 3xx
status passes; anything else, including no answer in time, fails. A state
change is logged once; repeated results are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from .server import Server

log = logging.getLogger("gateway.upstream")


async def check_once(server: Server, path: str, timeout: float) -> tuple[bool, str]:
    """One check: passed, and what was seen (a status or an error)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(server.spec.host, server.spec.port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {server.name}\r\nUser-Agent: gateway-health-check\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            while True:
                line = await reader.readline()
                parts = line.split(b" ", 2)
                if len(parts) < 2 or not parts[1].isdigit() or not 100 <= int(parts[1]) < 200 or parts[1] == b"101":
                    break
                # An interim response (100 Continue, 103 Early Hints) before the final one: not the
                # check's result. Its field lines are skipped up to the empty line (there may be
                # none); the final status follows.
                while (await reader.readline()).strip():
                    pass
    except TimeoutError:
        return False, "timeout"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    except (ValueError, EOFError) as exc:  # readline: a line longer than its limit
        return False, type(exc).__name__
    finally:
        if writer is not None:
            writer.transport.abort()
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False, "not an HTTP response"
    status = int(parts[1])
    return 200 <= status < 400, str(status)


class HealthChecker:
    def __init__(
        self, servers: Sequence[Server], path: str, interval: float, rise: int, fall: int, timeout: float
    ) -> None:
        self.servers = tuple(servers)
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for server in self.servers:
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(server)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _run(self, server: Server) -> None:
        streak = 0  # passes (> 0) or failures (< 0) in a row
        while True:
            passed, seen = await check_once(server, self.path, self.timeout)
            self.record(server, passed, seen, streak)
            streak = max(streak, 0) + 1 if passed else min(streak, 0) - 1
            self.apply(server, streak)
            await asyncio.sleep(self.interval)

    @staticmethod
    def record(server: Server, passed: bool, seen: str, streak: int) -> None:
        server.check["passed" if passed else "failed"] += 1
        server.check["last"] = seen

    def apply(self, server: Server, streak: int) -> None:
        if server.up and streak <= -self.fall:
            server.up = False
            log.warning("upstream %s is down: %d checks failed (last: %s)", server.name, -streak, server.check["last"])
        elif not server.up and streak >= self.rise:
            server.up = True
            server.succeeded()
            log.warning("upstream %s is up: %d checks passed", server.name, streak)
