"""Batched (group commit): requests add to a per-key tally; a flusher applies
every tally in one atomic, idempotent step per window.

A request costs a dictionary update and an await (or no await with
`--batch-ack none`); the encode and parse are paid once per flush.

Invariants:
- Every increment accepted is either confirmed in Redis, held for retry, or
  counted as overflow: none is dropped silently, and none is applied twice.
- A flush is one EVAL of `FLUSH_SCRIPT` (EVALSHA once Redis has it; on NOSCRIPT,
  which means nothing ran, it is resent as EVAL) carrying a sequence number of this
  process. Redis applies it only if the number is above the last one it applied
  for this process, and records the number in the same atomic step (so it
  survives an AOF restart with the counts). A flush whose outcome is unknown
  (timeout, connection lost, Redis restarting) is therefore resent unchanged
  until confirmed: if Redis had applied it, the resend is a no-op.
- Flushes are sent one at a time, in sequence order; while one is unconfirmed,
  new increments accumulate in the next batch. Held keys are bounded by
  --batch-max-pending.
- A key whose INCRBY Redis rejects (WRONGTYPE, ...) is skipped inside the
  script, not retried (it would fail forever); its requests get the error.
- With `--batch-ack flush` (the default) a request is answered once the flush
  that holds its increment is confirmed, so a 302 means the count is in Redis;
  while Redis is unreachable requests are answered at once instead (failing
  open) and their increments wait for the retry. Two ways to wait: `incr()`
  suspends the request until then; `incr_held()` returns at once with the
  batch, and the gateway holds the response's bytes until the batch settles
  (`gateway.holding`), which spares each request a future and a task step.
  A settled batch reports its held requests through `on_held`.
- Close flushes everything still held (bounded by the shutdown timeout).
- With --limit, requests are decided here, without Redis (`decide_local`),
  from each client's limit state as the last confirmed flush returned it plus
  what this process allowed since. The flush (`flush_script`) applies the
  increments and the allowed counts and returns every flushed client's state,
  on Redis' clock. Between flushes each process decides alone: a client
  spread over N processes can get up to N times its remaining quota before the
  flush corrects it (docs/limits.md measures it). With --redis-cluster, each
  slot's flush carries its clients' limit keys (they share the slot). Local states of clients idle
  for a window are dropped, so their number stays bounded by the active ones.
- With --redis-cluster, a flush is one such EVAL per hash slot (a script's keys
  must share a slot), with a sequence marker per slot; the EVALs for one node
  leave in one write. Groups confirmed are dropped from the batch; the rest
  (node down, slot migrating: TRYAGAIN) is resent, same sequence number, until
  confirmed. MOVED and ASK are followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from functools import partial
from typing import Any

from .. import errors
from ..cluster import Direct, MuxNode
from ..config import RedisTarget
from ..errors import AccountingError
from ..histogram import LATENCY_BOUNDS, SIZE_BOUNDS, Histogram
from ..holding import Holder
from ..limit.algorithms import Algorithm, Decision
from ..limit.limiter import Limiter
from ..limit.scripts import Script, flush_script, limit_key
from ..multiplexer import Multiplexer
from ..resp import Reply, ReplyError, encode, encode_args
from ..slots import SlotTags, key_slot
from .base import HeldOutcome, OwnCodecBackend

log = logging.getLogger("gateway.batched")

_KeyErrors = dict[str, AccountingError] | None

# KEYS[1] holds the last sequence number applied for this process; KEYS[2..]
# are the counters, ARGV[1] the sequence number, ARGV[2] the marker's TTL,
# ARGV[3..] the amounts. Returns {applied, index, error, index, error, ...}.
FLUSH_SCRIPT = """
local seq = tonumber(ARGV[1])
if seq <= tonumber(redis.call('GET', KEYS[1]) or '0') then
  return {0}
end
local out = {1}
for i = 2, #KEYS do
  local r = redis.pcall('INCRBY', KEYS[i], ARGV[i + 1])
  if type(r) == 'table' and r.err then
    out[#out + 1] = i - 1
    out[#out + 1] = r.err
  end
end
redis.call('SET', KEYS[1], seq, 'EX', ARGV[2])
return out
"""
SEQ_TTL_S = 86400
FLUSH_SHA = hashlib.sha1(FLUSH_SCRIPT.encode()).hexdigest()


class _Batch:
    __slots__ = ("allowed", "answered", "counts", "held", "held_since", "holders", "seq", "waiters")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        # With --limit: per key, the requests allowed locally (the quota they use).
        self.allowed: dict[str, int] = {}
        self.waiters: list[asyncio.Future[_KeyErrors]] = []
        self.seq = 0  # given when the batch is first sent, kept across resends
        # Responses held until this batch settles (incr_held): their connections, their
        # number, and when the first was held.
        self.holders: list[Holder] = []
        self.held = 0
        self.held_since = 0.0
        # Increments (per key) whose requests were already answered without being held:
        # counts[key] - answered[key] is what a refused key's held requests number.
        self.answered: dict[str, int] | None = None


def _noscript(reply: Reply) -> bool:
    return isinstance(reply, ReplyError) and reply.prefix == "NOSCRIPT"


class BatchedBackend(OwnCodecBackend):
    name = "batched"
    decides_locally = True
    _limiter: Limiter | None = None

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.holds_responses = config.batch_ack == "flush"
        self.adds_at_once = config.batch_ack == "none"
        self.task_free = True  # an acknowledged increment waits on its batch's future, nothing else

    async def start(self) -> None:
        c = self.config
        self._loop = asyncio.get_running_loop()
        self.mux: Multiplexer | None = None
        self._tags = SlotTags()
        self._cluster_flush: asyncio.Task[None] | None = None
        self._window = c.batch_window_ms / 1000
        self._max_keys = c.batch_max_keys
        self._max_pending = c.batch_max_pending
        self._ack = c.batch_ack == "flush"
        # One marker key per process: its sequence numbers are its own.
        self.seq_key = f"gateway:batch-seq:{uuid.uuid4().hex}"
        self._seq = 0
        self._batch = _Batch()
        self._inflight: _Batch | None = None
        self._unconfirmed: _Batch | None = None
        self._timer: asyncio.Handle | None = None
        self._timer_when = 0.0
        self._retry_at = 0.0
        self._backoff = 0.0
        self.failing = False
        self._closed = False
        self._stopped = False
        self._sha_known = False
        self.flushes = 0
        self.flush_failures = 0
        self.flushed_increments = 0
        self.duplicate_flushes = 0
        self.overflow = 0
        self.last_flush_keys = 0
        self.last_flush_ms = 0.0
        self.flush_keys = Histogram(SIZE_BOUNDS)
        self.flush_latency = Histogram(LATENCY_BOUNDS)
        if c.cluster:
            await self._start_cluster(lambda t: MuxNode(self._mux(t), c.connect_timeout))
        else:
            self.mux = self._mux(c.redis)
            self.redis = Direct(MuxNode(self.mux, c.connect_timeout))
            await self.mux.start(wait=c.connect_timeout)

    def _mux(self, target: RedisTarget) -> Multiplexer:
        c = self.config
        mux = Multiplexer(
            target,
            connections=1,
            connect_timeout=c.connect_timeout,
            command_timeout=c.command_timeout,
            lifecycle=c.lifecycle,
        )
        mux.on_connected = self._connected
        return mux

    def _connected(self) -> None:
        """A shared connection came (back) up: a flush waiting out its retry delay goes now, so
        counting resumes as soon as Redis answers rather than up to a backoff later."""
        if not self.failing or self._inflight is not None or self._stopped:
            return
        self._retry_at = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._schedule(0.0)

    # -- limits -------------------------------------------------------------------

    def start_limiting(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._algo: Algorithm[Any] = limiter.algorithm
        self._flush_limits: Script = flush_script(limiter.algorithm_name)
        # Client key -> limit state as this process knows it (Redis' at the last flush + own since).
        self._states: dict[str, Any] = {}
        # Redis' clock minus this host's, from the last flush reply (half a round trip's error).
        self._clock_offset = 0.0
        self._pruned_at = 0.0

    def decide_local(self, key: str) -> Decision:
        algo = self._algo
        states = self._states
        now = time.time() + self._clock_offset
        decision, state = algo.decide(states.get(key, algo.empty), now)
        if decision.allowed:
            states[key] = state
            allowed = self._batch.allowed
            allowed[key] = allowed.get(key, 0) + 1
        return decision

    def _limit_args(self, batch: _Batch, keys: list[str], seq_key: str) -> tuple[object, ...]:
        """The flush script's arguments after its name: KEYS (marker, then each client's two
        keys, which share its slot) and ARGV (the rate, the sequence, each client's amounts)."""
        assert self._limiter is not None
        name = self._limiter.algorithm_name
        pairs: list[object] = []
        amounts: list[object] = []
        for key in keys:
            pairs += (key, limit_key(key, name))
            amounts += (batch.counts[key], batch.allowed.get(key, 0))
        return (2 * len(keys) + 1, seq_key, *pairs, *self._limiter.args, batch.seq, SEQ_TTL_S, *amounts)

    def _read_limit_reply(self, reply: Reply, keys: list[str]) -> dict[str, AccountingError]:
        """The keys Redis refused, after taking in every flushed client's limit state."""
        if isinstance(reply, ReplyError):
            raise AccountingError(errors.reply_error_kind(reply.prefix), str(reply))
        if (
            not isinstance(reply, list)
            or len(reply) != 4
            or not isinstance(reply[0], int)
            or not isinstance(reply[1], int)
            or not isinstance(reply[2], list)
            or not isinstance(reply[3], list)
            or len(reply[3]) != len(keys)
        ):
            raise AccountingError(errors.PROTOCOL, f"flush answered {reply!r}")
        redis_now = reply[1] / 1_000_000
        local_now = time.time()
        self._clock_offset = redis_now - local_now
        algo, states, pending = self._algo, self._states, self._batch.allowed
        for key, values in zip(keys, reply[3], strict=True):
            if not isinstance(values, list) or not all(type(v) is int for v in values):
                raise AccountingError(errors.PROTOCOL, f"flush answered state {values!r}")
            if not values:
                # Its limit state could not be read (the error is in reply[2]): decided from
                # nothing here, as a client new to the gateway is, until it can be read again.
                states.pop(key, None)
                continue
            state = algo.from_reply(values)  # type: ignore[arg-type]
            n = pending.get(key)  # allowed here since this batch left: not in Redis' state yet
            states[key] = algo.add(state, redis_now, n) if n else state
        if local_now - self._pruned_at > 1.0:
            self._pruned_at = local_now
            for key in [k for k, st in states.items() if algo.idle(st, redis_now) and k not in pending]:
                del states[key]
        errs = reply[2]
        return self._read_flush_reply([reply[0], *errs], keys)

    # -- request path ---------------------------------------------------------

    def _add(self, key: str) -> _Batch:
        """Add 1 to `key` in the filling batch, and return it. A key new to the batch is
        bounded by --batch-max-pending and may start a flush."""
        batch = self._batch
        counts = batch.counts
        n = counts.get(key)
        if n is not None:
            counts[key] = n + 1
            return batch
        if self._closed:
            raise AccountingError(errors.UNAVAILABLE, "gateway is shutting down")
        held = self._held_keys()
        if held >= self._max_pending:
            self.overflow += 1
            raise AccountingError(errors.OVERFLOW, f"{held} keys already held for Redis; increment dropped")
        counts[key] = 1
        if len(counts) >= self._max_keys:
            self._schedule(0.0)
        elif self._timer is None:
            self._schedule(self._window)
        return batch

    def incr_held(self, key: str) -> _Batch:
        """Add 1 to `key` without waiting: the batch whose settling the response must wait for.

        Raises AccountingError like `incr` (DEFERRED while Redis is unreachable: the
        increment is held for retry and the response need not wait).
        """
        batch = self._batch
        counts = batch.counts
        n = counts.get(key)
        if n is not None and batch.held and not self.failing:
            # The usual request under load: its key and a held response are in the batch already
            # (this line runs for every request: `_add` and the rest below, inlined).
            counts[key] = n + 1
            batch.held += 1
            return batch
        batch = self._add(key)
        if self.failing:
            answered = batch.answered
            if answered is None:
                answered = batch.answered = {}
            answered[key] = answered.get(key, 0) + 1
            raise AccountingError(errors.DEFERRED, "Redis unreachable; increment held for retry")
        if not batch.held:
            batch.held_since = time.perf_counter()
        batch.held += 1
        return batch

    def incr_now(self, key: str) -> None:
        """--batch-ack none: the increment joins the filling batch; the answer need not wait."""
        self._add(key)

    async def incr(self, key: str) -> None:
        batch = self._add(key)
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

    def hurry(self) -> None:
        # Responses held for a flush are part of the drain: flush at once from now on rather
        # than after --batch-window-ms, so the drain does not wait out the window.
        self._window = 0.0
        batch = getattr(self, "_batch", None)  # None if the gateway stops before it started
        if batch is not None and batch.counts:
            self._schedule(0.0)

    def _held_keys(self) -> int:
        held = len(self._batch.counts)
        if self._inflight is not None:
            held += len(self._inflight.counts)
        if self._unconfirmed is not None and self._unconfirmed is not self._inflight:
            held += len(self._unconfirmed.counts)
        return held

    # -- flushing ---------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._stopped:
            return  # closed: what is still held was reported as lost
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
        if self._inflight is not None:
            return
        if self._unconfirmed is not None:
            batch = self._unconfirmed  # resent unchanged, same sequence number
        elif self._batch.counts:
            batch, self._batch = self._batch, _Batch()
            self._seq += 1
            batch.seq = self._seq
        else:
            return
        if self.mux is None:
            self._inflight = batch
            self._cluster_flush = asyncio.create_task(self._flush_cluster(batch))
            return
        keys = list(batch.counts)
        if self._limiter is not None:
            script = self._flush_limits
            head = ("EVALSHA", script.sha) if self._sha_known else ("EVAL", script.body)
            command = (*head, *self._limit_args(batch, keys, self.seq_key))
        else:
            command = (*self._script(), len(keys) + 1, self.seq_key, *keys, batch.seq, SEQ_TTL_S,
                       *(batch.counts[k] for k in keys))  # fmt: skip
        try:
            # One write now: the batch is this tick's coalesced write already.
            fut = self.mux.connection().send_packed(encode_args(command), now=True)[0]
        except AccountingError as exc:
            self._flush_failed(batch, exc)
            self._reschedule()
            return
        self._inflight = batch
        fut.add_done_callback(partial(self._flush_done, batch, keys, time.perf_counter()))

    def _flush_done(self, batch: _Batch, keys: list[str], started: float, fut: asyncio.Future[Reply]) -> None:
        self._inflight = None
        try:
            exc = fut.exception()
            if exc is not None:
                err = exc if isinstance(exc, AccountingError) else AccountingError(errors.INTERNAL, repr(exc))
                self._flush_failed(batch, err)
                return
            reply = fut.result()
            if _noscript(reply):
                # Script cache empty (Redis restarted, SCRIPT FLUSH): nothing ran. Resend at once
                # with the script itself, which loads it again; not a failure.
                self._sha_known = False
                self._unconfirmed = batch
                return
            self._sha_known = True
            try:
                if self._limiter is not None:
                    key_errors = self._read_limit_reply(reply, keys)
                else:
                    key_errors = self._read_flush_reply(reply, keys)
            except AccountingError as err:
                self._flush_failed(batch, err)
                return
            self.flushed_increments += sum(batch.counts[k] for k in keys if k not in key_errors)
            refused = {k: batch.counts[k] for k in key_errors}
            self._confirmed(batch, len(keys), key_errors, refused, started)
        finally:
            self._reschedule()

    def _confirmed(
        self,
        batch: _Batch,
        nkeys: int,
        key_errors: dict[str, AccountingError],
        refused: dict[str, int],
        started: float,
    ) -> None:
        """`refused` is the increments per key in `key_errors`."""
        if self.failing:
            log.warning("batched: Redis reachable again; held increments flushed")
        self.failing = False
        self._unconfirmed = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self.flushes += 1
        self.last_flush_keys = nkeys
        elapsed = time.perf_counter() - started
        self.last_flush_ms = elapsed * 1000
        self.flush_keys.observe(nkeys)
        self.flush_latency.observe(elapsed)
        result = key_errors or None
        for waiter in batch.waiters:
            if not waiter.done():
                waiter.set_result(result)
        batch.waiters.clear()
        if batch.held:
            answered = batch.answered or {}
            self._release(batch, None, [(err, refused[k] - answered.get(k, 0)) for k, err in key_errors.items()])

    def _release(
        self, batch: _Batch, deferred: AccountingError | None, refused: list[tuple[AccountingError, int]]
    ) -> None:
        """Send the responses held for `batch` and report how their requests ended."""
        for holder in batch.holders:
            holder.release(batch)
        batch.holders.clear()
        n = batch.held
        if not n:
            return
        batch.held = 0
        if deferred is not None:
            # Its held requests are answered now; what it still counts was answered already.
            batch.answered = dict(batch.counts)
        if self.on_held is not None:
            self.on_held(
                HeldOutcome(n, time.perf_counter() - batch.held_since, deferred, [r for r in refused if r[1] > 0])
            )

    # -- cluster flushing -------------------------------------------------------------

    async def _flush_cluster(self, batch: _Batch) -> None:
        started = time.perf_counter()
        try:
            assert self.router is not None
            nkeys = len(batch.counts)
            groups: dict[int, list[str]] = {}
            for key in batch.counts:
                groups.setdefault(key_slot(key), []).append(key)
            # Concurrent sends: each node's multiplexer puts one tick's EVALs in one write.
            outcomes = await asyncio.gather(
                *(self._flush_group(slot, keys, batch) for slot, keys in groups.items()), return_exceptions=True
            )
            key_errors: dict[str, AccountingError] = {}
            refused: dict[str, int] = {}
            failure: AccountingError | None = None
            for keys, outcome in zip(groups.values(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if failure is None:
                        failure = (
                            outcome
                            if isinstance(outcome, AccountingError)
                            else AccountingError(errors.INTERNAL, repr(outcome))
                        )
                    continue
                key_errors.update(outcome)
                # Confirmed: off the batch, so a resend carries only what is still unconfirmed.
                for key in keys:
                    n = batch.counts.pop(key)
                    if key in outcome:
                        refused[key] = n
                    else:
                        self.flushed_increments += n
            if batch.counts:
                self._flush_failed(batch, failure or AccountingError(errors.INTERNAL, "flush incomplete"))
            else:
                self._confirmed(batch, nkeys, key_errors, refused, started)
        finally:
            self._inflight = None
            self._reschedule()

    async def _flush_group(self, slot: int, keys: list[str], batch: _Batch) -> dict[str, AccountingError]:
        """One slot's EVAL; the keys Redis refused, or AccountingError if nothing is confirmed."""
        assert self.router is not None
        seq_key = f"{self.seq_key}:{{{self._tags.tag(slot)}}}"
        if self._limiter is not None:
            script = self._flush_limits
            limit_args = self._limit_args(batch, keys, seq_key)
            reply = await self.router.execute(slot, encode("EVALSHA", script.sha, *limit_args))
            if _noscript(reply):
                reply = await self.router.execute(slot, encode("EVAL", script.body, *limit_args))
            return self._read_limit_reply(reply, keys)
        args = (len(keys) + 1, seq_key, *keys, batch.seq, SEQ_TTL_S, *(batch.counts[k] for k in keys))
        reply = await self.router.execute(slot, encode("EVALSHA", FLUSH_SHA, *args))
        if _noscript(reply):  # this node has not seen the script yet: nothing ran
            reply = await self.router.execute(slot, encode("EVAL", FLUSH_SCRIPT, *args))
        return self._read_flush_reply(reply, keys)

    def _script(self) -> tuple[str, str]:
        """EVALSHA once Redis has the script (fewer bytes, no hashing of the body per flush)."""
        return ("EVALSHA", FLUSH_SHA) if self._sha_known else ("EVAL", FLUSH_SCRIPT)

    def _read_flush_reply(self, reply: Reply, keys: list[str]) -> dict[str, AccountingError]:
        """The keys Redis refused; AccountingError if the flush as a whole was not applied."""
        if isinstance(reply, ReplyError):
            # Redis refused the whole script (READONLY, OOM, NOAUTH, TRYAGAIN, ...): nothing was applied.
            raise AccountingError(errors.reply_error_kind(reply.prefix), str(reply))
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
            raise AccountingError(errors.PROTOCOL, f"flush answered {reply!r}")
        key_errors: dict[str, AccountingError] = {}
        for i in range(1, len(reply) - 1, 2):
            index, message = reply[i], reply[i + 1]
            if not isinstance(index, int) or not 1 <= index <= len(keys):
                raise AccountingError(errors.PROTOCOL, f"flush answered {reply!r}")
            text = message.decode() if isinstance(message, bytes) else str(message)
            key_errors[keys[index - 1]] = AccountingError(errors.reply_error_kind(text.split(" ", 1)[0]), text)
        if reply[0] == 0:
            self.duplicate_flushes += 1  # applied by an earlier send whose reply was lost
        return key_errors

    def _reschedule(self) -> None:
        if self._unconfirmed is not None or self._batch.counts:
            self._schedule(self._window)

    def _flush_failed(self, batch: _Batch, exc: AccountingError) -> None:
        self.flush_failures += 1
        if not self.failing:
            log.warning("batched: flush failed (%s); increments held and retried with backoff", exc)
        self.failing = True
        self._unconfirmed = batch
        self._backoff = min(max(self._backoff * 2, 0.05), 1.0)
        self._retry_at = self._loop.time() + self._backoff
        deferred = AccountingError(errors.DEFERRED, f"flush failed ({exc}); increment held for retry")
        # The batch now filling waits behind this one: its requests are answered now too.
        for held in (batch, self._batch):
            self._answer_now(held, deferred)

    def _answer_now(self, batch: _Batch, err: AccountingError) -> None:
        """Everyone waiting on `batch` gets `err` now (fail open); the increments stay held."""
        for waiter in batch.waiters:
            if not waiter.done():
                waiter.set_exception(err)
        batch.waiters.clear()
        self._release(batch, err, [])

    # -- admin and lifecycle ------------------------------------------------------

    def _batches(self) -> list[_Batch]:
        """The filling batch, the one in flight and the one awaiting retry, each once."""
        out = [self._batch]
        for b in (self._inflight, self._unconfirmed):
            if b is not None and all(b is not o for o in out):
                out.append(b)
        return out

    @property
    def pending_increments(self) -> int:
        return sum(sum(b.counts.values()) for b in self._batches())

    def _pending(self) -> bool:
        return bool(self._batch.counts) or self._inflight is not None or self._unconfirmed is not None

    def stats(self) -> dict[str, Any]:
        return {
            **self.redis.stats(),
            "pending_keys": self._held_keys(),
            "pending_increments": self.pending_increments,
            "flushes": self.flushes,
            "flush_failures": self.flush_failures,
            "duplicate_flushes": self.duplicate_flushes,
            "flushed_increments": self.flushed_increments,
            "overflow": self.overflow,
            "last_flush_keys": self.last_flush_keys,
            "last_flush_ms": round(self.last_flush_ms, 3),
            "flush_keys": self.flush_keys.snapshot(),
            "flush_latency_s": self.flush_latency.snapshot(),
            "failing": self.failing,
        }

    async def close(self) -> None:
        """Flush what is held, retrying until the shutdown timeout, then disconnect."""
        if self._closed:
            return
        self._closed = True
        deadline = self._loop.time() + self.config.shutdown_timeout_s
        while self._pending() and self._loop.time() < deadline:
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
            unconfirmed = AccountingError(errors.DEFERRED, "shutting down before Redis confirmed the increment")
            for batch in self._batches():
                self._answer_now(batch, unconfirmed)
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        await self.redis.close()
