"""The request path, independent of any HTTP front end.

    request facts -> client IP -> accounting -> policy -> action -> response description

A front end (gateway.http) parses bytes into facts (path, peer, X-Forwarded-For)
and turns the `Response` it gets back into bytes; nothing here imports an HTTP
library, so every front end runs exactly this path and the benchmark compares
front ends, not rules.

With `--upstream` the action is the proxy (`gateway.actions.proxy`): the front end
calls `forward()` at the end of the request head instead, which runs the same
client-IP and accounting steps and then hands the exchange to the proxy.

`handle()` returns a `Response` when the answer is known at once (calibration, a
client without an address, batched with held responses) and otherwise an
awaitable of one (a Redis round trip). A backend that holds responses (batched,
`--batch-ack flush`) is called without waiting: the front end's `holder` keeps
the response's bytes until the flush holding the increment settles
(`_held_settled` then counts those requests).

Owns the counters behind /stats' `requests` and `failures` and the failure
policy: when accounting fails the request is let through (`allow`, the
default) or answered 503 (`deny`); each failure is counted by kind and logged
once per burst. An accounting failure never escapes as a 500.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Coroutine, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from . import errors
from .backends.base import Backend, HeldOutcome
from .client_ip import ClientIPResolver
from .config import Config
from .errors import AccountingError
from .faultlog import FailureLog
from .histogram import LATENCY_BOUNDS, Histogram
from .holding import Holder

if TYPE_CHECKING:
    from .actions.proxy import Exchange, Proxy

log = logging.getLogger("gateway")


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


class Pipeline:
    def __init__(self, config: Config, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.resolver = ClientIPResolver(config.trusted_proxies)
        self._peer_ip = self.resolver.peer
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
        #: The proxy action, when upstreams are configured (set by the gateway); else the redirect.
        self.proxy: Proxy | None = None
        #: The awaitable `handle` returns needs no asyncio Task (see Backend.task_free).
        self.task_free = backend.task_free
        self.requests = 0
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

    # -- the request path -----------------------------------------------------

    def handle(
        self, path: str, peer: str | None, forwarded_for: Sequence[str] | None, holder: Holder | None
    ) -> Response | Coroutine[Any, Any, Response]:
        self.requests += 1
        if forwarded_for is None and peer is not None:
            ip = self._peer_ip(peer)  # the common case, one cached lookup
        else:
            ip = self.resolver.resolve(peer, forwarded_for)
        if ip is None:
            # Not even the peer parses (a Unix socket, say): nothing to count under.
            self.no_client_ip += 1
        elif not self._uses_redis:
            self.uncounted += 1
        elif self.holds:
            try:
                commit = self.backend.incr_held(self._prefix + ip)
            except AccountingError as err:
                self._failed(err)
            except Exception as exc:
                self._failed(AccountingError(errors.INTERNAL, repr(exc)), exc)
            else:
                if holder is not None:  # else the client is gone; the count stands
                    holder.hold(commit)
        else:
            return self._account(self._prefix + ip, path)
        # self.action(path), inlined: this line runs for every request answered at once.
        return self.target_ok if path == self._target else self.redirect

    async def forward(self, exchange: Exchange, peer: str | None, forwarded_for: Sequence[str] | None) -> None:
        """The request path with the proxy as its action: the same steps as `handle`, then forward."""
        assert self.proxy is not None
        self.requests += 1
        ip = self.resolver.resolve(peer, forwarded_for)
        if ip is None:
            self.no_client_ip += 1
        elif not self._uses_redis:
            self.uncounted += 1
        elif self.holds:
            # Forwarded at once; the response waits in the exchange until the flush settles.
            try:
                exchange.hold(self.backend.incr_held(self._prefix + ip))
            except AccountingError as err:
                self._failed(err)
            except Exception as exc:
                self._failed(AccountingError(errors.INTERNAL, repr(exc)), exc)
        elif not await self._admit(self._prefix + ip):
            exchange.answer(self.denied)  # deny policy: nothing is forwarded
            return
        if exchange.abandoned:
            return  # the client left while its request was accounted: the count stands, no forwarding
        await self.proxy.forward(exchange)

    async def _admit(self, key: str) -> bool:
        """Account one request for the proxy; False when policy says deny."""
        started = perf_counter()
        try:
            await self.backend.incr(key)
        except AccountingError as err:
            failure: AccountingError | None = err
            cause: BaseException | None = None
        except Exception as exc:
            failure, cause = AccountingError(errors.INTERNAL, repr(exc)), exc
        else:
            failure = None
        self.latency.observe(perf_counter() - started)
        if failure is not None:
            return not self._failed(failure, cause)
        self.counted += 1
        if self.failure_log.failing:
            self.failure_log.success()
        return True

    async def _account(self, key: str, path: str) -> Response:
        started = perf_counter()
        cause: BaseException | None = None
        try:
            value = await self.backend.incr(key)
        except AccountingError as err:
            failure: AccountingError | None = err
        except Exception as exc:  # a bug in a backend must not become a 500 storm
            failure, cause = AccountingError(errors.INTERNAL, repr(exc)), exc
        else:
            failure = None
        self.latency.observe(perf_counter() - started)
        if failure is not None:
            return self.denied if self._failed(failure, cause) else self.action(path)
        self.counted += 1
        if self.failure_log.failing:
            self.failure_log.success()
        if self._count_header is not None and value is not None:
            return self.action(path).with_header(self._count_header, str(value))
        return self.action(path)

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
