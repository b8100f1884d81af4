"""Group commit on the response side: hold a connection's response bytes until a commit.

With `--batch-ack flush` a client must not see its 302 before its increment is
in Redis. Suspending each handler until the flush confirms costs a future and an
extra task step per request. Instead the handler returns at once and the bytes
aiohttp writes for the response stay here until the flush that holds the
increment is confirmed (or fails, and the gateway fails open); only then do they
reach the socket. The client-visible guarantee is the same: a response on the
wire means the count is in Redis.

A `HeldTransport` wraps one client connection's transport; everything but
`write`, `writelines`, `close` and `write_eof` passes straight through. While it
holds, writes are buffered in order and a close or half-close waits for the
release. Commits are confirmed in sequence (one flush at a time), so when a
connection holds for a second commit before the first is released (HTTP
pipelining), it simply keeps holding until the later one: releasing the later
commit releases everything before it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Holder(Protocol):
    """A client connection that can keep response bytes back until a commit settles: a
    `HeldTransport` (aiohttp front end) or the own front end's connection protocol.

    `commit` is the commit it holds for (None when it holds nothing). For the holders
    `Pipeline.handle` is given (the front ends' client connections), `hold(commit)` is exactly:
    unless `commit` is already its commit, set it and join `commit.holders`. `handle` does that
    inline, so such a holder must not do more in `hold`."""

    commit: Commit | None

    def hold(self, commit: Commit) -> None: ...

    def release(self, commit: Commit) -> None: ...


class Commit(Protocol):
    """What a response can be held for: it lists its holders and releases them once settled."""

    holders: list[Holder]


class HeldTransport(asyncio.Transport):
    # Every method is spelled out rather than forwarded by __getattr__: a class with
    # __getattr__ routes every attribute access through a slower lookup hook, and
    # aiohttp reads `write` and `is_closing` on this object for every response.
    __slots__ = ("_buffer", "_close", "_eof", "_transport", "commit", "is_closing")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._buffer: list[bytes] = []
        self.commit: Commit | None = None
        self._close = False
        self._eof = False
        # Called before every write; the transport's own method spares a Python frame.
        self.is_closing = transport.is_closing  # type: ignore[method-assign]

    @property
    def holding(self) -> bool:
        return self.commit is not None

    def hold(self, commit: Commit) -> None:
        """Buffer what is written from now on until `commit` is released."""
        if self.commit is not commit:
            self.commit = commit
            commit.holders.append(self)

    def release(self, commit: Commit) -> None:
        """`commit` is settled: send what was held for it (and a close it delayed)."""
        if self.commit is not commit:
            return  # holding for a later commit now, which releases everything
        self.commit = None
        transport = self._transport
        buffer = self._buffer
        if transport.is_closing():
            buffer.clear()  # the client went away; nothing to deliver
            return
        if buffer:
            transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))
            buffer.clear()
        if self._eof:
            self._eof = False
            transport.write_eof()
        if self._close:
            transport.close()

    # -- what is held ------------------------------------------------------------------

    def write(self, data: Any) -> None:
        if self.commit is None:
            self._transport.write(data)
        else:
            # A copy only of what the writer might reuse (a bytearray, a memoryview).
            self._buffer.append(data if type(data) is bytes else bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        if self.commit is None:
            self._transport.close()
        else:
            self._close = True

    # -- passed through --------------------------------------------------------------

    def abort(self) -> None:
        self._transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._buffer))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        # Half-closing ends the response stream, so like close it waits for the held bytes.
        if self.commit is None:
            self._transport.write_eof()
        else:
            self._eof = True
