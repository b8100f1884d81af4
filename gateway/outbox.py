"""Writes deferred to the end of the loop iteration, then sent together.

A loopback (or LAN) send wakes the process that reads the other end. Written as
they are made, the responses of one loop iteration leave spread over its
processing, and a reader that went back to sleep between two of them is woken
again for each: in a VM every such wake-up of a process on another core is an
inter-processor interrupt, and the kernel's share of a request grows with it.
Deferred to the end of the iteration, the same writes (one per connection, as
before) leave back to back, and each reader is woken once for the lot. The
delay is the rest of the iteration that made them, and nothing more.

A `Deferred` (a client connection, an upstream connection) routes every write
through `queue_write`, so its bytes keep their order; it calls `flush_out` before it
closes its transport (a close after a write must not overtake it) and drops what
is pending when it aborts. Once it has closed its write side (`shut`, after
`write_eof`), nothing more is written: the transport would refuse it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

log = logging.getLogger("gateway")

# Pending bytes past which a writer writes at once: the transport's flow control (pause_writing
# at asyncio's default high-water mark, 64 KiB) must see a large output when it is made, or a
# client that does not read, or a body streamed from a fast upstream, would pile up here for the
# rest of the iteration (many reads of up to 256 KiB each) before anything pauses.
FLUSH_AT = 64 * 1024


class Outbox:
    """The writers with output pending in this iteration of one loop."""

    __slots__ = ("loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        # Weakly: the outbox is the loop's (`outbox`), and must not keep a closed loop alive.
        self.loop = weakref.ref(loop) if loop is not None else None
        self.pending: list[Deferred] = []

    def add(self, writer: Deferred) -> None:
        pending = self.pending
        if not pending:
            loop = self.loop() if self.loop is not None else None
            if loop is None or loop.is_closed():
                writer.flush_out()  # no iteration to wait for
                return
            # Runs after the callbacks of this iteration's events: once per iteration, not per write.
            loop.call_soon(self.flush)
        pending.append(writer)

    def flush(self) -> None:
        pending = self.pending
        self.pending = []
        for writer in pending:
            try:
                writer.flush_out()
            except Exception:  # a bug in one writer must not strand the others' output
                log.exception("deferred write failed")


#: The outbox of a front end not started on a loop (driven in memory by tests and benchmarks):
#: without a loop there is no iteration to wait for, so each write goes at once.
WRITE_NOW = Outbox(None)

_OUTBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()


def outbox(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The loop's outbox (one per loop: every writer on it shares the end-of-iteration flush)."""
    box = _OUTBOXES.get(loop)
    if box is None:
        box = _OUTBOXES[loop] = Outbox(loop)
    return box


class Deferred:
    """A protocol whose writes wait for the end of the loop iteration (`Outbox`)."""

    # Set by the protocol: its transport, its loop's outbox, what waits to be written, and
    # whether its write side is closed (write_eof: a write would raise).
    __slots__ = ("out", "out_bytes", "outbox", "shut", "transport")
    transport: asyncio.Transport | None
    outbox: Outbox
    out: list[bytes] | None
    out_bytes: int
    shut: bool

    def queue_write(self, data: bytes) -> None:
        out = self.out
        size = len(data)
        if out is None:
            if size >= FLUSH_AT:
                self.write_now(data)
                return
            self.out = [data]
            self.out_bytes = size
            self.outbox.add(self)
            return
        out.append(data)
        size = self.out_bytes = self.out_bytes + size
        if size >= FLUSH_AT:
            self.flush_out()

    def write_now(self, data: bytes) -> None:
        """Write at once, after what is pending: for writes that leave in a burst already (the
        responses a flush reply releases), which a deferral would only delay."""
        if self.out is not None:
            self.flush_out()
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.shut:
            transport.write(data)

    def flush_out(self) -> None:
        """Write what is pending now (the outbox's flush, or before a close)."""
        out = self.out
        if out is None:
            return
        self.out = None
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.shut:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
