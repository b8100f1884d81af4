"""Command line: argv and environment -> Config -> a running gateway.

Every option has an environment variable; the command line wins. A bad value is
one line on stderr and exit status 2; a listener that cannot bind is one line
and exit status 1. Never a traceback for an operator's mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, get_args

from . import native
from .config import (
    BALANCES,
    HTTP_FRONT_ENDS,
    LIMIT_ALGORITHMS,
    MODES,
    AccessLog,
    BatchAck,
    Config,
    ConfigError,
    ErrorPolicy,
    parse_admin_listen,
    parse_limit,
    parse_listen,
    parse_networks,
    parse_redis_urls,
    parse_upstreams,
    parse_workers,
)


def _config_defaults() -> dict[str, Any]:
    """Config's field defaults: the one source of every option's default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


DEFAULTS = _config_defaults()


def _address(addr: tuple[str, int] | str | None) -> str:
    if addr is None:
        return "off"
    if isinstance(addr, str):
        return f"unix:{addr}"
    return f"{addr[0]}:{addr[1]}"


DEFAULT_REDIS_URL = DEFAULTS["redis"].url


def _off(value: float | None) -> str | float:
    return "off" if value is None else value


def _optional_float(text: str) -> float | None:
    """A number, or 'off' for None."""
    if text.strip().lower() in ("off", "none", ""):
        return None
    return float(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env(name: str, default: Any) -> Any:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gateway",
        description=(
            "HTTP gateway that counts every request per client IP in Redis "
            "(INCRBY <prefix><ip> 1), then redirects to the target."
        ),
        epilog="Every option can also be set by the environment variable shown; the command line wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def opt(flag: str, env: str, default: Any, help: str, **kw: Any) -> None:
        p.add_argument(flag, default=_env(env, default), help=f"{help} [env {env}]", **kw)

    def switch(flag: str, env: str, help: str) -> None:
        on = os.environ.get(env, "").lower() in ("1", "true", "yes")
        p.add_argument(flag, action="store_true", default=on, help=f"{help} [env {env}=1]")

    opt(
        "--mode",
        "GATEWAY_MODE",
        DEFAULTS["mode"],
        "accounting mode: " + ", ".join(MODES),
        choices=MODES,
        metavar="MODE",
    )
    opt(
        "--http",
        "GATEWAY_HTTP",
        DEFAULTS["http"],
        "HTTP front end: httptools (the own HTTP/1.1 protocol over llhttp) or aiohttp (aiohttp's server, "
        "kept for comparison)",
        choices=HTTP_FRONT_ENDS,
        metavar="FRONT_END",
    )
    opt("--listen", "GATEWAY_LISTEN", _address(DEFAULTS["listen"]), "HOST:PORT of the HTTP front end")
    opt(
        "--admin-listen",
        "GATEWAY_ADMIN_LISTEN",
        _address(DEFAULTS["admin_listen"]),
        "HOST:PORT or unix:PATH of the admin listener (/stats, /metrics, /healthz, /readyz); 'off' disables it",
    )
    opt(
        "--workers",
        "GATEWAY_WORKERS",
        str(DEFAULTS["workers"]),
        "processes sharing the port (SO_REUSEPORT), each with its own Redis connections; 'auto' is one per "
        "CPU; above 1 a supervisor restarts dead workers and its admin listener sums their /stats",
    )
    opt(
        "--worker-hang-timeout-s",
        "GATEWAY_WORKER_HANG_TIMEOUT_S",
        DEFAULTS["worker_hang_timeout_s"],
        "with --workers above 1: a worker whose admin socket has not answered the supervisor for this "
        "long is killed and restarted (it is reported unready at the first missed answer)",
        type=float,
    )
    switch(
        "--reuse-port",
        "GATEWAY_REUSE_PORT",
        "set SO_REUSEPORT on the front listener, so separately started gateways can share the port "
        "(--workers sets it itself)",
    )
    opt(
        "--redis-url",
        "REDIS_URL",
        DEFAULT_REDIS_URL,
        "redis[s]://[[user][:password@]][host][:port][/db], honoured in every mode; for a cluster, "
        "redis+cluster://host:port[,host:port...] (seed nodes)",
    )
    switch(
        "--redis-cluster",
        "GATEWAY_REDIS_CLUSTER",
        "--redis-url names Redis Cluster seed nodes (comma-separated): keys are routed by hash slot, "
        "MOVED and ASK followed; pooled, raw, multiplexed and batched modes",
    )
    opt("--pool-size", "GATEWAY_POOL_SIZE", DEFAULTS["pool_size"], "most Redis connections open at once", type=int)
    opt(
        "--pool-wait-ms",
        "GATEWAY_POOL_WAIT_MS",
        DEFAULTS["pool_wait_ms"],
        "longest wait for a free pooled connection",
        type=float,
    )
    opt(
        "--pool-min-size",
        "GATEWAY_POOL_MIN_SIZE",
        DEFAULTS["pool_min_size"],
        "raw: connections opened at start and kept open (reopened in the background when lost)",
        type=int,
    )
    opt(
        "--pool-idle-timeout-s",
        "GATEWAY_POOL_IDLE_TIMEOUT_S",
        DEFAULTS["pool_idle_timeout_s"],
        "raw, multiplexed, batched: Redis connections idle this long are closed (replaced when needed "
        "for the minimum or for shared connections), so none outlives a load balancer's or NAT's idle "
        "timeout; 0: never",
        type=float,
    )
    opt(
        "--pool-check-after-ms",
        "GATEWAY_POOL_CHECK_AFTER_MS",
        _off(DEFAULTS["pool_check_after_ms"]),
        "raw: a connection idle longer than this is checked with a PING before a request gets it (a "
        "failed check discards it and the request takes another); multiplexed, batched: an idle shared "
        "connection is PINGed after this; 'off': never",
        type=_optional_float,
    )
    opt(
        "--pool-max-lifetime-s",
        "GATEWAY_POOL_MAX_LIFETIME_S",
        _off(DEFAULTS["pool_max_lifetime_s"]),
        "raw: a connection is closed when it comes back after this long open (0: after one checkout); "
        "multiplexed, batched: a shared connection is replaced after this long (the replacement opens "
        "first); 'off': never",
        type=_optional_float,
    )
    opt(
        "--pool-lifetime-jitter-s",
        "GATEWAY_POOL_LIFETIME_JITTER_S",
        DEFAULTS["pool_lifetime_jitter_s"],
        "each connection's lifetime is longer by a random share of this, so reconnects spread out",
        type=float,
    )
    opt(
        "--connect-timeout-ms",
        "GATEWAY_CONNECT_TIMEOUT_MS",
        DEFAULTS["connect_timeout_ms"],
        "longest Redis connect, AUTH and SELECT",
        type=float,
    )
    opt(
        "--command-timeout-ms",
        "GATEWAY_COMMAND_TIMEOUT_MS",
        DEFAULTS["command_timeout_ms"],
        "longest wait for a Redis reply",
        type=float,
    )
    opt("--key-prefix", "GATEWAY_KEY_PREFIX", DEFAULTS["key_prefix"], "prefix of the per-IP counter keys")
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=None,
        metavar="CIDR",
        help="peer range whose X-Forwarded-For is believed; repeatable "
        "[env GATEWAY_TRUSTED_PROXIES, comma-separated] (default: none)",
    )
    opt("--target", "GATEWAY_TARGET", DEFAULTS["target"], "where requests are redirected; requests for it get 200")
    opt(
        "--on-redis-error",
        "GATEWAY_ON_REDIS_ERROR",
        DEFAULTS["on_redis_error"],
        "when accounting fails: allow (answer as usual, count the failure) or deny (503 + Retry-After)",
        choices=get_args(ErrorPolicy),
    )
    opt(
        "--mux-connections",
        "GATEWAY_MUX_CONNECTIONS",
        DEFAULTS["mux_connections"],
        "multiplexed mode: shared connections",
        type=int,
    )
    opt(
        "--batch-window-ms",
        "GATEWAY_BATCH_WINDOW_MS",
        DEFAULTS["batch_window_ms"],
        "batched mode: longest wait before a flush; 0 flushes at the end of each loop tick, or as soon as "
        "the flush in flight returns (batches then grow with load)",
        type=float,
    )
    opt(
        "--batch-max-keys",
        "GATEWAY_BATCH_MAX_KEYS",
        DEFAULTS["batch_max_keys"],
        "batched mode: flush at once when this many keys are pending",
        type=int,
    )
    opt(
        "--batch-max-pending",
        "GATEWAY_BATCH_MAX_PENDING",
        DEFAULTS["batch_max_pending"],
        "batched mode: most distinct keys held (in the filling batch, the one in flight and the one "
        "awaiting retry while Redis is unreachable); an increment for a new key beyond it is dropped "
        "and counted as overflow",
        type=int,
    )
    opt(
        "--batch-ack",
        "GATEWAY_BATCH_ACK",
        DEFAULTS["batch_ack"],
        "batched mode: flush (answer once the increment is in Redis) or none (answer at once)",
        choices=get_args(BatchAck),
    )
    opt(
        "--shutdown-timeout-s",
        "GATEWAY_SHUTDOWN_TIMEOUT_S",
        DEFAULTS["shutdown_timeout_s"],
        "longest wait for in-flight requests on SIGTERM",
        type=float,
    )
    opt(
        "--request-timeout-s",
        "GATEWAY_REQUEST_TIMEOUT_S",
        DEFAULTS["request_timeout_s"],
        "a request head must arrive within this time of its first byte (or of connecting), else 408",
        type=float,
    )
    opt(
        "--keepalive-timeout-s",
        "GATEWAY_KEEPALIVE_TIMEOUT_S",
        DEFAULTS["keepalive_timeout_s"],
        "idle keep-alive connections are closed after this",
        type=float,
    )
    opt(
        "--max-connections",
        "GATEWAY_MAX_CONNECTIONS",
        DEFAULTS["max_connections"],
        "most client connections open at once; more get 503",
        type=int,
    )
    opt(
        "--max-body-bytes",
        "GATEWAY_MAX_BODY_BYTES",
        DEFAULTS["max_body_bytes"],
        "request bodies are read and discarded up to this size; larger ones get 413 (httptools front end)",
        type=int,
    )
    opt(
        "--count-header",
        "GATEWAY_COUNT_HEADER",
        DEFAULTS["count_header"],
        "response header carrying the client's new counter value (naive, pooled, raw, multiplexed); off by default",
    )
    opt(
        "--limit",
        "GATEWAY_LIMIT",
        None,
        "per-client rate limit shared through Redis: N/UNIT (100/s, 6000/min, 5/200ms; units ms, s, min, h, "
        "d), for gcra with an optional :burst=B (100/s:burst=50); over it, 429 (default: no limit)",
    )
    opt(
        "--limit-algorithm",
        "GATEWAY_LIMIT_ALGORITHM",
        DEFAULTS["limit_algorithm"],
        "fixed (windows), sliding (two-counter sliding window) or gcra (smooth rate plus burst)",
        choices=LIMIT_ALGORITHMS,
    )
    switch("--limit-headers", "GATEWAY_LIMIT_HEADERS", "RateLimit-Policy and RateLimit fields on allowed responses too")
    opt(
        "--access-log",
        "GATEWAY_ACCESS_LOG",
        DEFAULTS["access_log"],
        "off, or combined (one line per request on stderr, logger gateway.access; costs throughput)",
        choices=get_args(AccessLog),
    )
    opt("--log-level", "GATEWAY_LOG_LEVEL", DEFAULTS["log_level"], "DEBUG, INFO, WARNING or ERROR")
    _proxy_options(p, opt)
    return p


def _proxy_options(p: argparse.ArgumentParser, opt: Callable[..., None]) -> None:
    """The proxy action's options (docs/proxy.md)."""
    p.add_argument(
        "--upstream",
        action="append",
        default=None,
        metavar="URL",
        help="forward counted requests to this server instead of redirecting: http://host[:port][?weight=N]; "
        "repeatable [env GATEWAY_UPSTREAMS, comma-separated] (default: none, redirect)",
    )
    opt(
        "--balance",
        "GATEWAY_BALANCE",
        DEFAULTS["balance"],
        "how a server is chosen: roundrobin (weighted) or leastconn (fewest requests in flight per weight)",
        choices=BALANCES,
    )
    opt(
        "--upstream-maxconn",
        "GATEWAY_UPSTREAM_MAXCONN",
        DEFAULTS["upstream_maxconn"],
        "most connections open to each upstream server; more requests wait in its queue",
        type=int,
    )
    opt(
        "--upstream-queue-timeout-ms",
        "GATEWAY_UPSTREAM_QUEUE_TIMEOUT_MS",
        DEFAULTS["upstream_queue_timeout_ms"],
        "longest wait for a connection to a busy server, else 503",
        type=float,
    )
    opt(
        "--upstream-connect-timeout-ms",
        "GATEWAY_UPSTREAM_CONNECT_TIMEOUT_MS",
        DEFAULTS["upstream_connect_timeout_ms"],
        "longest connect to an upstream server (a failed connect is retried on another server)",
        type=float,
    )
    opt(
        "--upstream-response-timeout-s",
        "GATEWAY_UPSTREAM_RESPONSE_TIMEOUT_S",
        DEFAULTS["upstream_response_timeout_s"],
        "longest wait for the response head once the request is sent, else 504",
        type=float,
    )
    opt(
        "--upstream-body-timeout-s",
        "GATEWAY_UPSTREAM_BODY_TIMEOUT_S",
        DEFAULTS["upstream_body_timeout_s"],
        "longest pause between body reads or writes on an upstream connection (the exchange is then cut)",
        type=float,
    )
    opt(
        "--upstream-idle-timeout-s",
        "GATEWAY_UPSTREAM_IDLE_TIMEOUT_S",
        DEFAULTS["upstream_idle_timeout_s"],
        "a kept-alive upstream connection idle this long is not reused (keep it below the upstream's own)",
        type=float,
    )
    opt(
        "--upstream-max-lifetime-s",
        "GATEWAY_UPSTREAM_MAX_LIFETIME_S",
        DEFAULTS["upstream_max_lifetime_s"],
        "an upstream connection this old is not reused",
        type=float,
    )
    opt(
        "--upstream-max-requests",
        "GATEWAY_UPSTREAM_MAX_REQUESTS",
        DEFAULTS["upstream_max_requests"],
        "an upstream connection is closed after this many requests",
        type=int,
    )
    opt(
        "--upstream-max-fails",
        "GATEWAY_UPSTREAM_MAX_FAILS",
        DEFAULTS["upstream_max_fails"],
        "consecutive failures (connect error, timeout, malformed or cut response) that eject a server",
        type=int,
    )
    opt(
        "--upstream-fail-timeout-s",
        "GATEWAY_UPSTREAM_FAIL_TIMEOUT_S",
        DEFAULTS["upstream_fail_timeout_s"],
        "how long an ejected server gets no traffic when no active check runs",
        type=float,
    )
    opt(
        "--health-check-path",
        "GATEWAY_HEALTH_CHECK_PATH",
        DEFAULTS["health_check_path"],
        "active health checks: GET this path on every server (2xx/3xx is a pass); off by default",
    )
    opt(
        "--health-check-interval-s",
        "GATEWAY_HEALTH_CHECK_INTERVAL_S",
        DEFAULTS["health_check_interval_s"],
        "time between two checks of one server",
        type=float,
    )
    opt(
        "--health-check-timeout-s",
        "GATEWAY_HEALTH_CHECK_TIMEOUT_S",
        DEFAULTS["health_check_timeout_s"],
        "how long one check may take (connect to status line) before it counts as failed; default: the interval",
        type=float,
    )
    opt(
        "--health-check-rise",
        "GATEWAY_HEALTH_CHECK_RISE",
        DEFAULTS["health_check_rise"],
        "consecutive passed checks that bring a down server up",
        type=int,
    )
    opt(
        "--health-check-fall",
        "GATEWAY_HEALTH_CHECK_FALL",
        DEFAULTS["health_check_fall"],
        "consecutive failed checks that take an up server down",
        type=int,
    )


def config_from_args(argv: Sequence[str] | None = None) -> Config:
    """Parse argv and the environment; exits with one line on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        trusted = args.trusted_proxy
        if trusted is None:
            trusted = [os.environ.get("GATEWAY_TRUSTED_PROXIES", "")]
        admin = parse_admin_listen(str(args.admin_listen))
        seeds, cluster = parse_redis_urls(args.redis_url, args.redis_cluster)
        level = str(args.log_level).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"invalid log level {args.log_level!r}")
        return Config(
            mode=args.mode,
            http=args.http,
            listen=parse_listen(args.listen, "0.0.0.0"),
            admin_listen=admin,
            workers=parse_workers(args.workers, len(os.sched_getaffinity(0))),
            worker_hang_timeout_s=args.worker_hang_timeout_s,
            reuse_port=args.reuse_port,
            redis=seeds[0],
            cluster=cluster,
            cluster_seeds=seeds[1:],
            pool_size=args.pool_size,
            pool_wait_ms=args.pool_wait_ms,
            pool_min_size=args.pool_min_size,
            pool_idle_timeout_s=args.pool_idle_timeout_s,
            pool_check_after_ms=args.pool_check_after_ms,
            pool_max_lifetime_s=args.pool_max_lifetime_s,
            pool_lifetime_jitter_s=args.pool_lifetime_jitter_s,
            connect_timeout_ms=args.connect_timeout_ms,
            command_timeout_ms=args.command_timeout_ms,
            key_prefix=args.key_prefix,
            trusted_proxies=parse_networks(trusted),
            target=args.target,
            on_redis_error=args.on_redis_error,
            mux_connections=args.mux_connections,
            batch_window_ms=args.batch_window_ms,
            batch_max_keys=args.batch_max_keys,
            batch_max_pending=args.batch_max_pending,
            batch_ack=args.batch_ack,
            shutdown_timeout_s=args.shutdown_timeout_s,
            request_timeout_s=args.request_timeout_s,
            keepalive_timeout_s=args.keepalive_timeout_s,
            max_connections=args.max_connections,
            max_body_bytes=args.max_body_bytes,
            count_header=args.count_header or None,
            limit=parse_limit(args.limit),
            limit_algorithm=args.limit_algorithm,
            limit_headers=args.limit_headers,
            access_log=args.access_log,
            log_level=level,
            upstreams=parse_upstreams(
                args.upstream if args.upstream is not None else [os.environ.get("GATEWAY_UPSTREAMS", "")]
            ),
            balance=args.balance,
            upstream_maxconn=args.upstream_maxconn,
            upstream_queue_timeout_ms=args.upstream_queue_timeout_ms,
            upstream_connect_timeout_ms=args.upstream_connect_timeout_ms,
            upstream_response_timeout_s=args.upstream_response_timeout_s,
            upstream_body_timeout_s=args.upstream_body_timeout_s,
            upstream_idle_timeout_s=args.upstream_idle_timeout_s,
            upstream_max_lifetime_s=args.upstream_max_lifetime_s,
            upstream_max_requests=args.upstream_max_requests,
            upstream_max_fails=args.upstream_max_fails,
            upstream_fail_timeout_s=args.upstream_fail_timeout_s,
            health_check_path=args.health_check_path or None,
            health_check_interval_s=args.health_check_interval_s,
            health_check_timeout_s=args.health_check_timeout_s,
            health_check_rise=args.health_check_rise,
            health_check_fall=args.health_check_fall,
        )
    except ConfigError as exc:
        parser.error(str(exc))


async def serve(config: Config) -> int:
    from . import limits
    from .app import Gateway, ListenError, Running

    log = logging.getLogger("gateway")
    # Size max-connections against the open-file limit (each worker does this for itself).
    config, budget = limits.apply(config)
    log.log(logging.WARNING if budget.lowered else logging.INFO, "%s", budget.describe())
    running = Running(Gateway(config))
    try:
        await running.start()
    except ListenError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 1
    listening = ", ".join(f"{h}:{p}" for h, p in running.addresses)
    log.info(
        "gateway mode=%s http=%s listening on %s; redis %s; request path %s",
        config.mode,
        config.http,
        listening,
        config.redis_description,
        native.state,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining requests, then closing Redis connections")
    # A repeated SIGTERM (a supervisor passing on a terminal's Ctrl-C, say) must not cut the
    # drain short; a second SIGINT from a person at the terminal still forces the exit.
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    loop.remove_signal_handler(signal.SIGINT)
    await running.stop()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = config_from_args(argv)
    worker = os.environ.get("GATEWAY_WORKER_INDEX")
    who = f" worker {worker}" if worker is not None and config.workers == 1 else ""
    logging.basicConfig(level=config.log_level, format=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # uvloop is a dependency, but the gateway still runs without it
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if config.workers > 1:
            from .supervisor import supervise

            return runner.run(supervise(config, argv))
        return runner.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
