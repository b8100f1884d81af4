"""Group commit on the response side: hold a connection's response bytes until a commit.

With `--batch-ack flush` a client must not see its 302 before its increment is
in Redis. Suspending each handler until the flush confirms costs a future and an
extra task step per request. Instead the handler returns at once and the bytes
aiohttp writes for the response stay here until the flush that holds the
increment is confirmed (or fails, and the gateway fails open); only then do they
reach the socket. The client-visible guarantee is the same: a response on the
wire means the count is in Redis.

A `HeldTransport` wraps one client connection's transport; everything but
`write`, `writelines` and `close` passes straight through. While it holds, writes
are buffered in order and a close waits for the release. Commits are confirmed
in sequence (one flush at a time), so when a connection holds for a second
commit before the first is released (HTTP pipelining), it simply keeps holding
until the later one: releasing the later commit releases everything before it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Commit(Protocol):
    """What a response can be held for: it lists its holders and releases them once settled."""

    holders: list[HeldTransport]


class HeldTransport:
    __slots__ = ("_buffer", "_close", "_commit", "_transport", "is_closing")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._buffer: list[bytes] = []
        self._commit: Commit | None = None
        self._close = False
        # Called before every write; the transport's own method spares a Python frame.
        self.is_closing = transport.is_closing

    @property
    def holding(self) -> bool:
        return self._commit is not None

    def hold(self, commit: Commit) -> None:
        """Buffer what is written from now on until `commit` is released."""
        if self._commit is not commit:
            self._commit = commit
            commit.holders.append(self)

    def release(self, commit: Commit) -> None:
        """`commit` is settled: send what was held for it (and a close it delayed)."""
        if self._commit is not commit:
            return  # holding for a later commit now, which releases everything
        self._commit = None
        transport = self._transport
        buffer = self._buffer
        if transport.is_closing():
            buffer.clear()  # the client went away; nothing to deliver
            return
        if buffer:
            transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))
            buffer.clear()
        if self._close:
            transport.close()

    # -- asyncio.Transport, as aiohttp uses it --------------------------------------

    def write(self, data: Any) -> None:
        if self._commit is None:
            self._transport.write(data)
        else:
            self._buffer.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        if self._commit is None:
            self._transport.close()
        else:
            self._close = True

    def __getattr__(self, name: str) -> Any:
        # abort, get_extra_info, pause_reading, resume_reading, set_write_buffer_limits, ...
        return getattr(self._transport, name)
