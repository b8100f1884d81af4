"""--workers: several processes on one port, one supervisor, summed /stats."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ..helpers import RedisServer, free_port, http_get

POOL = 3


@contextmanager
def _supervisor(redis_url: str, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--workers", "2", "--listen", f"127.0.0.1:{port}",
         "--admin-listen", f"127.0.0.1:{admin}", "--redis-url", redis_url, "--pool-size", str(POOL), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base, admin_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    try:
        # The supervisor's admin listener opens only once every worker answers.
        deadline = time.monotonic() + 30
        while True:
            try:
                http_get(admin_base + "/healthz")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        yield proc, base, admin_base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        print(err)  # the supervisor's and workers' log, shown by pytest when the test fails


def _stats(admin_base: str, per_worker: bool = False) -> dict[str, Any]:
    status, body = http_get(admin_base + "/stats" + ("?per_worker=1" if per_worker else ""))
    assert status == 200
    return json.loads(body)  # type: ignore[no-any-return]


def _wait(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_workers_share_the_port_and_stats_add_up(own_redis: RedisServer) -> None:
    redis_server = own_redis
    with _supervisor(redis_server.url, "--mode", "raw") as (proc, base, admin):
        for _ in range(200):
            assert http_get(base + "/")[0] == 302
        doc = _stats(admin, per_worker=True)
        per = doc["per_worker"]
        assert len(per) == 2 and len({w["pid"] for w in per}) == 2 and proc.pid not in {w["pid"] for w in per}
        served = [w["stats"]["requests"]["total"] for w in per]
        assert all(n > 0 for n in served), served  # the kernel spread the connections
        assert doc["requests"]["total"] == doc["requests"]["counted"] == sum(served) == 200
        assert doc["accounting_latency_s"]["counts"] and sum(doc["accounting_latency_s"]["counts"]) == 200
        assert doc["pool"]["max"] == 2 * POOL  # the Redis connection budget: workers x pool size
        assert doc["workers"] == {**doc["workers"], "configured": 2, "answering": 2, "restarts": 0}
        status, body = http_get(admin + "/metrics")
        assert status == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
        }
        assert samples[("gateway_requests_total", (("mode", "raw"), ("outcome", "counted")))] == 200
        assert samples[("gateway_accounting_latency_seconds_count", (("mode", "raw"),))] == 200
        assert samples[("gateway_workers", ())] == 2
        assert http_get(admin + "/readyz")[0] == 200
    assert proc.returncode == 0
    assert redis_server.client().get("ip:127.0.0.1") == b"200"
    # Each worker kept to its own pool of POOL.
    assert redis_server.client().info("stats")["total_connections_received"] <= 2 * POOL + 2


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except (FileNotFoundError, ProcessLookupError):  # reaped before, or while, the file was read
        return True


def test_a_dead_worker_is_restarted(redis_server: RedisServer) -> None:
    with _supervisor(redis_server.url, "--mode", "multiplexed") as (proc, base, admin):
        before = {w["pid"] for w in _stats(admin, per_worker=True)["per_worker"]}
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        # Connections the kernel had already queued for the victim are reset with it (each
        # SO_REUSEPORT socket has its own accept queue), and so can one arriving within a few
        # milliseconds of its exit (measured); after that the survivor takes every connection.
        _wait(lambda: _gone(victim))
        time.sleep(0.2)
        # The survivor serves meanwhile.
        for _ in range(20):
            assert http_get(base + "/")[0] == 302

        def restarted() -> bool:
            doc = _stats(admin, per_worker=True)
            pids = {w["pid"] for w in doc["per_worker"]}
            return doc["workers"]["answering"] == 2 and victim not in pids and len(pids) == 2

        _wait(restarted)
        assert _stats(admin)["workers"]["restarts"] == 1
        for _ in range(100):
            assert http_get(base + "/")[0] == 302
        served = [w["stats"]["requests"]["total"] for w in _stats(admin, per_worker=True)["per_worker"]]
        assert all(n > 0 for n in served), served
    assert proc.returncode == 0
    assert redis_server.client().get("ip:127.0.0.1") == b"120"


def test_a_hung_worker_is_reported_and_replaced(redis_server: RedisServer) -> None:
    # A SIGSTOPped worker used to go unnoticed: /healthz said 200 and new connections the kernel
    # gave it timed out. The supervisor now probes each worker's admin socket every second.
    with _supervisor(redis_server.url, "--mode", "raw", "--worker-hang-timeout-s", "1") as (proc, base, admin):
        victim = min(w["pid"] for w in _stats(admin, per_worker=True)["per_worker"])
        os.kill(victim, signal.SIGSTOP)
        try:
            _wait(lambda: _stats(admin)["workers"]["unresponsive"] == 1)
            status, body = http_get(admin + "/readyz")
            assert status == 503 and json.loads(body)["workers_unresponsive"] == 1, body

            def replaced() -> bool:
                doc = _stats(admin, per_worker=True)
                pids = {w["pid"] for w in doc["per_worker"]}
                return doc["workers"]["answering"] == 2 and victim not in pids

            _wait(replaced, timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        workers = _stats(admin)["workers"]
        assert workers["restarts"] == 1 and workers["killed_unresponsive"] == 1, workers
        assert workers["unresponsive"] == 0, workers
        assert http_get(admin + "/readyz")[0] == 200
        for _ in range(20):
            assert http_get(base + "/")[0] == 302
    assert proc.returncode == 0


def test_sigterm_drains_every_worker(redis_server: RedisServer) -> None:
    # A long window and no acknowledgement: the increments are still held when SIGTERM arrives.
    extra = ("--mode", "batched", "--batch-ack", "none", "--batch-window-ms", "60000")
    with _supervisor(redis_server.url, *extra) as (proc, base, admin):
        for _ in range(150):
            assert http_get(base + "/")[0] == 302
        doc = _stats(admin, per_worker=True)
        assert doc["pool"]["pending_increments"] == 150
        assert all(w["stats"]["pool"]["pending_increments"] > 0 for w in doc["per_worker"])
        assert redis_server.client().get("ip:127.0.0.1") is None
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err.count("stopped") == 3  # two workers and the supervisor
    assert redis_server.client().get("ip:127.0.0.1") == b"150"


def test_port_in_use_with_workers_is_one_line_and_exit_1() -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # would let the workers bind beside it
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "gateway", "--workers", "2", "--listen", f"127.0.0.1:{port}", "--admin-listen",
             "off"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
