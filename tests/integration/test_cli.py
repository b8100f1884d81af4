"""The gateway as an operator runs it: a process, its options, its exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gateway import native

from ..helpers import RedisServer, free_port, http_get


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_option() -> None:
    out = _run("--help").stdout
    for opt in ("--mode", "--listen", "--redis-url", "--pool-size", "--pool-wait-ms", "--key-prefix",
                "--trusted-proxy", "--admin-listen", "--target", "--on-redis-error"):  # fmt: skip
        assert opt in out
    assert "REDIS_URL" in out and "GATEWAY_MODE" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--mode", "bogus"], "--mode"),
        (["--redis-url", "http://nope"], "Redis URL"),
        (["--redis-url", "redis://h:port"], "Redis URL"),
        (["--trusted-proxy", "10.0.0.0/99"], "trusted proxy"),
        (["--pool-size", "0"], "pool size"),
        (["--listen", "x:y"], "listen"),
        (["--workers", "0"], "workers"),
        (["--workers", "many"], "workers"),
        (["--workers", "2", "--listen", "127.0.0.1:0"], "fixed listen port"),
        (["--admin-listen", "unix:"], "admin listen"),
        (["--redis-url", "redis://a:1,b:2"], "--redis-cluster"),
        (["--mode", "naive", "--redis-url", "redis+cluster://a:1"], "naive"),
    ],
)
def test_bad_value_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    r = _run(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run("--listen", f"127.0.0.1:{port}", "--admin-listen", "off")
    assert r.returncode == 1
    assert "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("build", ["as built", "interpreted"])
def test_process_serves_reports_and_exits_0_on_sigterm(redis_server: RedisServer, build: str) -> None:
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_PURE"}
    if build == "interpreted":
        env["GATEWAY_PURE"] = "1"  # the request path from its sources, whatever is compiled (gateway.native)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--redis-url", redis_server.url, "--mode", "raw"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                status, _ = http_get(f"http://127.0.0.1:{port}/hello")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.05)
        assert status == 302
        import json

        status, body = http_get(f"http://127.0.0.1:{admin}/stats")
        stats = json.loads(body)
        assert stats["mode"] == "raw" and stats["requests"]["counted"] == 1
        assert stats["build"] == (native.state if build == "as built" else "interpreted (GATEWAY_PURE is set)")
        for field in ("size", "idle", "in_use", "waiting", "created", "errors", "wait_timeouts"):
            assert field in stats["pool"]
        assert http_get(f"http://127.0.0.1:{admin}/healthz")[0] == 200
        assert http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert redis_server.client().get("ip:127.0.0.1") == b"1"
