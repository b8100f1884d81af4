"""RedisConnection's bookkeeping without a socket: a FIFO of futures fed by the parser."""

from __future__ import annotations

import asyncio

import pytest

from gateway.connection import RedisConnection
from gateway.errors import AccountingError


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def _conn(coalesce: bool = False, timeout: float | None = 5.0) -> tuple[RedisConnection, FakeTransport]:
    conn = RedisConnection(asyncio.get_running_loop(), timeout, coalesce)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


async def test_replies_go_to_callers_in_send_order() -> None:
    conn, _ = _conn()
    futs = [conn.send("INCRBY", f"k{i}", i) for i in range(5)]
    conn.data_received(b":0\r\n:1\r\n:")
    conn.data_received(b"2\r\n:3\r\n:4\r\n")
    assert [f.result() for f in futs] == [0, 1, 2, 3, 4]


async def test_abandoned_command_reply_is_dropped_not_passed_on() -> None:
    conn, _ = _conn()
    first = conn.send("INCRBY", "a", 1)
    second = conn.send("INCRBY", "b", 1)
    first.cancel()
    conn.data_received(b":100\r\n:200\r\n")
    assert second.result() == 200
    assert conn.pending == 0


async def test_same_tick_commands_leave_in_one_write() -> None:
    conn, transport = _conn(coalesce=True)
    futs = [conn.send("INCRBY", "k", 1) for _ in range(50)]
    assert transport.writes == []
    await asyncio.sleep(0)
    assert len(transport.writes) == 1
    conn.data_received(b"".join(b":%d\r\n" % i for i in range(50)))
    assert [f.result() for f in futs] == list(range(50))


async def test_unsolicited_reply_kills_connection() -> None:
    conn, transport = _conn()
    conn.data_received(b":1\r\n")
    assert transport.aborted and not conn.usable
    with pytest.raises(AccountingError):
        conn.send("PING")


async def test_refusal_before_any_command_is_counted_by_its_code() -> None:
    conn, transport = _conn()
    conn.data_received(b"-ERR max number of clients reached\r\n")
    assert transport.aborted
    with pytest.raises(AccountingError) as exc:
        conn.send("PING")
    assert exc.value.kind == "redis:ERR" and "max number of clients" in str(exc.value)


async def test_protocol_error_fails_everything_in_flight() -> None:
    conn, transport = _conn()
    futs = [conn.send("PING") for _ in range(3)]
    conn.data_received(b"!garbage\r\n")
    for f in futs:
        with pytest.raises(AccountingError) as exc:
            f.result()
        assert exc.value.kind == "protocol_error"
    assert transport.aborted


async def test_overdue_reply_fails_connection() -> None:
    conn, transport = _conn(timeout=0.05)
    fut = conn.send("PING")
    with pytest.raises(AccountingError) as exc:
        await fut
    assert exc.value.kind == "timeout"
    assert transport.aborted


async def test_connection_lost_fails_in_flight() -> None:
    conn, _ = _conn()
    fut = conn.send("PING")
    conn.connection_lost(ConnectionResetError())
    with pytest.raises(AccountingError) as exc:
        fut.result()
    assert exc.value.kind == "connection_lost"
