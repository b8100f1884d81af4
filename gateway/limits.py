"""The open-file budget: how many client connections fit under RLIMIT_NOFILE.

Every client connection, Redis connection and admin connection is a file
descriptor. Under a soft limit of 1024 (a common container and systemd default),
a --max-connections of 10,000 is never reached: accept() fails with EMFILE
first, for the admin listener as much as for the front, and nothing says why.

So at start each gateway process (each worker, with --workers) raises its soft
limit towards the hard one, as far as it needs, and lowers its effective
max-connections to what is left after a reserve: the Redis connections its mode
may open, the admin listener's connection limit, and the process's own files
(stdio, the event loop, the listeners). `plan` is the computation, pure and
tested; `raise_open_file_limit` is the only place that calls setrlimit.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace

from .config import Config

# Connections the admin listener serves at once; more get 503 and are closed.
ADMIN_MAX_CONNECTIONS = 64
# The process's own files: stdio, the event loop's selector and self-pipe, the listening
# sockets, a connection accepted only to be refused with 503, imported modules' files.
PROCESS_RESERVE = 32
# Redis Cluster: the nodes are not known before the slot map is read; assume this many masters.
CLUSTER_NODES_ASSUMED = 3
# With an unlimited hard limit, raise the soft one no further than this (Linux's default nr_open).
UNLIMITED_CEILING = 1 << 20


def redis_connections(config: Config) -> int:
    """The most Redis connections this configuration opens at once."""
    per_node = {
        "off": 0,
        "naive": config.pool_size,
        "pooled": config.pool_size,
        "raw": config.pool_size,
        "multiplexed": config.mux_connections,
        "batched": 1,
    }[config.mode]
    if config.cluster and per_node:
        # One pool or multiplexer per master, and a connection for reading the slot map.
        return per_node * max(CLUSTER_NODES_ASSUMED, len(config.seeds)) + 1
    return per_node


@dataclass(frozen=True)
class FileBudget:
    """How the open-file limit is shared out; `max_connections` is the effective front limit."""

    soft: int  # the soft limit in force after raising it
    hard: int  # -1 for unlimited
    before: int  # the soft limit found at start
    requested: int  # --max-connections
    redis: int
    admin: int
    process: int
    max_connections: int

    @property
    def reserved(self) -> int:
        return self.redis + self.admin + self.process

    @property
    def lowered(self) -> bool:
        return self.max_connections < self.requested

    def describe(self) -> str:
        """The one log line saying what the limit is and what it allows."""
        hard = "unlimited" if self.hard < 0 else str(self.hard)
        limit = f"open-file limit {self.soft} (hard {hard}"
        limit += f", raised from {self.before})" if self.soft > self.before else ")"
        reserve = (
            f"reserving {self.reserved} for Redis ({self.redis}), the admin listener ({self.admin}) "
            f"and the process with its upstream connections ({self.process})"
        )
        if self.lowered:
            return f"{limit}: max-connections lowered from {self.requested} to {self.max_connections}, {reserve}"
        return f"{limit}: max-connections {self.max_connections}, {reserve}"


def wanted_soft_limit(config: Config) -> int:
    """The soft limit under which --max-connections is reachable with the reserve intact."""
    return config.max_connections + reserve(config)[3]


def upstream_connections(config: Config) -> int:
    """The most upstream connections the proxy opens at once: each server's maxconn and its check."""
    per_server = config.upstream_maxconn + (1 if config.health_check_path is not None else 0)
    return len(config.upstreams) * per_server


def reserve(config: Config) -> tuple[int, int, int, int]:
    """(Redis, admin, process, total) files set aside from the client connections; the process's
    share includes the proxy's upstream connections."""
    redis = redis_connections(config)
    admin = ADMIN_MAX_CONNECTIONS if config.admin_listen is not None else 0
    process = PROCESS_RESERVE + upstream_connections(config)
    return redis, admin, process, redis + admin + process


def plan(config: Config, soft: int, hard: int, before: int | None = None) -> FileBudget:
    """The effective max-connections under a soft limit `soft` (hard `hard`, -1 for unlimited).

    Pure: no I/O. At least one client connection is always allowed, so a limit too
    small for the reserve still serves (and the log line shows the shortfall).
    """
    redis, admin, process, total = reserve(config)
    allowed = max(1, soft - total)
    return FileBudget(
        soft=soft,
        hard=hard,
        before=soft if before is None else before,
        requested=config.max_connections,
        redis=redis,
        admin=admin,
        process=process,
        max_connections=min(config.max_connections, allowed),
    )


def raised_target(current: int, hard: int, wanted: int) -> int:
    """The soft limit to ask for: `wanted`, capped by the hard limit (-1 unlimited), never lowered."""
    ceiling = UNLIMITED_CEILING if hard < 0 else hard
    return max(current, min(wanted, ceiling))


def apply(config: Config) -> tuple[Config, FileBudget]:
    """Raise this process's soft limit as far as `config` needs, and return the config with
    the max-connections that fits under it, and the budget (for the log line)."""
    before, soft, hard = raise_open_file_limit(wanted_soft_limit(config))
    budget = plan(config, soft, hard, before)
    return replace(config, max_connections=budget.max_connections), budget


def raise_open_file_limit(wanted: int) -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (never past the hard limit, never lower).

    Returns (soft before, soft now, hard), hard as -1 when unlimited. The only
    place that reads or sets the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    hard_n = -1 if hard == infinite else hard
    soft_n = UNLIMITED_CEILING if soft == infinite else soft
    before = soft_n
    target = raised_target(soft_n, hard_n, wanted)
    if target > soft_n:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft_n = target
        except (ValueError, OSError):  # e.g. above fs.nr_open: keep the limit we have
            pass
    return before, soft_n, hard_n
