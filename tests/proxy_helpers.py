"""Upstreams for the proxy tests: a real aiohttp app, and small raw servers for faults only they produce."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from gateway.config import Config, parse_upstream

from .helpers import make_config, running_gateway


def upstream_app(name: str = "a") -> web.Application:
    """The real upstream: echoes what it got, streams bodies of every framing, stalls on demand."""

    async def echo(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        info = {
            "server": name,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "size": size,
            "sha256": digest.hexdigest(),
            "chunked": request.headers.get("Transfer-Encoding") == "chunked",
        }
        return web.json_response(info, headers={"X-Server": name})

    async def data(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "0"))
        chunked = request.query.get("framing") == "chunked"
        resp = web.StreamResponse(
            headers={"X-Server": name, "Connection": "X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5"}
        )
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = n
        await resp.prepare(request)
        block = b"x" * 65536
        left = n
        while left > 0:
            await resp.write(block[: min(left, len(block))])
            left -= min(left, len(block))
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text="slow\n", headers={"X-Server": name})

    async def stall_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b"y" * 10)
        await asyncio.sleep(float(request.query.get("s", "5")))
        await resp.write(b"y" * 90)
        return resp

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, text=None if code in (204, 304) else f"{code}\n", headers={"X-Server": name})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_route("*", "/data", data)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stall-body", stall_body)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


class Upstream:
    """A running aiohttp upstream on a free port."""

    def __init__(self, name: str = "a", keepalive_timeout: float = 75.0) -> None:
        self.name = name
        self.keepalive_timeout = keepalive_timeout
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int = 0) -> Upstream:
        self.runner = web.AppRunner(upstream_app(self.name), keepalive_timeout=self.keepalive_timeout, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """A raw TCP upstream running `handler` per connection: for faults a real server will not make."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def proxy_config(
    upstreams: list[str], redis_url: str = "redis://127.0.0.1:1/0", mode: str = "off", **kw: Any
) -> Config:
    return make_config(redis_url, mode, upstreams=tuple(parse_upstream(u) for u in upstreams), **kw)


@asynccontextmanager
async def proxy(config: Config) -> AsyncIterator[tuple[Any, str]]:
    async with running_gateway(config) as (gw, base):
        yield gw, base


async def raw_exchange(base: str, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or `timeout`)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        pass
    finally:
        writer.transport.abort()
    return out


def body_json(data: bytes) -> dict[str, Any]:
    return json.loads(data.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]
