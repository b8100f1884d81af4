"""One frozen Config for the whole gateway, and the parsing of its textual values.

Owns validation: every value is checked here, once, so the rest of the code can
trust a Config. Parsing errors are `ConfigError` with a message fit for a single
line on stderr; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal, get_args
from urllib.parse import parse_qs, unquote, urlsplit

from .lifecycle import Lifecycle
from .limit.algorithms import Rate, parse_rate
from .limit.scripts import check_prefix

Mode = Literal["off", "naive", "pooled", "raw", "multiplexed", "batched"]
MODES: tuple[str, ...] = get_args(Mode)
ErrorPolicy = Literal["allow", "deny"]
BatchAck = Literal["flush", "none"]
AccessLog = Literal["off", "combined"]
HttpFrontEnd = Literal["httptools", "aiohttp"]
HTTP_FRONT_ENDS: tuple[str, ...] = get_args(HttpFrontEnd)
Balance = Literal["roundrobin", "leastconn"]
BALANCES: tuple[str, ...] = get_args(Balance)
LimitAlgorithm = Literal["fixed", "sliding", "gcra"]
LIMIT_ALGORITHMS: tuple[str, ...] = get_args(LimitAlgorithm)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and the value."""


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how to log in, parsed from a redis[s]:// URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @property
    def url(self) -> str:
        """The URL back, with the password masked: safe to log or show in /stats."""
        auth = ""
        if self.username or self.password:
            auth = (self.username or "") + (":***" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse `redis[s]://[[user][:password@]][host][:port][/db][?db=N]`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {url!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"invalid Redis URL {url!r}: scheme must be redis:// or rediss://")
    db_text = parts.path.lstrip("/")
    query = parse_qs(parts.query)
    if not db_text and "db" in query:
        db_text = query["db"][0]
    try:
        db = int(db_text) if db_text else 0
    except ValueError:
        raise ConfigError(f"invalid Redis URL {url!r}: database {db_text!r} is not a number") from None
    if db < 0:
        raise ConfigError(f"invalid Redis URL {url!r}: database must be >= 0")
    password = parts.password
    if password is None and "password" in query:
        password = query["password"][0]
    return RedisTarget(
        host=parts.hostname or "127.0.0.1",
        port=port or 6379,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(password) if password else None,
        tls=parts.scheme == "rediss",
    )


def parse_redis_urls(text: str, cluster: bool = False) -> tuple[tuple[RedisTarget, ...], bool]:
    """One Redis URL, or cluster seed nodes: `redis+cluster://[auth@]h1:p1,h2:p2`,
    `redis://h1:p1,h2:p2` with `cluster`, or several URLs separated by commas.

    Returns the targets and whether they name a cluster.
    """
    text = text.strip()
    for scheme, tls in (("redis+cluster://", False), ("rediss+cluster://", True)):
        if text.startswith(scheme):
            cluster = True
            text = ("rediss://" if tls else "redis://") + text[len(scheme) :]
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ConfigError(f"invalid Redis URL {text!r}: scheme must be redis:// or rediss://")
    # Split `auth@h1:p1,h2:p2/db` into one URL per host, each with the auth and the path.
    if "," in rest and "://" not in rest:
        auth, at, hosts = rest.rpartition("@") if "@" in rest.split("/", 1)[0] else ("", "", rest)
        hosts, slash, tail = hosts.partition("/")
        urls = [f"{scheme}://{auth}{at}{h.strip()}{slash}{tail}" for h in hosts.split(",") if h.strip()]
    else:
        urls = [u.strip() for u in text.split(",") if u.strip()]
    targets = tuple(parse_redis_url(u) for u in urls)
    if len(targets) > 1 and not cluster:
        raise ConfigError(f"several Redis addresses in {text!r}: for cluster seed nodes add --redis-cluster")
    if cluster and any(t.db for t in targets):
        raise ConfigError("Redis Cluster has only database 0")
    return targets, cluster


@dataclass(frozen=True)
class UpstreamServer:
    """One upstream server, parsed from `http://host[:port][?weight=N]`."""

    host: str
    port: int
    weight: int = 1

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_upstream(url: str) -> UpstreamServer:
    """Parse an upstream URL: `http://host[:port][/][?weight=N]` (weight 1 to 256)."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid upstream {text!r}: {exc}") from None
    if parts.scheme != "http":
        raise ConfigError(f"invalid upstream {text!r}: only http:// upstreams are supported")
    if not parts.hostname:
        raise ConfigError(f"invalid upstream {text!r}: no host")
    if parts.path not in ("", "/") or parts.username or parts.password or parts.fragment:
        raise ConfigError(f"invalid upstream {text!r}: expected http://host[:port][?weight=N]")
    query = parse_qs(parts.query, keep_blank_values=True)
    weight = 1
    for key, values in query.items():
        if key != "weight":
            raise ConfigError(f"invalid upstream {text!r}: unknown parameter {key!r} (only weight)")
        try:
            weight = int(values[-1])
        except ValueError:
            raise ConfigError(f"invalid upstream {text!r}: weight must be a number") from None
        if not 1 <= weight <= 256:
            raise ConfigError(f"invalid upstream {text!r}: weight must be 1 to 256")
    return UpstreamServer(parts.hostname, port or 80, weight)


def parse_upstreams(items: list[str] | tuple[str, ...]) -> tuple[UpstreamServer, ...]:
    """Upstream URLs, each item possibly a comma-separated list."""
    out = []
    for item in items:
        for text in item.split(","):
            if text.strip():
                out.append(parse_upstream(text))
    return tuple(out)


def parse_listen(text: str, default_host: str) -> tuple[str, int]:
    """Parse `HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT`."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid listen address {text!r}: expected HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"invalid listen address {text!r}: port out of range")
    return host, port


def parse_admin_listen(text: str) -> tuple[str, int] | str | None:
    """`HOST:PORT`, `unix:/path/to/socket`, or `off`."""
    if text.strip().lower() in ("", "off", "none"):
        return None
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"invalid admin listen address {text!r}: unix: needs a socket path")
        return path
    return parse_listen(text, "127.0.0.1")


def parse_workers(text: str | int, cpus: int) -> int:
    """A worker count, or `auto`: one per CPU this process may run on."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return max(1, cpus)
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid workers {text!r}: expected a number or auto") from None
    if n < 1:
        raise ConfigError(f"invalid workers {n}: must be >= 1")
    return n


def parse_networks(items: list[str] | tuple[str, ...]) -> tuple[IPNetwork, ...]:
    nets = []
    for item in items:
        for text in item.split(","):
            text = text.strip()
            if not text:
                continue
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ConfigError(f"invalid trusted proxy {text!r}: expected an address or CIDR") from None
    return tuple(nets)


@dataclass(frozen=True)
class Config:
    mode: Mode = "raw"
    # The HTTP front end: the own protocol over llhttp, or aiohttp's server (for comparison).
    http: HttpFrontEnd = "httptools"
    listen: tuple[str, int] = ("0.0.0.0", 10060)
    # HOST, PORT; a str is a Unix socket path; None disables the admin listener.
    admin_listen: tuple[str, int] | str | None = ("127.0.0.1", 10061)
    # Processes sharing the listening port; above 1, this process supervises them.
    workers: int = 1
    # With workers: a worker whose admin socket has not answered for this long is killed and restarted.
    worker_hang_timeout_s: float = 10.0
    # SO_REUSEPORT on the front listener (set for workers; also for separately started instances).
    reuse_port: bool = False
    redis: RedisTarget = field(default_factory=RedisTarget)
    # Redis Cluster: `redis` and `cluster_seeds` are seed nodes; the slot map comes from them.
    cluster: bool = False
    cluster_seeds: tuple[RedisTarget, ...] = ()
    pool_size: int = 20
    pool_wait_ms: float = 1000.0
    # Pool lifecycle (raw's pool; multiplexed's and batched's shared connections where it applies).
    # Connections opened at start and kept open.
    pool_min_size: int = 0
    # Idle connections closed after this (0: never). Under Azure's 4 min and AWS NLB's 350 s, the
    # shortest idle timeouts of common cloud load balancers and NAT gateways, with a minute to spare.
    pool_idle_timeout_s: float = 180.0
    # A connection idle longer than this is checked (PING) before reuse; None: never.
    pool_check_after_ms: float | None = 30_000.0
    # Connections retired this long after opening (0: after one checkout; None: never), plus a
    # random share of the jitter.
    pool_max_lifetime_s: float | None = None
    pool_lifetime_jitter_s: float = 0.0
    connect_timeout_ms: float = 500.0
    command_timeout_ms: float = 500.0
    key_prefix: str = "ip:"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    target: str = "/ok"
    on_redis_error: ErrorPolicy = "allow"
    retry_after_s: int = 1
    mux_connections: int = 1
    batch_window_ms: float = 0.0
    batch_max_keys: int = 1000
    batch_max_pending: int = 1_000_000
    batch_ack: BatchAck = "flush"
    shutdown_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    keepalive_timeout_s: float = 60.0
    max_connections: int = 10_000
    # Request bodies are read and discarded up to this size; larger ones get 413 (httptools front end).
    max_body_bytes: int = 1024 * 1024
    count_header: str | None = None
    # Per-client rate limit (None: no limit, and the request path is exactly the unlimited one).
    limit: Rate | None = None
    # sliding: the closest to an exact sliding log of the three (docs/limits.md).
    limit_algorithm: LimitAlgorithm = "sliding"
    # RateLimit-Policy and RateLimit fields on allowed responses too, not only on 429s.
    limit_headers: bool = False
    access_log: AccessLog = "off"
    log_level: str = "INFO"
    # The proxy action (httptools front end): with upstreams, counted requests are forwarded to them
    # instead of redirected. Names follow HAProxy's where the concept is the same.
    upstreams: tuple[UpstreamServer, ...] = ()
    balance: Balance = "roundrobin"
    # Per server: most connections open at once (HAProxy's server maxconn) and the longest wait
    # for one when all are busy (HAProxy's timeout queue); 503 after it.
    upstream_maxconn: int = 100
    upstream_queue_timeout_ms: float = 1000.0
    upstream_connect_timeout_ms: float = 1000.0
    # From the request sent to the response head (504 after it), and between body reads or writes.
    upstream_response_timeout_s: float = 30.0
    upstream_body_timeout_s: float = 30.0
    # Kept-alive connections: below the common upstream keep-alive timeouts (uvicorn closes idle
    # connections after 5 s, nginx after 75 s), so the upstream is not the one to close them.
    upstream_idle_timeout_s: float = 4.0
    upstream_max_lifetime_s: float = 300.0
    upstream_max_requests: int = 1000
    # Passive health: this many consecutive failures eject a server for upstream_fail_timeout_s
    # (or, with active checks, until they see it rise).
    upstream_max_fails: int = 3
    upstream_fail_timeout_s: float = 10.0
    # Active health checks: GET this path every interval; rise/fall consecutive results flip the state.
    health_check_path: str | None = None
    health_check_interval_s: float = 2.0
    # A check's whole time (connect, send, status line); None: the interval, as HAProxy's
    # `timeout check` defaults to `inter`.
    health_check_timeout_s: float | None = None
    health_check_rise: int = 2
    health_check_fall: int = 3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"invalid mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.pool_size < 1:
            raise ConfigError(f"invalid pool size {self.pool_size}: must be >= 1")
        for name in ("pool_wait_ms", "connect_timeout_ms", "command_timeout_ms", "batch_window_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"invalid {name.replace('_', '-')}: must be >= 0")
        if self.pool_min_size < 0 or self.pool_min_size > self.pool_size:
            raise ConfigError(f"invalid pool-min-size {self.pool_min_size}: must be between 0 and pool-size")
        if self.pool_idle_timeout_s < 0 or self.pool_lifetime_jitter_s < 0:
            raise ConfigError("pool-idle-timeout-s and pool-lifetime-jitter-s must be >= 0")
        if self.pool_check_after_ms is not None and self.pool_check_after_ms < 0:
            raise ConfigError("pool-check-after-ms must be >= 0 (or off)")
        if self.pool_max_lifetime_s is not None and self.pool_max_lifetime_s < 0:
            raise ConfigError("pool-max-lifetime-s must be >= 0 (or off)")
        if self.pool_max_lifetime_s == 0 and self.mode in ("multiplexed", "batched"):
            raise ConfigError(
                "pool-max-lifetime-s 0 means one checkout per connection; multiplexed and batched share "
                "their connections (no checkouts): give a lifetime in seconds, or off"
            )
        if self.connect_timeout_ms == 0 or self.command_timeout_ms == 0:
            raise ConfigError("connect and command timeouts must be > 0")
        if not self.target.startswith("/") or any(c in self.target for c in "\r\n"):
            raise ConfigError(f"invalid target {self.target!r}: must be a path starting with /")
        if self.on_redis_error not in get_args(ErrorPolicy):
            raise ConfigError(f"invalid on-redis-error {self.on_redis_error!r}: choose allow or deny")
        if self.mux_connections < 1:
            raise ConfigError("mux-connections must be >= 1")
        if self.batch_max_keys < 1 or self.batch_max_pending < 1:
            raise ConfigError("batch-max-keys and batch-max-pending must be >= 1")
        if self.request_timeout_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ConfigError("request and keep-alive timeouts must be > 0")
        if self.cluster and self.mode == "naive":
            raise ConfigError("naive mode does not support Redis Cluster; use pooled, raw, multiplexed or batched")
        if self.cluster and self.redis.db:
            raise ConfigError("Redis Cluster has only database 0")
        if self.workers < 1:
            raise ConfigError("workers must be >= 1")
        if self.worker_hang_timeout_s <= 0:
            raise ConfigError("worker-hang-timeout-s must be > 0")
        if self.workers > 1 and self.listen[1] == 0:
            raise ConfigError("--workers needs a fixed listen port: with port 0 each worker would get its own")
        if self.http not in HTTP_FRONT_ENDS:
            raise ConfigError(f"invalid http front end {self.http!r}: choose from {', '.join(HTTP_FRONT_ENDS)}")
        if self.max_body_bytes < 0:
            raise ConfigError("max-body-bytes must be >= 0")
        if self.max_connections < 1:
            raise ConfigError("max-connections must be >= 1")
        if self.count_header is not None and not self.count_header.replace("-", "").isalnum():
            raise ConfigError(f"invalid count header name {self.count_header!r}: letters, digits and '-' only")
        if self.access_log not in get_args(AccessLog):
            raise ConfigError(f"invalid access-log {self.access_log!r}: choose off or combined")
        if self.batch_ack not in get_args(BatchAck):
            raise ConfigError(f"invalid batch-ack {self.batch_ack!r}: choose flush or none")
        self._check_upstream()
        self._check_limit()

    def _check_upstream(self) -> None:
        if self.balance not in BALANCES:
            raise ConfigError(f"invalid balance {self.balance!r}: choose from {', '.join(BALANCES)}")
        if self.upstreams and self.http != "httptools":
            raise ConfigError("--upstream needs the httptools front end (--http httptools)")
        if self.upstream_maxconn < 1 or self.upstream_max_requests < 1:
            raise ConfigError("upstream-maxconn and upstream-max-requests must be >= 1")
        for name in (
            "upstream_queue_timeout_ms",
            "upstream_connect_timeout_ms",
            "upstream_response_timeout_s",
            "upstream_body_timeout_s",
            "upstream_idle_timeout_s",
            "upstream_max_lifetime_s",
            "upstream_fail_timeout_s",
            "health_check_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"invalid {name.replace('_', '-')}: must be > 0")
        if self.health_check_timeout_s is not None and self.health_check_timeout_s <= 0:
            raise ConfigError("invalid health-check-timeout-s: must be > 0")
        if self.upstream_max_fails < 1 or self.health_check_rise < 1 or self.health_check_fall < 1:
            raise ConfigError("upstream-max-fails, health-check-rise and health-check-fall must be >= 1")
        path = self.health_check_path
        if path is not None and (not path.startswith("/") or any(c in path for c in "\r\n \t")):
            raise ConfigError(f"invalid health-check-path {path!r}: must be a path starting with /")

    def _check_limit(self) -> None:
        if self.limit_algorithm not in LIMIT_ALGORITHMS:
            raise ConfigError(
                f"invalid limit algorithm {self.limit_algorithm!r}: choose from {', '.join(LIMIT_ALGORITHMS)}"
            )
        if self.limit is None:
            if self.limit_headers:
                raise ConfigError("--limit-headers needs --limit")
            return
        if self.mode == "off":
            raise ConfigError(
                "--limit needs Redis to share the limit, and mode off never talks to Redis: "
                "choose naive, pooled, raw, multiplexed or batched"
            )
        if self.limit.burst != self.limit.limit and self.limit_algorithm != "gcra":
            raise ConfigError(f"a burst applies to --limit-algorithm gcra only, not {self.limit_algorithm}")
        problem = check_prefix(self.key_prefix)
        if problem is not None:
            raise ConfigError(problem)

    @property
    def seeds(self) -> tuple[RedisTarget, ...]:
        """Every configured Redis address: the one server, or the cluster's seed nodes."""
        return (self.redis, *self.cluster_seeds)

    @property
    def redis_description(self) -> str:
        if not self.cluster:
            return self.redis.url
        return "cluster " + ",".join(t.url for t in self.seeds)

    @property
    def lifecycle(self) -> Lifecycle:
        """The pool lifecycle these options ask for (`gateway.lifecycle`)."""
        check = self.pool_check_after_ms
        return Lifecycle(
            min_size=self.pool_min_size,
            idle_timeout=self.pool_idle_timeout_s or None,
            check_after=None if check is None else check / 1000,
            max_lifetime=self.pool_max_lifetime_s,
            lifetime_jitter=self.pool_lifetime_jitter_s,
        )

    @property
    def pool_wait(self) -> float:
        return self.pool_wait_ms / 1000

    @property
    def health_check_timeout(self) -> float:
        """One check's whole time: --health-check-timeout-s, else the interval."""
        t = self.health_check_timeout_s
        return self.health_check_interval_s if t is None else t

    @property
    def connect_timeout(self) -> float:
        return self.connect_timeout_ms / 1000

    @property
    def command_timeout(self) -> float:
        return self.command_timeout_ms / 1000


def parse_limit(text: str | None) -> Rate | None:
    """`--limit`: `N/UNIT[:burst=B]`, or empty/`off` for no limit."""
    if text is None or text.strip().lower() in ("", "off", "none"):
        return None
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
