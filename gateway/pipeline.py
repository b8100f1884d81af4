"""The request path, independent of any HTTP front end.

    request facts -> client IP -> accounting -> policy -> action -> response description
    request facts -> client IP -> accounting + limit -> policy -> action | 429    (with --limit)

A front end (gateway.http) parses bytes into facts (path, peer, X-Forwarded-For)
and turns the `Response` it gets back into bytes; nothing here imports an HTTP
library, so every front end runs exactly this path and the benchmark compares
front ends, not rules.

With `--upstream` the action is the proxy (`gateway.actions.proxy`): the front end
calls `forward()` at the end of the request head instead, which runs the same
client-IP and accounting steps and then hands the exchange to the proxy.

`handle()` returns a `Response` when the answer is known at once (calibration, a
client without an address, batched) and otherwise an awaitable of one (a Redis
round trip): a `Pending` when the backend takes the increment on callbacks (`raw`
and `multiplexed` on one server: the reply, read by the connection, decides the
answer and tells the front end), else a coroutine. Batched is called without
waiting: with `--batch-ack none` nothing waits for the increment (`incr_now`);
with `--batch-ack flush` the front end's `holder` keeps the response's bytes
until the flush holding the increment settles (`_held_settled` then counts
those requests).

With `--limit`, `handle` hands every request to `handle_limited` (one test of
an attribute on the unlimited path). The limit step is one script
per request (the increment, the window and the decision in one round trip,
`gateway.limit`), or in batched mode a local decision from the state the last
flush returned (`Backend.decide_local`). An allowed request goes on to the
action; a limited one gets 429 with Retry-After and the RateLimit fields.

Owns the counters behind /stats' `requests` and `failures` and the failure
policy: when accounting fails the request is let through (`allow`, the
default) or answered 503 (`deny`); each failure is counted by kind and logged
once per burst. An accounting failure never escapes as a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from functools import lru_cache
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

from . import errors
from .accounting import read_incr_reply
from .backends.base import Backend, HeldOutcome
from .backends.batched import BatchedBackend
from .client_ip import ClientIPResolver
from .config import Config
from .errors import AccountingError
from .faultlog import FailureLog
from .histogram import LATENCY_BOUNDS, Histogram
from .holding import Holder
from .limit.algorithms import Decision
from .limit.limiter import Limiter
from .resp import Reply

if TYPE_CHECKING:
    from .actions.proxy import Exchange, Proxy

log = logging.getLogger("gateway")

T = TypeVar("T")

_TEXT = ("Content-Type", "text/plain; charset=utf-8")
_LIMITED = b"too many requests\n"


class Response:
    """What to answer, without the framing: status, extra header fields, body.

    Front ends cache their encoding of the shared responses below by identity, so
    a request that gets one of them costs no allocation here.
    """

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def with_header(self, name: str, value: str) -> Response:
        return Response(self.status, self.reason, (*self.headers, (name, value)), self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.headers!r}, {self.body!r})"


def request_path(target: str) -> str:
    """The path of a request target: origin form (`/a?b`), absolute form, or `*`."""
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if sep and scheme.isalpha():
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
    query = target.find("?")
    if query >= 0:
        target = target[:query]
    if "%" in target:
        target = unquote(target)
    return target


class Pending:
    """An answer waiting on one increment's reply, on callbacks alone (`Backend.incr_then`).

    The reply's slot on the Redis connection (`gateway.connection.ReplySlot`): the reply,
    as the connection reads it, decides the response exactly as `Pipeline._account` would,
    and the response goes to `notify` (the own front end's) or to whoever awaits this
    object (the aiohttp front end). No coroutine, no Task, no future on the usual path.
    """

    __slots__ = ("_waiter", "notify", "path", "pipeline", "response", "started")

    def __init__(self, pipeline: Pipeline, path: str) -> None:
        self.pipeline = pipeline
        self.path = path
        self.started = perf_counter()
        #: Set once the reply (or the failure) came; it may come before `handle` returns.
        self.response: Response | None = None
        self.notify: Callable[[Response], None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- the reply slot (gateway.connection.ReplySlot) ----------------------------------

    def done(self) -> bool:
        return self.response is not None

    def exception(self) -> BaseException | None:
        return None

    def set_result(self, reply: Reply) -> None:
        if type(reply) is int:
            self._settle(reply, None, None)
            return
        try:
            read_incr_reply(reply)
        except AccountingError as err:
            self._settle(None, err, None)

    def set_exception(self, exc: BaseException) -> None:
        if isinstance(exc, AccountingError):
            self._settle(None, exc, None)
        else:
            self._settle(None, AccountingError(errors.INTERNAL, repr(exc)), exc)

    def _settle(self, value: int | None, failure: AccountingError | None, cause: BaseException | None) -> None:
        # Runs inside the Redis connection's read: nothing may escape into it.
        try:
            response = self.response = self.pipeline._outcome(self.path, self.started, value, failure, cause)
            notify = self.notify
            if notify is not None:
                notify(response)
            elif self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        except Exception:
            log.exception("request path failed after its reply")

    def __await__(self) -> Generator[Any, None, Response]:
        if self.response is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            yield from waiter.__await__()
        assert self.response is not None
        return self.response


class Pipeline:
    def __init__(self, config: Config, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.resolver = ClientIPResolver(config.trusted_proxies)
        peer_ip = self.resolver.peer
        prefix = config.key_prefix

        def peer_key(peer: str) -> str | None:
            ip = peer_ip(peer)
            return None if ip is None else prefix + ip

        # A peer's Redis key, cached: the same string object for every request from that peer,
        # so the batch's dictionary finds it without hashing or comparing a new string.
        self._peer_key = lru_cache(maxsize=4096)(peer_key)
        #: Whether a front end needs to collect X-Forwarded-For at all.
        self.uses_forwarded_for = bool(config.trusted_proxies)
        self._prefix = config.key_prefix
        self._target = config.target
        self._deny = config.on_redis_error == "deny"
        self._uses_redis = backend.uses_redis
        self._count_header = config.count_header
        # The action's answers, shared by every request that gets them.
        self.redirect = Response(302, "Found", (("Location", config.target),))
        self.target_ok = Response(200, "OK", (("Content-Type", "text/plain; charset=utf-8"),), b"ok\n")
        self.denied = Response(
            503,
            "Service Unavailable",
            (("Retry-After", str(config.retry_after_s)), ("Content-Type", "text/plain; charset=utf-8")),
            b"request accounting unavailable\n",
        )
        # Responses wait for their flush without their handler waiting; a deny policy must
        # know the outcome before it picks the response, so it keeps the await.
        self.holds = backend.holds_responses and not self._deny
        # The backend again, typed as batched's when it is: a call through `Backend` looks the
        # method up by name on every request (about 850 instructions), a call on this is native.
        self._batched = backend if isinstance(backend, BatchedBackend) else None
        #: The proxy action, when upstreams are configured (set by the gateway); else the redirect.
        self.proxy: Proxy | None = None
        #: The awaitable `handle` returns needs no asyncio Task (see Backend.task_free).
        self.task_free = backend.task_free
        self._incr_then = backend.incr_then if backend.replies_on_callbacks else None
        # Increments that nothing waits for (batched, --batch-ack none): added in line, answered
        # at once, without the coroutine `_account` would cost.
        self._adds_at_once = backend.adds_at_once
        self.requests = 0
        # Requests whose accounting waited on callbacks (a Pending), and on a coroutine (`_account`,
        # `_account_limited`, `_account_decided`, `_account_then_forward`).
        self.via_callbacks = 0
        self.via_coroutine = 0
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
        if self.holds:
            backend.on_held = self._held_settled
        self.limiter: Limiter | None = None
        if config.limit is not None:
            self.limiter = Limiter(config.limit, config.limit_algorithm)
            self._limit_headers = config.limit_headers
            self._decides_locally = backend.decides_locally
            if self._decides_locally:
                backend.start_limiting(self.limiter)

    # -- the request path -----------------------------------------------------

    def handle(
        self, path: str, peer: str | None, forwarded_for: Sequence[str] | None, holder: Holder | None
    ) -> Response | Pending | Coroutine[Any, Any, Response]:
        if self.limiter is not None:
            return self.handle_limited(path, peer, forwarded_for, holder)
        self.requests += 1
        if forwarded_for is None and peer is not None:
            key = self._peer_key(peer)  # the common case, one cached lookup
        else:
            key = self._resolved_key(peer, forwarded_for)
        if key is None:
            # Not even the peer parses (a Unix socket, say): nothing to count under.
            self.no_client_ip += 1
        elif not self._uses_redis:
            self.uncounted += 1
        elif self.holds:
            batched = self._batched
            try:
                commit = self.backend.incr_held(key) if batched is None else batched.incr_held(key)
            except AccountingError as err:
                self._failed(err)
            except Exception as exc:
                self._failed(AccountingError(errors.INTERNAL, repr(exc)), exc)
            else:
                # holder.hold(commit), inlined (this runs for every request). No holder: the
                # client is gone; the count stands.
                if holder is not None and holder.commit is not commit:
                    holder.commit = commit
                    commit.holders.append(holder)
        elif self._adds_at_once:
            if self._add_now(key):
                return self.denied
        else:
            incr_then = self._incr_then
            if incr_then is not None:
                pending = Pending(self, path)
                if incr_then(key, pending):
                    self.via_callbacks += 1
                    return pending
            self.via_coroutine += 1
            return self._account(key, path)
        # self.action(path), inlined: this line runs for every request answered at once.
        return self.target_ok if path == self._target else self.redirect

    async def _account(self, key: str, path: str) -> Response:
        started = perf_counter()
        cause: BaseException | None = None
        value: int | None = None
        try:
            value = await self.backend.incr(key)
        except AccountingError as err:
            failure: AccountingError | None = err
        except Exception as exc:  # a bug in a backend must not become a 500 storm
            failure, cause = AccountingError(errors.INTERNAL, repr(exc)), exc
        else:
            failure = None
        return self._outcome(path, started, value, failure, cause)

    def _add_now(self, key: str) -> bool:
        """`_account` for a backend that adds without waiting (`incr_now`): True when it failed
        and the policy says deny."""
        started = perf_counter()
        batched = self._batched
        try:
            if batched is None:
                self.backend.incr_now(key)
            else:
                batched.incr_now(key)
        except AccountingError as err:
            return self._failed_since(started, err, None)
        except Exception as exc:  # a bug in a backend must not become a 500 storm
            return self._failed_since(started, AccountingError(errors.INTERNAL, repr(exc)), exc)
        self._succeeded_since(started)
        return False

    def _outcome(
        self, path: str, started: float, value: int | None, failure: AccountingError | None, cause: BaseException | None
    ) -> Response:
        """The answer once the increment (started at `started`) ended with `value` or `failure`."""
        self.latency.observe(perf_counter() - started)
        if failure is not None:
            return self.denied if self._failed(failure, cause) else self.action(path)
        self.counted += 1
        if self.failure_log.failing:
            self.failure_log.success()
        if self._count_header is not None and value is not None:
            return self.action(path).with_header(self._count_header, str(value))
        return self.action(path)

    # -- the request path with --limit -----------------------------------------

    def handle_limited(
        self, path: str, peer: str | None, forwarded_for: Sequence[str] | None, holder: Holder | None
    ) -> Response | Coroutine[Any, Any, Response]:
        """`handle` with a limit: the same steps, the decision before the action."""
        self.requests += 1
        ip = self.resolver.resolve(peer, forwarded_for)
        if ip is None:
            self.no_client_ip += 1
            return self.action(path)
        key = self._prefix + ip
        if not self._decides_locally:
            self.via_coroutine += 1
            return self._account_limited(key, ip, path)
        # Batched: decided here from the last flush's state; the increment (and this decision's
        # use of quota) goes to Redis with the next flush.
        answer = self._decided(ip, self.backend.decide_local(key), path)
        if self._adds_at_once:
            return self.denied if self._add_now(key) else answer
        if not self.holds:
            self.via_coroutine += 1
            return self._account_decided(key, answer)
        batched = self._batched
        try:
            commit = self.backend.incr_held(key) if batched is None else batched.incr_held(key)
        except AccountingError as err:
            if self._failed(err):
                return self.denied
        except Exception as exc:
            if self._failed(AccountingError(errors.INTERNAL, repr(exc)), exc):
                return self.denied
        else:
            if holder is not None:
                holder.hold(commit)
        return answer

    async def _account_limited(self, key: str, ip: str, path: str) -> Response:
        """One script: the increment, the limit's window and the decision."""
        result = await self._settle(self._scripted(key))
        if isinstance(result, AccountingError):
            # No decision could be made: the failure policy decides (allow or 503).
            return self.denied if self._deny else self.action(path)
        value, decision = result
        answer = self._decided(ip, decision, path)
        if self._count_header is not None:
            return answer.with_header(self._count_header, str(value))
        return answer

    async def _account_decided(self, key: str, answer: Response) -> Response:
        """Batched without held responses: the increment, then the answer already decided."""
        failed = isinstance(await self._settle(self.backend.incr(key)), AccountingError)
        return self.denied if failed and self._deny else answer

    async def _scripted(self, key: str) -> tuple[int, Decision]:
        limiter = self.limiter
        assert limiter is not None
        return limiter.read(await self.backend.run_script(limiter.script, limiter.keys(key), limiter.args))

    def _resolved_key(self, peer: str | None, forwarded_for: Sequence[str] | None) -> str | None:
        """The client's Redis key by the trusted-proxy rule (`_peer_key` is the usual case, cached)."""
        ip = self.resolver.resolve(peer, forwarded_for)
        return None if ip is None else self._prefix + ip

    # -- the request path with the proxy as its action (--upstream) -------------

    def forward(
        self, exchange: Exchange, peer: str | None, forwarded_for: Sequence[str] | None
    ) -> Coroutine[Any, Any, None] | None:
        """The request path with the proxy as its action: the same steps as `handle`, then forward.

        Runs through at once when no step waits (no accounting, or batched accounting that
        holds the response); else returns the rest, for the front end to run. Either way the
        exchange ends with `exchange.on_done` (not when the client left before it was forwarded)."""
        proxy = self.proxy
        assert proxy is not None
        self.requests += 1
        if forwarded_for is None and peer is not None:
            key = self._peer_key(peer)  # as in handle
        else:
            key = self._resolved_key(peer, forwarded_for)
        if key is None:
            self.no_client_ip += 1
        elif not self._uses_redis:
            self.uncounted += 1
        elif self.holds and self.limiter is None:
            # _admit_held without a limit, inlined: the usual batched request.
            batched = self._batched
            try:
                exchange.hold(self.backend.incr_held(key) if batched is None else batched.incr_held(key))
            except AccountingError as err:
                self._failed(err)
            except Exception as exc:
                self._failed(AccountingError(errors.INTERNAL, repr(exc)), exc)
        else:
            ip = key[len(self._prefix) :]  # the key is the prefix and the client's address
            if self._adds_at_once:
                refusal = self._admit_now(exchange, key, ip)
            elif self.holds and self._decides_locally:
                refusal = self._admit_held(exchange, key, ip)
            else:
                self.via_coroutine += 1
                return self._account_then_forward(exchange, key, ip)
            if refusal is not None:
                exchange.answer(refusal)  # 503 (deny policy) or 429: nothing is forwarded
                exchange.on_done(exchange, None)
                return None
        proxy.forward(exchange)
        return None

    async def _account_then_forward(self, exchange: Exchange, key: str, ip: str) -> None:
        refusal = await self._admit(exchange, key, ip)
        if exchange.abandoned:
            return  # the client left while its request was accounted: the count stands, no forwarding
        if refusal is not None:
            exchange.answer(refusal)  # 503 (deny policy) or 429: nothing is forwarded
            exchange.on_done(exchange, None)
            return
        assert self.proxy is not None
        self.proxy.forward(exchange)

    def _admit_now(self, exchange: Exchange, key: str, ip: str) -> Response | None:
        """`_admit` when nothing waits: batched without acknowledgement, the increment added in
        line (`incr_now`) and any limit decided locally."""
        limiter = self.limiter
        decision = self.backend.decide_local(key) if limiter is not None else None
        if self._add_now(key):
            return self.denied
        if limiter is not None and decision is not None:
            return self._decide_forward(exchange, limiter, ip, decision)
        return None

    def _admit_held(self, exchange: Exchange, key: str, ip: str) -> Response | None:
        """`_admit` when nothing waits: batched, the response held until the flush settles, and
        any limit decided locally."""
        limiter = self.limiter
        decision = self.backend.decide_local(key) if limiter is not None else None
        try:
            exchange.hold(self.backend.incr_held(key))
        except AccountingError as err:
            self._failed(err)
        except Exception as exc:
            self._failed(AccountingError(errors.INTERNAL, repr(exc)), exc)
        if limiter is not None and decision is not None:
            return self._decide_forward(exchange, limiter, ip, decision)
        return None

    async def _admit(self, exchange: Exchange, key: str, ip: str) -> Response | None:
        """Account (and limit) one request for the proxy: None to forward it, else the answer instead."""
        limiter = self.limiter
        decision: Decision | None = None
        if limiter is not None and not self._decides_locally:
            result = await self._settle(self._scripted(key))
            if isinstance(result, AccountingError):
                return self.denied if self._deny else None
            decision = result[1]
        else:
            if limiter is not None:
                decision = self.backend.decide_local(key)
            if isinstance(await self._settle(self.backend.incr(key)), AccountingError) and self._deny:
                return self.denied
        if limiter is not None and decision is not None:
            return self._decide_forward(exchange, limiter, ip, decision)
        return None

    def _decide_forward(self, exchange: Exchange, limiter: Limiter, ip: str, decision: Decision) -> Response | None:
        limiter.count(ip, decision)
        if not decision.allowed:
            return self._limited(decision)
        if self._limit_headers:
            exchange.extra_fields = limiter.fields(decision)
        return None

    async def _settle(self, call: Awaitable[T]) -> T | AccountingError:
        """Await one accounting call, timed; count its success, or count and log its failure
        (returned: the caller applies the failure policy). `_account` is this, inlined."""
        started = perf_counter()
        try:
            value = await call
        except AccountingError as err:
            failure, cause = err, None
        except Exception as exc:  # a bug in a backend must not become a 500 storm
            failure, cause = AccountingError(errors.INTERNAL, repr(exc)), exc
        else:
            self._succeeded_since(started)
            return value
        self._failed_since(started, failure, cause)
        return failure

    def _succeeded_since(self, started: float) -> None:
        """An accounting call begun at `started` succeeded: time and count it."""
        self.latency.observe(perf_counter() - started)
        self.counted += 1
        if self.failure_log.failing:
            self.failure_log.success()

    def _failed_since(self, started: float, failure: AccountingError, cause: BaseException | None) -> bool:
        """An accounting call begun at `started` failed: time it, count and log the failure; True
        when policy says deny."""
        self.latency.observe(perf_counter() - started)
        return self._failed(failure, cause)

    def _decided(self, ip: str, decision: Decision, path: str) -> Response:
        limiter = self.limiter
        assert limiter is not None
        limiter.count(ip, decision)
        if not decision.allowed:
            return self._limited(decision)
        answer = self.action(path)
        if self._limit_headers:
            answer = Response(answer.status, answer.reason, answer.headers + limiter.fields(decision), answer.body)
        return answer

    def _limited(self, decision: Decision) -> Response:
        """429, with when to come back and the RateLimit fields."""
        limiter = self.limiter
        assert limiter is not None
        wait = str(max(1, math.ceil(decision.retry_after_s - 1e-9)))
        return Response(429, "Too Many Requests", (("Retry-After", wait), *limiter.fields(decision), _TEXT), _LIMITED)

    def action(self, path: str) -> Response:
        """What answers a request that may go on: 200 for the target itself, else the redirect."""
        return self.target_ok if path == self._target else self.redirect

    # -- outcomes -------------------------------------------------------------

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

    def request_stats(self) -> dict[str, Any]:
        failed = sum(self.failures.values())
        settled = self.counted + self.deferred + failed + self.uncounted + self.no_client_ip
        return {
            "total": self.requests,
            "counted": self.counted,
            "deferred": self.deferred,
            "failed": failed,
            "uncounted": self.uncounted,
            "no_client_ip": self.no_client_ip,
            "in_flight": self.requests - settled,
        }
