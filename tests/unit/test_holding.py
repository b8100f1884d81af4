"""HeldTransport: bytes held for a commit reach the socket only once it is released."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.holding import HeldTransport


class RecordingTransport:
    """Stands in for a client socket's transport: records what reaches it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        assert not self.closed, "write_eof after close"
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default


class Commit:
    def __init__(self) -> None:
        self.holders: list[HeldTransport] = []


def held() -> tuple[HeldTransport, RecordingTransport]:
    raw = RecordingTransport()
    return HeldTransport(raw), raw  # type: ignore[arg-type]


def test_writes_pass_through_when_nothing_is_held() -> None:
    t, raw = held()
    t.write(b"a")
    t.writelines([b"b", b"c"])
    assert raw.written == [b"a", b"bc"]
    assert not t.holding


def test_held_bytes_are_sent_in_order_in_one_write_on_release() -> None:
    t, raw = held()
    c = Commit()
    t.write(b"before ")
    t.hold(c)
    t.write(b"HTTP/1.1 302 ")
    t.writelines([b"Found", b"\r\n\r\n"])
    assert raw.written == [b"before "]
    assert c.holders == [t]
    t.release(c)
    assert raw.written == [b"before ", b"HTTP/1.1 302 Found\r\n\r\n"]
    assert not t.holding
    t.write(b"after")
    assert raw.written[-1] == b"after"


def test_holding_for_a_later_commit_keeps_everything_until_that_one() -> None:
    # Pipelined requests: the second response's commit is later; the first release is not enough.
    t, raw = held()
    first, second = Commit(), Commit()
    t.hold(first)
    t.write(b"one;")
    t.hold(second)
    t.hold(second)  # registered once per commit
    t.write(b"two;")
    assert first.holders == [t] and second.holders == [t]
    t.release(first)
    assert raw.written == []
    t.release(second)
    assert raw.written == [b"one;two;"]


def test_close_waits_for_the_release() -> None:
    t, raw = held()
    c = Commit()
    t.hold(c)
    t.write(b"response")
    t.close()  # aiohttp closing a Connection: close exchange right after writing
    assert not raw.closed and raw.written == []
    t.release(c)
    assert raw.written == [b"response"] and raw.closed


def test_close_without_a_hold_is_immediate() -> None:
    t, raw = held()
    t.close()
    assert raw.closed


def test_release_after_the_client_left_drops_the_bytes() -> None:
    t, raw = held()
    c = Commit()
    t.hold(c)
    t.write(b"response")
    t.abort()  # passed through: the connection is gone at once
    t.release(c)
    assert raw.aborted and raw.written == []


def test_other_transport_calls_pass_through() -> None:
    t, _ = held()
    assert t.get_extra_info("peername") == ("127.0.0.1", 5555)
    assert not t.is_closing()


def test_half_close_waits_for_the_release() -> None:
    t, raw = held()
    c = Commit()
    t.hold(c)
    t.write(b"response")
    t.write_eof()
    assert not raw.eof
    t.release(c)
    assert raw.written == [b"response"] and raw.eof


def test_a_held_bytearray_is_copied() -> None:
    # The writer may reuse its buffer once write returns.
    t, raw = held()
    c = Commit()
    t.hold(c)
    data = bytearray(b"abc")
    t.write(data)
    data[:] = b"xyz"
    t.release(c)
    assert raw.written == [b"abc"]


def test_every_transport_method_is_implemented() -> None:
    # No method may fall back to asyncio.Transport's NotImplementedError stubs.
    missing = [
        name
        for name in dir(asyncio.Transport)
        if not name.startswith("_") and getattr(HeldTransport, name) is getattr(asyncio.Transport, name)
    ]
    assert missing == []
    assert isinstance(held()[0], asyncio.Transport)
