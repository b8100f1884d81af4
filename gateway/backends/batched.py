"""Batched (group commit): requests add to a per-key tally; a flusher sends one
pipeline of `INCRBY key n` per window.

A request costs a dictionary update and an await (or no await with
`--batch-ack none`); the encode and parse are paid once per key per flush.

Invariants:
- Every increment accepted is either confirmed in Redis, held for retry, or
  counted as overflow: none is dropped silently. A flush that fails as a whole
  (Redis down, connection lost, timeout) puts its tallies back and is retried
  with backoff; held keys are bounded by --batch-max-pending.
- A key whose INCRBY Redis rejects (WRONGTYPE, ...) is not retried: that would
  fail forever. Its requests get the error; it is counted by kind.
- With `--batch-ack flush` (the default) a request is answered once the flush
  that holds its increment is confirmed, so a 302 means the count is in Redis;
  while Redis is unreachable requests are answered at once instead, failing open,
  and their increments wait in the retry tally.
- Close flushes everything still held (bounded by the shutdown timeout).

A flush that timed out may have been applied by Redis before its reply was
lost; retrying it then counts those requests twice. That is the one case where
counts can run high, never low, and only for a flush cut off mid-flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .. import errors
from ..errors import AccountingError
from ..multiplexer import Multiplexer
from ..resp import Reply, ReplyError, encode
from .base import Backend

log = logging.getLogger("gateway.batched")

_KeyErrors = dict[str, AccountingError] | None


class _Batch:
    __slots__ = ("counts", "waiters")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.waiters: list[asyncio.Future[_KeyErrors]] = []


class BatchedBackend(Backend):
    name = "batched"

    async def start(self) -> None:
        c = self.config
        self._loop = asyncio.get_running_loop()
        self.mux = Multiplexer(
            c.redis,
            connections=1,
            connect_timeout=c.connect_timeout,
            command_timeout=c.command_timeout,
            dedicated_pool_size=c.pool_size,
            dedicated_wait=c.pool_wait,
        )
        self._window = c.batch_window_ms / 1000
        self._max_keys = c.batch_max_keys
        self._max_pending = c.batch_max_pending
        self._ack = c.batch_ack == "flush"
        self._batch = _Batch()
        self._inflight: _Batch | None = None
        self._timer: asyncio.Handle | None = None
        self._timer_when = 0.0
        self._retry_at = 0.0
        self._backoff = 0.0
        self.failing = False
        self._closed = False
        self.flushes = 0
        self.flush_failures = 0
        self.flushed_increments = 0
        self.overflow = 0
        self.last_flush_keys = 0
        self.last_flush_ms = 0.0
        await self.mux.start(wait=c.connect_timeout)

    # -- request path ---------------------------------------------------------

    async def incr(self, key: str) -> None:
        batch = self._batch
        counts = batch.counts
        n = counts.get(key)
        if n is None:
            if self._closed:
                raise AccountingError(errors.UNAVAILABLE, "gateway is shutting down")
            held = len(counts) + (len(self._inflight.counts) if self._inflight else 0)
            if held >= self._max_pending:
                self.overflow += 1
                raise AccountingError(errors.OVERFLOW, f"{held} keys already held for Redis; increment dropped")
            counts[key] = 1
            if len(counts) >= self._max_keys:
                self._schedule(0.0)
            elif self._timer is None:
                self._schedule(self._window)
        else:
            counts[key] = n + 1
        if not self._ack:
            return None
        if self.failing:
            raise AccountingError(errors.DEFERRED, "Redis unreachable; increment held for retry")
        fut: asyncio.Future[_KeyErrors] = self._loop.create_future()
        batch.waiters.append(fut)
        key_errors = await fut
        if key_errors and key in key_errors:
            raise key_errors[key]
        return None

    # -- flushing ---------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._inflight is not None:
            return  # the flush in flight reschedules when it completes
        now = self._loop.time()
        when = max(now + delay, self._retry_at)
        if self._timer is not None:
            if self._timer_when <= when:
                return
            self._timer.cancel()
        self._timer_when = when
        # A zero window means "end of this loop tick": call_soon is far cheaper than a timer.
        if when <= now:
            self._timer = self._loop.call_soon(self._start_flush)
        else:
            self._timer = self._loop.call_at(when, self._start_flush)

    def _start_flush(self) -> None:
        # Callbacks, not a task: a flush is one write and one done-callback.
        self._timer = None
        if self._inflight is not None or not self._batch.counts:
            return
        batch, self._batch = self._batch, _Batch()
        keys = list(batch.counts)
        try:
            conn = self.mux.connection()
            data = b"".join([encode("INCRBY", k, batch.counts[k]) for k in keys])
            futs = conn.send_packed(data, len(keys))
        except AccountingError as exc:
            self._flush_failed(batch, exc)
            self._reschedule()
            return
        self._inflight = batch
        started = time.perf_counter()
        # Replies come in order: the last one done means all are.
        futs[-1].add_done_callback(lambda _: self._flush_done(batch, keys, futs, started))

    def _flush_done(self, batch: _Batch, keys: list[str], futs: list[asyncio.Future[Reply]], started: float) -> None:
        self._inflight = None
        try:
            exc = futs[-1].exception()
            if exc is not None:
                err = exc if isinstance(exc, AccountingError) else AccountingError(errors.INTERNAL, repr(exc))
                self._flush_failed(batch, err)
                return
            key_errors: dict[str, AccountingError] = {}
            for key, fut in zip(keys, futs, strict=True):
                reply = fut.result()
                if isinstance(reply, ReplyError):
                    key_errors[key] = AccountingError(errors.reply_error_kind(reply.prefix), str(reply))
            if self.failing:
                log.warning("batched: Redis reachable again; held increments flushed")
            self.failing = False
            self._backoff = 0.0
            self._retry_at = 0.0
            self.flushes += 1
            self.flushed_increments += sum(batch.counts[k] for k in keys if k not in key_errors)
            self.last_flush_keys = len(keys)
            self.last_flush_ms = (time.perf_counter() - started) * 1000
            result = key_errors or None
            for fut in batch.waiters:
                if not fut.done():
                    fut.set_result(result)
        finally:
            self._reschedule()

    def _reschedule(self) -> None:
        if self._batch.counts:
            self._schedule(self._window)

    def _flush_failed(self, batch: _Batch, exc: AccountingError) -> None:
        self.flush_failures += 1
        if not self.failing:
            log.warning("batched: flush failed (%s); increments held and retried with backoff", exc)
        self.failing = True
        # Put the tallies back into the batch now filling, so nothing is lost.
        counts = self._batch.counts
        for key, n in batch.counts.items():
            counts[key] = counts.get(key, 0) + n
        self._backoff = min(max(self._backoff * 2, 0.05), 1.0)
        self._retry_at = self._loop.time() + self._backoff
        deferred = AccountingError(errors.DEFERRED, f"flush failed ({exc}); increment held for retry")
        for fut in batch.waiters:
            if not fut.done():
                fut.set_exception(deferred)

    # -- admin and lifecycle ------------------------------------------------------

    @property
    def pending_increments(self) -> int:
        held = sum(self._batch.counts.values())
        if self._inflight is not None:
            held += sum(self._inflight.counts.values())
        return held

    async def ping(self) -> None:
        await self.mux.execute("PING")

    def stats(self) -> dict[str, Any]:
        return {
            **self.mux.stats(),
            "pending_keys": len(self._batch.counts) + (len(self._inflight.counts) if self._inflight else 0),
            "pending_increments": self.pending_increments,
            "flushes": self.flushes,
            "flush_failures": self.flush_failures,
            "flushed_increments": self.flushed_increments,
            "overflow": self.overflow,
            "last_flush_keys": self.last_flush_keys,
            "last_flush_ms": round(self.last_flush_ms, 3),
            "failing": self.failing,
        }

    async def close(self) -> None:
        """Flush what is held, retrying until the shutdown timeout, then disconnect."""
        if self._closed:
            return
        self._closed = True
        deadline = self._loop.time() + self.config.shutdown_timeout_s
        while (self._batch.counts or self._inflight is not None) and self._loop.time() < deadline:
            if self._inflight is None:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._retry_at = min(self._retry_at, self._loop.time() + 0.2)
                self._schedule(0.0)
            await asyncio.sleep(0.01)
        lost = self.pending_increments
        if lost:
            log.error("batched: %d increments could not be flushed to Redis before shutdown", lost)
        if self._timer is not None:
            self._timer.cancel()
        await self.mux.close()
