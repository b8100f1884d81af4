"""Limits a hostile or merely numerous client meets: the open-file limit (each process sizes
--max-connections under it), and the admin listener's own guards (head timeout, connection limit)."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from gateway.limits import ADMIN_MAX_CONNECTIONS, PROCESS_RESERVE

from ..helpers import RedisServer, free_port, http_get, make_config, running_gateway

NOFILE = 256
POOL = 4


def _low_nofile() -> None:
    # Soft and hard both lowered: the gateway cannot raise the soft limit past this.
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@contextmanager
def _gateway(*args: str) -> Iterator[tuple[subprocess.Popen[str], int, int, list[str]]]:
    """A gateway process under an open-file limit of NOFILE; yields it, its ports and (after) its log."""
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--pool-size", str(POOL), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_low_nofile,
    )  # fmt: skip
    log: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_get(f"http://127.0.0.1:{admin}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield proc, port, admin, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        print(err)  # shown by pytest when the test fails
        log.extend(err.splitlines())


def _idle_connections(stack: ExitStack, port: int, n: int) -> list[socket.socket]:
    return [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in range(n)]


def _refused_with_503(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        return sock.recv(100).startswith(b"HTTP/1.1 503")
    except OSError:
        return False


def test_open_file_limit_lowers_max_connections_and_the_admin_listener_still_answers(
    redis_server: RedisServer,
) -> None:
    expected = NOFILE - POOL - ADMIN_MAX_CONNECTIONS - PROCESS_RESERVE
    with _gateway("--redis-url", redis_server.url, "--mode", "raw") as (_proc, port, admin, log), ExitStack() as stack:
        # More idle clients than the process has files for: without the budget, accept()
        # fails with EMFILE and the admin listener stops answering too.
        socks = _idle_connections(stack, port, NOFILE + 50)
        deadline = time.monotonic() + 10
        while True:  # the gateway accepts (and refuses) the last connections at its own pace
            status, body = http_get(f"http://127.0.0.1:{admin}/stats")
            assert status == 200
            conns = json.loads(body)["connections"]
            if conns["rejected"] >= len(socks) - expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert conns["max"] == expected and conns["open"] == expected
        assert conns["rejected"] == len(socks) - expected
        assert http_get(f"http://127.0.0.1:{admin}/healthz")[0] == 200
        # Those beyond the limit were told so (503), not reset.
        assert all(_refused_with_503(s) for s in socks[expected:])
        # A request on an admitted connection is still served.
        socks[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert socks[0].recv(100).startswith(b"HTTP/1.1 302")
    lines = [line for line in log if "open-file limit" in line]
    assert len(lines) == 1, log
    assert f"open-file limit {NOFILE} (hard {NOFILE}): max-connections lowered from 10000 to {expected}" in lines[0]
    assert "WARNING" in lines[0]


def test_each_worker_sizes_its_own_max_connections(redis_server: RedisServer) -> None:
    args = ("--redis-url", redis_server.url, "--mode", "raw", "--workers", "2", "--max-connections", "5000")
    with _gateway(*args) as (_proc, port, admin, log):
        assert http_get(f"http://127.0.0.1:{port}/")[0] == 302
        doc = json.loads(http_get(f"http://127.0.0.1:{admin}/stats")[1])
        # The supervisor sums the workers' documents: each worker lowered its own limit.
        assert doc["connections"]["max"] == 2 * (NOFILE - POOL - ADMIN_MAX_CONNECTIONS - PROCESS_RESERVE)
    lines = [line for line in log if "open-file limit" in line]
    assert len(lines) == 2, log
    assert any("worker 0" in line for line in lines) and any("worker 1" in line for line in lines)
    assert all("max-connections lowered from 5000" in line for line in lines)


async def _send(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def test_admin_listener_closes_trickling_connections_after_the_request_timeout(redis_server: RedisServer) -> None:
    config = make_config(redis_server.url, admin_listen=("127.0.0.1", free_port()), request_timeout_s=0.5)
    async with running_gateway(config):
        admin = config.admin_listen[1]  # type: ignore[index]
        start = time.monotonic()
        conns = [await _send(admin, b"GET /stats HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]
        for reader, writer in conns:
            async with asyncio.timeout(3):
                assert (await reader.read()).startswith(b"HTTP/1.1 408")
            writer.close()
        assert time.monotonic() - start < 2
        # The listener still serves complete requests.
        reader, writer = await _send(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()


async def test_admin_listener_refuses_connections_beyond_its_limit(redis_server: RedisServer) -> None:
    config = make_config(redis_server.url, admin_listen=("127.0.0.1", free_port()), request_timeout_s=5.0)
    async with running_gateway(config):
        admin = config.admin_listen[1]  # type: ignore[index]
        held = [await _send(admin, b"") for _ in range(ADMIN_MAX_CONNECTIONS)]
        reader, writer = await _send(admin, b"")
        async with asyncio.timeout(3):
            assert (await reader.read()).startswith(b"HTTP/1.1 503")
        writer.close()
        # A slot freed is a slot served.
        held.pop()[1].close()
        await asyncio.sleep(0.1)
        reader, writer = await _send(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(3):
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        for _, w in held:
            w.close()


def test_supervisor_admin_listener_is_guarded_too(redis_server: RedisServer) -> None:
    args = ("--redis-url", redis_server.url, "--workers", "2", "--request-timeout-s", "0.5")
    with _gateway(*args) as (_proc, _port, admin, _log), ExitStack() as stack:
        trickling = _idle_connections(stack, admin, 5)
        for s in trickling:
            s.sendall(b"GET /stats HTTP/1.1\r\n")
        held = _idle_connections(stack, admin, ADMIN_MAX_CONNECTIONS - len(trickling))
        extra = _idle_connections(stack, admin, 1)[0]
        assert _refused_with_503(extra)
        for s in trickling + held:
            s.settimeout(3)
            assert s.recv(100).startswith(b"HTTP/1.1 408")
        assert http_get(f"http://127.0.0.1:{admin}/healthz")[0] == 200


async def test_admin_clients_that_close_keep_alive_connections_free_their_slots(redis_server: RedisServer) -> None:
    # curl, a health checker: one keep-alive request, then the client closes. More of them
    # than the limit, one after another, must all be served.
    config = make_config(redis_server.url, admin_listen=("127.0.0.1", free_port()))
    async with running_gateway(config):
        admin = config.admin_listen[1]  # type: ignore[index]
        for _ in range(ADMIN_MAX_CONNECTIONS + 16):
            reader, writer = await _send(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(3):
                assert (await reader.readuntil(b"}")).startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()
        # A client that half-closes after its request still gets the answer.
        reader, writer = await _send(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write_eof()
        async with asyncio.timeout(3):
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
