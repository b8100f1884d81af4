"""One gateway: the request path wired to one backend and one HTTP front end, and its admin listener.

    front end (gateway.http) -> Pipeline (gateway.pipeline) -> backend (gateway.backends)

`Gateway` assembles them from a Config and answers the admin views (/stats,
/metrics, /healthz, /readyz) on aiohttp, which is fine for a handful of requests
a minute; `Running` starts and stops the listeners in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import native
from .actions.proxy import Proxy
from .backends import backend_class
from .backends.base import Backend
from .config import Config
from .errors import AccountingError
from .guard import GuardedServer
from .http import BACKLOG, FrontEnd, ListenError, front_end_class, listen_error
from .limits import ADMIN_MAX_CONNECTIONS
from .metrics import exposition, registry_for
from .pipeline import Pipeline

__all__ = [
    "AdminRunner",
    "Gateway",
    "ListenError",
    "Running",
    "admin_application",
    "admin_runner",
    "json_response",
    "start_site",
]


class Gateway:
    def __init__(self, config: Config, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend or backend_class(config.mode)(config)
        self.pipeline = Pipeline(config, self.backend)
        self.proxy: Proxy | None = None
        if config.upstreams:
            self.proxy = self.pipeline.proxy = Proxy(config, self.pipeline.resolver)
        self.server: FrontEnd = front_end_class(config.http)(self.pipeline, config)
        self._registry = registry_for(self.stats)
        self._started = time.monotonic()

    async def start(self) -> None:
        await self.backend.start()
        if self.proxy is not None:
            await self.proxy.start()

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        await self.backend.close()

    # -- admin ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode,
            "http": self.config.http,
            "build": native.state,  # "compiled", or "interpreted (why)" (gateway.native)
            "redis": self.config.redis_description if self.backend.uses_redis else None,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "requests": self.pipeline.request_stats(),
            "failures": dict(self.pipeline.failures),
            "accounting_latency_s": self.pipeline.latency.snapshot(),
            "pool": self.backend.stats(),
            "connections": self.server.stats(),
            **({"upstream": self.proxy.stats()} if self.proxy is not None else {}),
            "limits": self.pipeline.limiter.stats() if self.pipeline.limiter is not None else None,
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


class AdminRunner(web.AppRunner):
    """An AppRunner for the admin listener, served through `GuardedServer`: a request head must
    arrive within `request_timeout` (else 408 and close), and at most `max_connections` are
    open at once (more get 503 and are closed), so slow or idle clients cannot hold it."""

    def __init__(self, app: web.Application, *, request_timeout: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, handle_signals=False, access_log=None, **kwargs)
        self._request_timeout = request_timeout
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        # aiohttp's own server for the app (startup run, app frozen, its handler arguments),
        # rebuilt as a GuardedServer with the same handler, request factory and arguments.
        server = await super()._make_server()
        return GuardedServer(
            server.request_handler,
            request_factory=server.request_factory,
            loop=server._loop,
            request_timeout=self._request_timeout,
            max_connections=self._max_connections,
            **server._kwargs,
        )


def admin_runner(app: web.Application, config: Config, **kwargs: Any) -> AdminRunner:
    """The admin listener's runner: the front's request-head timeout, a small connection limit."""
    return AdminRunner(
        app,
        request_timeout=config.request_timeout_s,
        max_connections=ADMIN_MAX_CONNECTIONS,
        keepalive_timeout=config.keepalive_timeout_s,
        **kwargs,
    )


async def start_site(runner: web.BaseRunner, where: tuple[str, int] | str, reuse_port: bool = False) -> None:
    """Listen on HOST:PORT, or on a Unix socket path; ListenError names the address."""
    site: web.BaseSite
    if isinstance(where, str):
        site = web.UnixSite(runner, where)
    else:
        # A deep accept queue: with aiohttp's 128, a burst of connects overflows it and the
        # dropped SYNs are retried by clients only after a second.
        site = web.TCPSite(runner, where[0], where[1], backlog=BACKLOG, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        raise listen_error(where, exc) from exc


class Running:
    """The listeners of one running gateway; `stop()` shuts them down in order."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._front: FrontEnd | None = None
        self._admin: web.BaseRunner | None = None

    async def start(self) -> None:
        config = self.gateway.config
        await self.gateway.start()
        try:
            self._front = self.gateway.server
            await self._front.start(config.listen, reuse_port=config.reuse_port)
            if config.admin_listen is not None:
                self._admin = admin_runner(self.gateway.admin_app(), config, shutdown_timeout=config.shutdown_timeout_s)
                await self._admin.setup()
                await start_site(self._admin, config.admin_listen)
        except BaseException:
            await self.stop()
            raise

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = list(self._front.addresses) if self._front is not None else []
        if self._admin is not None:
            out += [(a[0], a[1]) for a in self._admin.addresses if isinstance(a, tuple)]
        return out

    async def stop(self) -> None:
        # Stop accepting and let in-flight requests finish, then close Redis (which flushes batches).
        self.gateway.backend.hurry()
        if self._front is not None:
            with contextlib.suppress(Exception):
                await self._front.stop()
            self._front = None
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.cleanup()
            self._admin = None
        await self.gateway.close()
