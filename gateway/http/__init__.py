"""HTTP front ends: one module each, chosen by name (`--http`), behind one small contract.

A front end owns the client side of the request path: it accepts connections,
turns bytes into request facts for `Pipeline.handle`, and turns the `Response`
it gets back into bytes. It never decides what to count or what to answer; it
does own framing, limits, timeouts, backpressure and the graceful drain.
"""

from __future__ import annotations

import abc
import os
from typing import TYPE_CHECKING, Any, ClassVar

from ..registry import load

if TYPE_CHECKING:
    from ..config import Config
    from ..pipeline import Pipeline

FRONT_ENDS: dict[str, str] = {
    "httptools": "gateway.http.httptools_impl:HttpToolsFrontEnd",
    "aiohttp": "gateway.http.aiohttp_impl:AiohttpFrontEnd",
}

# A deep accept queue: with the common 128, a burst of connects overflows it and the
# dropped SYNs are retried by clients only after a second.
BACKLOG = 1024


class ListenError(OSError):
    """A listener could not bind; the message names the address."""


def listen_error(where: tuple[str, int] | str, exc: OSError) -> ListenError:
    name = f"unix:{where}" if isinstance(where, str) else f"{where[0]}:{where[1]}"
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ListenError(f"cannot listen on {name}: {reason}")


class FrontEnd(abc.ABC):
    name: ClassVar[str]

    def __init__(self, pipeline: Pipeline, config: Config) -> None:
        self.pipeline = pipeline
        self.config = config

    @abc.abstractmethod
    async def start(self, where: tuple[str, int] | str, reuse_port: bool = False) -> None:
        """Listen on HOST:PORT or a Unix socket path; ListenError names the address."""

    @property
    @abc.abstractmethod
    def addresses(self) -> list[tuple[str, int]]:
        """The TCP addresses listened on (for port 0, the port chosen)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop accepting, finish the requests in flight, close idle keep-alive connections;
        whatever is still open after `--shutdown-timeout-s` is cut."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Client connection counters for /stats' `connections`."""


def front_end_class(name: str) -> type[FrontEnd]:
    return load(FRONT_ENDS, name, "HTTP front end")  # type: ignore[no-any-return]
