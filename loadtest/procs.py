"""A real redis-server on a free loopback port, for the benchmark, the chaos
scenarios and the tests. It owns its process and its data directory."""

from __future__ import annotations

import os
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
