"""The request path and the admin listener, wired to one backend.

HTTP request -> client IP -> backend.incr(key) -> 302 to the target (200 for the
target itself, so a client that follows redirects does not loop; it is still
counted). A backend that holds responses (batched, ack flush) is called without
waiting and the response's bytes wait on the connection instead; those requests
are counted when their batch settles (`_held_settled`). Owns policy: when
accounting fails the request is let through (`allow`, the default) or answered
503 (`deny`), the failure is counted by kind and logged once per burst. It never
lets an accounting failure escape as a 500.

The front end is aiohttp's low-level `web.Server`: one handler, no router, no
middleware, because every request takes the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import errors
from .accounting import counter_key
from .backends import backend_class
from .backends.base import Backend, HeldOutcome
from .client_ip import ClientIPResolver
from .config import Config
from .errors import AccountingError
from .faultlog import FailureLog
from .guard import GuardedServer
from .histogram import LATENCY_BOUNDS, Histogram
from .metrics import exposition, registry_for

log = logging.getLogger("gateway")
# The combined log format, with the TCP peer as the client address; aiohttp's byte
# count (%b) includes the response headers.
COMBINED_LOG_FORMAT = '%a - - %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"'


class Gateway:
    def __init__(self, config: Config, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend or backend_class(config.mode)(config)
        self.resolver = ClientIPResolver(config.trusted_proxies)
        self._use_xff = bool(config.trusted_proxies)
        self._prefix = config.key_prefix
        self._target = config.target
        self._deny = config.on_redis_error == "deny"
        self._uses_redis = self.backend.uses_redis
        self._redirect = {"Location": config.target}
        self._count_header = config.count_header
        # Responses wait for their flush without their handler waiting (gateway.holding); a deny
        # policy must know the outcome before it builds the response, so it keeps the await.
        self._hold = self.backend.holds_responses and not self._deny
        self.server: GuardedServer | None = None
        self._registry = registry_for(self.stats)
        self._started = time.monotonic()
        self.requests = 0
        self.counted = 0
        self.no_client_ip = 0
        self.uncounted = 0
        self.deferred = 0
        self.failures: Counter[str] = Counter()
        # Time spent in backend.incr, successful or not (not for requests that skip Redis).
        self.latency = Histogram(LATENCY_BOUNDS)
        self.failure_log = FailureLog(
            log, "requests are answered 503" if self._deny else "requests are let through uncounted"
        )
        if self._hold:
            self.backend.on_held = self._held_settled

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        await self.backend.close()

    # -- the request path -----------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        xff = None
        if self._use_xff:
            values = request.headers.getall("X-Forwarded-For", ())
            xff = ",".join(values) if values else None
        ip = self.resolver.resolve(request.remote, xff)
        if ip is None:
            # Not even the peer parses (a Unix socket, say): nothing to count under.
            self.no_client_ip += 1
        elif not self._uses_redis:
            self.uncounted += 1
        elif self._hold:
            try:
                commit = self.backend.incr_held(counter_key(self._prefix, ip))
            except AccountingError as err:
                self._failed(err)
            except Exception as exc:
                self._failed(AccountingError(errors.INTERNAL, repr(exc)), exc)
            else:
                transport = request.transport
                if transport is not None:  # else the client is gone; the count stands
                    transport.hold(commit)  # type: ignore[attr-defined]
        else:
            started = perf_counter()
            try:
                value = await self.backend.incr(counter_key(self._prefix, ip))
            except AccountingError as err:
                self.latency.observe(perf_counter() - started)
                if self._failed(err):
                    return self._denied()
            except Exception as exc:  # a bug in a backend must not become a 500 storm
                self.latency.observe(perf_counter() - started)
                if self._failed(AccountingError(errors.INTERNAL, repr(exc)), exc):
                    return self._denied()
            else:
                self.latency.observe(perf_counter() - started)
                self.counted += 1
                if self.failure_log.failing:
                    self.failure_log.success()
                if self._count_header is not None and value is not None:
                    return self._answer(request, {self._count_header: str(value)})
        return self._answer(request)

    def _answer(self, request: web.BaseRequest, extra: dict[str, str] | None = None) -> web.Response:
        if request.path == self._target:
            return web.Response(text="ok\n", headers=extra)
        if extra is None:
            return web.Response(status=302, headers=self._redirect)
        return web.Response(status=302, headers={**self._redirect, **extra})

    def _held_settled(self, outcome: HeldOutcome) -> None:
        """A batch holding responses settled; count its requests as the await path would have."""
        n = outcome.requests
        self.latency.observe_many(outcome.waited_s, n)
        if outcome.deferred is not None:
            self.deferred += n
            return
        refused = 0
        for err, count in outcome.refused:
            refused += count
            self.failures[err.kind] += count
            self.failure_log.failure(err, count)
        self.counted += n - refused
        if not refused and self.failure_log.failing:
            self.failure_log.success()

    def _failed(self, err: AccountingError, cause: BaseException | None = None) -> bool:
        """Count and log a failure; True when policy says deny."""
        if err.kind == errors.DEFERRED:
            # Not lost: held by the batcher and applied once Redis is back (it logs the outage).
            self.deferred += 1
            return self._deny
        self.failures[err.kind] += 1
        if cause is not None:
            err.__cause__ = cause
        self.failure_log.failure(err)
        return self._deny

    def _denied(self) -> web.Response:
        return web.Response(
            status=503,
            text="request accounting unavailable\n",
            headers={"Retry-After": str(self.config.retry_after_s)},
        )

    # -- admin ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        failed = sum(self.failures.values())
        settled = self.counted + self.deferred + failed + self.uncounted + self.no_client_ip
        return {
            "mode": self.config.mode,
            "redis": self.config.redis_description if self.backend.uses_redis else None,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "requests": {
                "total": self.requests,
                "counted": self.counted,
                "deferred": self.deferred,
                "failed": failed,
                "uncounted": self.uncounted,
                "no_client_ip": self.no_client_ip,
                "in_flight": self.requests - settled,
            },
            "failures": dict(self.failures),
            "accounting_latency_s": self.latency.snapshot(),
            "pool": self.backend.stats(),
            "connections": self.server.stats() if self.server is not None else None,
        }

    async def _stats_view(self, request: web.Request) -> web.Response:
        return json_response(self.stats())

    async def _metrics_view(self, request: web.Request) -> web.Response:
        resp = web.Response(body=exposition(self._registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _live_view(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _ready_view(self, request: web.Request) -> web.Response:
        if not self.backend.uses_redis:
            return web.json_response({"status": "ready", "redis": None})
        try:
            async with asyncio.timeout(self.config.connect_timeout + self.config.command_timeout):
                await self.backend.ping()
        except (AccountingError, TimeoutError) as exc:
            return web.json_response({"status": "unready", "redis": str(exc) or "timeout"}, status=503)
        return web.json_response({"status": "ready", "redis": "ok"})

    def admin_app(self) -> web.Application:
        return admin_application(self._stats_view, self._metrics_view, self._live_view, self._ready_view)

    def front_server(self) -> web.Server:
        c = self.config
        # Access logging is off by default: a log line per request costs more than the accounting.
        log_kwargs: dict[str, Any] = {"access_log": None}
        if c.access_log == "combined":
            log_kwargs = {"access_log": logging.getLogger("gateway.access"), "access_log_format": COMBINED_LOG_FORMAT}
        self.server = GuardedServer(
            self.handle,
            request_timeout=c.request_timeout_s,
            max_connections=c.max_connections,
            keepalive_timeout=c.keepalive_timeout_s,
            hold_responses=self._hold,
            **log_kwargs,
        )
        return self.server


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


View = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_application(stats: View, metrics: View, live: View, ready: View) -> web.Application:
    """The admin listener's routes, for one gateway or for a supervisor of workers."""
    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", live)
    app.router.add_get("/readyz", ready)
    return app


def json_response(obj: Any, status: int = 200) -> web.Response:
    """Indented, sorted JSON: /stats is read by people as often as by programs."""
    return web.json_response(obj, status=status, dumps=_dumps)


class ListenError(OSError):
    """A listener could not bind; the message names the address."""


async def start_site(runner: web.BaseRunner[Any], where: tuple[str, int] | str, reuse_port: bool = False) -> None:
    """Listen on HOST:PORT, or on a Unix socket path; ListenError names the address."""
    site: web.BaseSite
    if isinstance(where, str):
        site = web.UnixSite(runner, where)
        name = f"unix:{where}"
    else:
        # A deep accept queue: with aiohttp's 128, a burst of connects overflows it and the
        # dropped SYNs are retried by clients only after a second.
        site = web.TCPSite(runner, where[0], where[1], backlog=1024, reuse_port=reuse_port or None)
        name = f"{where[0]}:{where[1]}"
    try:
        await site.start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {name}: {reason}") from exc


class Running:
    """The listeners of one running gateway; `stop()` shuts them down in order."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._runners: list[web.BaseRunner[Any]] = []

    async def start(self) -> None:
        config = self.gateway.config
        await self.gateway.start()
        try:
            grace = config.shutdown_timeout_s
            front = web.ServerRunner(self.gateway.front_server(), handle_signals=False, shutdown_timeout=grace)
            await self._add(front, config.listen, reuse_port=config.reuse_port)
            if config.admin_listen is not None:
                admin = web.AppRunner(
                    self.gateway.admin_app(), handle_signals=False, access_log=None, shutdown_timeout=grace
                )
                await self._add(admin, config.admin_listen)
        except BaseException:
            await self.stop()
            raise

    async def _add(self, runner: web.BaseRunner[Any], where: tuple[str, int] | str, reuse_port: bool = False) -> None:
        self._runners.append(runner)
        await runner.setup()
        await start_site(runner, where, reuse_port=reuse_port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for runner in self._runners:
            for addr in runner.addresses:
                if isinstance(addr, tuple):
                    out.append((addr[0], addr[1]))
        return out

    async def stop(self) -> None:
        # Stop accepting and let in-flight requests finish, then close Redis.
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        await self.gateway.close()
