"""A real redis-server on a free loopback port, for the benchmark, the chaos
scenarios and the tests. It owns its process and its data directory."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

import redis

HARNESS = "test-harness"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """Block until something accepts on the loopback port; fail at once if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port} after {timeout} s") from None
            time.sleep(0.02)


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 15.0) -> None:
    """SIGTERM (after SIGCONT, in case it was paused), then SIGKILL if it has not exited in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisProcess:
    def __init__(
        self, *extra: str, port: int | None = None, password: str | None = None, cpus: str | None = None
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.extra = list(extra)
        self.cpus = cpus
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def url_db(self, db: int) -> str:
        return self.url.rsplit("/", 1)[0] + f"/{db}"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        args = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra
        if self.cpus is not None:
            args = ["taskset", "-c", self.cpus, *args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as c:
                    c.ping()
                return self
            except redis.exceptions.AuthenticationError:
                raise
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def client(self, db: int = 0) -> redis.Redis:
        """A connection of the harness's own, named so that client_count() leaves it out."""
        return redis.Redis(port=self.port, password=self.password, db=db, socket_timeout=5, client_name=HARNESS)

    def stop(self) -> None:
        """Graceful: SIGTERM, so an AOF-enabled server persists before exiting."""
        stop_process(self.proc, timeout=10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client_count(self) -> int:
        """Normal clients connected, other than the harness's own connections."""
        with self.client() as c:
            return sum(1 for x in c.client_list(_type="normal") if x.get("name") != HARNESS)

    def counter_sum(self, pattern: str = "ip:*", conn: redis.Redis | None = None) -> int:
        """Sum of the counters matching `pattern` (a given connection, or a new one)."""
        c = conn or self.client()
        try:
            keys = list(c.scan_iter(match=pattern, count=1000))
            return sum(
                sum(int(v) for v in c.mget(keys[i : i + 1000]) if v is not None) for i in range(0, len(keys), 1000)
            )
        finally:
            if conn is None:
                c.close()


class RedisClusterProcesses:
    """A real Redis Cluster: `masters` redis-servers with --cluster-enabled yes on free
    ports, joined by `redis-cli --cluster create`, no replicas, AOF on (a restarted
    node keeps its counters)."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 5000, *extra: str, cpus: str | None = None) -> None:
        self.nodes = [
            RedisProcess(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--appendonly", "yes",
                # Counting must go on for the slots of the nodes that are up.
                "--cluster-require-full-coverage", "no", *extra,
                port=free_cluster_port(), cpus=cpus,
            )
            for _ in range(masters)
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterProcesses:
        for n in self.nodes:
            n.start()
        cli = shutil.which("redis-cli") or "redis-cli"
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        out = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node reports cluster_state:ok and agrees on all 16384 slots."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                good = True
                for n in self.nodes:
                    with n.client() as c:
                        info = c.execute_command("CLUSTER", "INFO")
                        text = info.decode() if isinstance(info, bytes) else str(info)
                        good = good and "cluster_state:ok" in text and "cluster_slots_ok:16384" in text
                if good:
                    return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def node_id(self, node: RedisProcess) -> str:
        with node.client() as c:
            return str(c.execute_command("CLUSTER", "MYID").decode())

    def owner(self, slot: int) -> RedisProcess:
        with self.nodes[0].client() as c:
            for entry in c.execute_command("CLUSTER", "SLOTS"):
                if entry[0] <= slot <= entry[1]:
                    port = int(entry[2][1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"slot {slot} has no owner")

    def counter_sum(self, pattern: str = "ip:*") -> int:
        return sum(self.counters(pattern).values())

    def counters(self, pattern: str = "ip:*", node: RedisProcess | None = None) -> dict[bytes, int]:
        """Every counter in the cluster (or on one node), read from the node that holds it."""
        out: dict[bytes, int] = {}
        for n in [node] if node is not None else self.nodes:
            with n.client() as c:
                keys = list(c.scan_iter(match=pattern, count=1000))
                # One GET per key: MGET across slots is refused in a cluster.
                pipe = c.pipeline(transaction=False)
                for k in keys:
                    pipe.get(k)
                for k, v in zip(keys, pipe.execute() if keys else [], strict=True):
                    out[k] = int(v)
        return out

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()
