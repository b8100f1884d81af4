"""The floor: the least a uvloop + httptools front end can do per request, as a benchmark target.

A bare `asyncio.Protocol` that feeds llhttp and answers every request with the gateway's own 302,
byte for byte (a Date refreshed once a second, Location, Content-Length). No limits, no timeouts,
no access log, no request path: not a server anyone should run, only the reference that tells how
much of the gateway's calibration is the gateway. Beside it, `gateway/off` shows what the own
front end's features cost over the same event loop and parser, and `floor ÷ aiohttp` shows the
most any front end on this stack could show against aiohttp on the machine in that run: the
kernel's share of a request and the injector's own ceiling are the same for both.

    python -m loadtest.floor --listen 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
from email.utils import formatdate
from typing import cast

import httptools
import uvloop


class Clock:
    """The Date header, formatted once a second rather than per request (as the gateway does)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.response = b""
        self.tick()

    def tick(self) -> None:
        date = formatdate(usegmt=True).encode()
        self.response = b"HTTP/1.1 302 Found\r\nDate: " + date + b"\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n"
        self.loop.call_later(1.0, self.tick)


class Floor(asyncio.Protocol):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(self.clock.response)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    clock = Clock(loop)
    server = await loop.create_server(lambda: Floor(clock), host, port, backlog=1024)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000)")
    a = p.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    uvloop.run(serve(host, int(port)))


if __name__ == "__main__":
    main()
