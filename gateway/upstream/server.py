"""One upstream server: its connection pool, its state and its counters.

Owns whether a server may get traffic. Two things can keep it from traffic:
active checks saw it fail `fall` times in a row (`up` false until they see it pass
`rise` times), or passive ejection: `max_fails` consecutive failed exchanges
(connect error, timeout, malformed or cut response) eject it for `fail_timeout`.
After that time it gets traffic again; one more failure ejects it again at once,
one success clears the count.

Connections come from `gateway.pool.Pool` (slot reserved before connect, FIFO
hand-off, discard on doubt, connect backoff); its wait timeout is the server's
queue timeout. No request logic here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .. import errors
from ..config import Config, UpstreamServer
from ..errors import AccountingError
from ..histogram import LATENCY_BOUNDS, Histogram
from ..lifecycle import Lifecycle
from ..pool import Pool
from .connection import UpstreamConnection

log = logging.getLogger("gateway.upstream")

# Upstream latency: from the request sent to the response head, up to the 30 s default timeout.
UPSTREAM_BOUNDS = (*LATENCY_BOUNDS, 5.0, 10.0, 30.0)


def _close_orphan(task: asyncio.Task[tuple[asyncio.BaseTransport, UpstreamConnection]]) -> None:
    """A connect nobody waits for any more: close what it made, if it made anything."""
    if not task.cancelled() and task.exception() is None:
        task.result()[0].close()


def by_class(classes: Sequence[int]) -> dict[str, int]:
    """Responses by status class ("2xx": n) from counts indexed by status // 100; the classes
    seen only."""
    return {f"{i}xx": n for i, n in enumerate(classes) if n}


class Server:
    def __init__(self, spec: UpstreamServer, config: Config) -> None:
        self.spec = spec
        self.name = spec.name
        self.weight = spec.weight
        self._config = config
        self.pool: Pool[UpstreamConnection] = Pool(
            self._connect,
            config.upstream_maxconn,
            config.upstream_queue_timeout_ms / 1000,
            what=f"connection to {spec.name}",
            # The pool's own lifecycle, as for Redis connections: idle ones closed before the
            # upstream's keep-alive timeout can close them under a request, old or much-used
            # ones retired when they come back.
            lifecycle=Lifecycle(
                idle_timeout=config.upstream_idle_timeout_s,
                max_lifetime=config.upstream_max_lifetime_s,
                max_uses=config.upstream_max_requests,
            ),
        )
        self.up = True  # as active checks see it
        self.ejected_until = 0.0
        self.fails = 0  # consecutive failed exchanges
        self.inflight = 0  # requests using the server now (leastconn)
        self.current_weight = 0  # smooth weighted round robin
        self.requests = 0
        self.retries = 0
        self.ejections = 0
        self.errors: Counter[str] = Counter()
        # Responses by status class: index 1 is 1xx ... 5 is 5xx (one list item bumped per response).
        self.classes = [0] * 6
        self.latency = Histogram(UPSTREAM_BOUNDS)
        self.check: dict[str, Any] = {"passed": 0, "failed": 0, "last": None}

    async def _connect(self) -> UpstreamConnection:
        # Not asyncio.timeout: the exchange may run without a Task of its own (the front end steps
        # its coroutine), so the connect gets the Task and a timer cancels it.
        c = self._config
        loop = asyncio.get_running_loop()
        connect = loop.create_task(
            loop.create_connection(
                UpstreamConnection,
                self.spec.host,
                self.spec.port,
            )
        )
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            connect.cancel()

        timer = loop.call_later(c.upstream_connect_timeout_ms / 1000, expire)
        try:
            _, conn = await connect
        except asyncio.CancelledError:
            if expired:
                raise AccountingError(errors.CONNECT, f"connect to {self.name} timed out") from None
            connect.cancel()  # the exchange was abandoned: so is its connect
            connect.add_done_callback(_close_orphan)
            raise
        except OSError as exc:
            raise AccountingError(errors.CONNECT, f"connect to {self.name} failed: {exc.strerror or exc}") from None
        finally:
            timer.cancel()
        return conn

    # -- state --------------------------------------------------------------------

    def available(self, now: float) -> bool:
        return self.up and now >= self.ejected_until

    def failed(self, kind: str) -> None:
        """An exchange failed on this server's side (counted, and towards ejection)."""
        self.errors[kind] += 1
        self.fails += 1
        now = asyncio.get_running_loop().time()
        if self.fails >= self._config.upstream_max_fails and now >= self.ejected_until:
            self.ejected_until = now + self._config.upstream_fail_timeout_s
            self.ejections += 1
            log.warning(
                "upstream %s ejected for %.0f s after %d consecutive failures (last: %s)",
                self.name,
                self._config.upstream_fail_timeout_s,
                self.fails,
                kind,
            )

    def succeeded(self) -> None:
        if self.fails:
            self.fails = 0
            self.ejected_until = 0.0

    def state(self, now: float) -> str:
        if not self.up:
            return "down"
        if now < self.ejected_until:
            return "ejected"
        return "up"

    def responses(self) -> dict[str, int]:
        return by_class(self.classes)

    def stats(self, now: float) -> dict[str, Any]:
        pool = self.pool.stats()
        return {
            "state": self.state(now),
            "weight": self.weight,
            "check": dict(self.check),
            "connections": {
                "open": pool["size"],
                "idle": pool["idle"],
                "in_use": pool["in_use"],
                "created": pool["created"],
                "discarded": pool["discarded"],
                # Retired by the lifecycle: idle past --upstream-idle-timeout-s, older than
                # --upstream-max-lifetime-s, or after --upstream-max-requests.
                "closed_idle": pool["closed_idle"],
                "expired": pool["expired"],
                "used_up": pool["used_up"],
                "max": pool["max"],
            },
            "queue": pool["waiting"],
            "queue_timeouts": pool["wait_timeouts"],
            "in_flight": self.inflight,
            "requests": self.requests,
            "retries": self.retries,
            "ejections": self.ejections,
            "errors": dict(self.errors),
            "responses": self.responses(),
            "latency_s": self.latency.snapshot(),
        }
