"""Which server gets the next request: `roundrobin` (smooth weighted) or `leastconn`.

Owns the choice only. A server that is down or ejected, or that this request
already tried, is never chosen; when none is left the answer is None (the caller
answers 503 at once, without queueing anywhere). No I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from .server import Server


class Balancer:
    def __init__(self, servers: Sequence[Server], algorithm: str, clock: Callable[[], float]) -> None:
        self.servers = tuple(servers)
        self._clock = clock
        self._next = 0  # leastconn's tie-break rotates
        self.pick: Callable[[Collection[Server]], Server | None] = (
            self._leastconn if algorithm == "leastconn" else self._roundrobin
        )
        if len(self.servers) == 1:
            self.pick = self._only  # either algorithm picks it whenever it may be picked

    def _only(self, exclude: Collection[Server] = ()) -> Server | None:
        server = self.servers[0]
        if server.up and not server.ejected_until and not exclude:
            return server  # the usual case, without reading the clock
        if server in exclude or not server.available(self._clock()):
            return None
        return server

    def _roundrobin(self, exclude: Collection[Server] = ()) -> Server | None:
        # nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, not a a a a a b c.
        now = self._clock()
        best: Server | None = None
        total = 0
        for server in self.servers:
            if server in exclude or not server.available(now):
                continue
            server.current_weight += server.weight
            total += server.weight
            if best is None or server.current_weight > best.current_weight:
                best = server
        if best is not None:
            best.current_weight -= total
        return best

    def _leastconn(self, exclude: Collection[Server] = ()) -> Server | None:
        now = self._clock()
        servers = self.servers
        n = len(servers)
        start = self._next
        self._next = (start + 1) % n
        best: Server | None = None
        best_load = 0.0
        for i in range(n):
            server = servers[(start + i) % n]
            if server in exclude or not server.available(now):
                continue
            load = (server.inflight + 1) / server.weight
            if best is None or load < best_load:
                best, best_load = server, load
        return best
