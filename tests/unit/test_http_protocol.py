"""The own front end's connection protocol in memory: bytes in, bytes out, no sockets.

Every split of a request stream into two reads, and a byte-at-a-time delivery, must
give the same answers as one read; held responses stay in order until released;
timeouts fire from the server's clock by what the connection is doing.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from gateway.backends.base import Backend
from gateway.config import Config
from gateway.http.httptools_impl import HttpToolsFrontEnd, _Connection
from gateway.pipeline import Pipeline


class RecordingTransport:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.closed = False
        self.ended = False  # write_eof: the write side is closed (a lingering close)
        self.refused: list[bytes] = []  # writes after write_eof
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        if self.ended:
            self.refused.append(bytes(data))  # recorded: raised inside a loop callback, it would be lost
            raise RuntimeError("Cannot call write() after write_eof()")  # as uvloop's
        self.data.append(bytes(data))

    def writelines(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.ended = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    @property
    def output(self) -> bytes:
        return b"".join(self.data)


class Commit:
    def __init__(self) -> None:
        self.holders: list[Any] = []

    def release(self) -> None:
        for holder in self.holders:
            holder.release(self)
        self.holders.clear()


class HoldingBackend(Backend):
    """Batched's contract with --batch-ack flush: increments join the current commit."""

    name = "holding"
    holds_responses = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.commit = Commit()
        self.keys: list[str] = []

    async def incr(self, key: str) -> None:
        raise AssertionError("the held path never awaits")

    def incr_held(self, key: str) -> Commit:  # type: ignore[override]
        self.keys.append(key)
        return self.commit


def _front(backend: Backend | None = None, **kw: Any) -> HttpToolsFrontEnd:
    config = Config(mode="off", **kw)
    if backend is None:
        from gateway.backends.off import OffBackend

        backend = OffBackend(config)
    return HttpToolsFrontEnd(Pipeline(config, backend), config)


def _connect(front: HttpToolsFrontEnd) -> tuple[_Connection, RecordingTransport]:
    conn = _Connection(front)
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def _statuses(data: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


STREAM = (
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nUser-Agent: t\r\n\r\nhello"
    b"PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nTrail: x\r\n\r\n"
    b"HEAD /ok HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET http://x/ok?q HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
)
EXPECTED = [302, 200, 302, 200, 200, 302, 302]


def _normalised(data: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", data)


def test_one_read() -> None:
    front = _front()
    conn, transport = _connect(front)
    conn.data_received(STREAM)
    assert _statuses(transport.output) == EXPECTED
    assert transport.closed  # the last request asked to close
    assert front.pipeline.requests == len(EXPECTED)


def test_every_split_into_two_reads_gives_the_same_answers() -> None:
    front = _front()
    conn, transport = _connect(front)
    conn.data_received(STREAM)
    reference = _normalised(transport.output)
    for cut in range(1, len(STREAM)):
        conn, transport = _connect(front)
        conn.data_received(STREAM[:cut])
        conn.data_received(STREAM[cut:])
        assert _normalised(transport.output) == reference, cut


def test_one_byte_at_a_time() -> None:
    front = _front()
    conn, transport = _connect(front)
    for i in range(len(STREAM)):
        conn.data_received(STREAM[i : i + 1])
    assert _statuses(transport.output) == EXPECTED


@pytest.mark.parametrize("cut", [5, 30, 60])
def test_malformed_after_valid_answers_in_order_then_closes(cut: int) -> None:
    front = _front()
    conn, transport = _connect(front)
    stream = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET / HTTP/1.1\r\nBad Header\r\n\r\n" + b"GET / HTTP/1.1\r\n"
    conn.data_received(stream[:cut])
    conn.data_received(stream[cut:])
    assert _statuses(transport.output) == [302, 302, 400]
    # The rest of what was refused may follow: the write side closes, the rest is dropped, and
    # the connection closes when the client ends its side.
    assert transport.ended and not transport.closed
    conn.data_received(b"Host: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _statuses(transport.output) == [302, 302, 400]
    conn.eof_received()
    assert transport.closed
    assert front.pipeline.requests == 2


@pytest.mark.parametrize(("timeout", "closes_at"), [(10.0, 102.0), (0.5, 100.5)])
def test_a_lingering_close_is_bounded_in_time_and_bytes(timeout: float, closes_at: float) -> None:
    from gateway.http.httptools_impl import LINGER_BYTES

    front = _front(max_body_bytes=10, request_timeout_s=timeout)
    front.now = 100.0
    conn, transport = _connect(front)
    conn.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert _statuses(transport.output) == [413] and transport.ended
    conn.check_timeouts(closes_at - 0.01)
    assert not transport.closed
    conn.check_timeouts(closes_at)  # 2 s, or the request timeout if shorter
    assert transport.closed
    conn, transport = _connect(front)
    conn.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
    for _ in range(LINGER_BYTES // 65536):
        conn.data_received(b"x" * 65536)
    assert transport.ended and not transport.closed
    conn.data_received(b"x")
    assert transport.closed


class Gated(Backend):
    """Each increment waits for its own future (`gates`, in request order); a cancelled one
    escapes the request path, which the front end answers 500 and closes after."""

    name = "gated"
    task_free = True

    def __init__(self, config: Config, n: int) -> None:
        super().__init__(config)
        loop = __import__("asyncio").get_running_loop()
        self.gates = [loop.create_future() for _ in range(n)]
        self.calls = 0

    async def incr(self, key: str) -> int:
        gate = self.gates[self.calls]
        self.calls += 1
        return await gate  # type: ignore[no-any-return]


def _gated(n: int) -> tuple[Gated, _Connection, RecordingTransport]:
    """A connection on the running loop whose first `n` increments wait for `Gated.gates`."""
    backend = Gated(Config(mode="raw"), n)
    front = _front(backend)
    front.loop = __import__("asyncio").get_running_loop()
    conn, transport = _connect(front)
    return backend, conn, transport


def test_answers_settling_after_a_lingering_close_began_are_dropped() -> None:
    import asyncio

    async def scenario() -> None:
        backend, conn, transport = _gated(2)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        backend.gates[0].cancel()  # the first answer is a 500 that ends the connection
        for _ in range(5):
            await asyncio.sleep(0)
        assert _statuses(transport.output) == [500] and transport.ended
        backend.gates[1].set_result(1)  # the second settles after the write side closed
        for _ in range(5):
            await asyncio.sleep(0)
        assert _statuses(transport.output) == [500] and transport.refused == []
        conn.eof_received()
        assert transport.closed

    asyncio.run(scenario())


def test_a_client_that_ended_its_side_is_not_lingered_for() -> None:
    import asyncio

    async def scenario() -> None:
        backend, conn, transport = _gated(1)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nBad Header\r\n\r\n")
        conn.eof_received()  # all it will send is in: the 400's close need not wait for more
        backend.gates[0].set_result(1)
        for _ in range(5):
            await asyncio.sleep(0)
        assert _statuses(transport.output) == [302, 400]
        assert transport.closed and not transport.ended

    asyncio.run(scenario())


def test_connect_lingers_and_the_drain_ends_a_linger() -> None:
    front = _front()
    conn, transport = _connect(front)
    conn.data_received(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n\x16\x03\x01")
    assert _statuses(transport.output) == [405] and transport.ended and not transport.closed
    conn.drain()  # shutting down: the linger ends at once
    assert transport.closed
    conn, transport = _connect(front)
    front.draining = True
    conn.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
    assert _statuses(transport.output) == [413] and transport.closed and not transport.ended  # no linger


def test_no_lingering_after_a_timeout_or_a_half_close_mid_body() -> None:
    front = _front(max_body_bytes=10)
    front.now = 100.0
    conn, transport = _connect(front)
    conn.data_received(b"GET / HTTP/1.1\r\nHo")
    conn.check_timeouts(111.0)
    assert _statuses(transport.output) == [408] and transport.closed and not transport.ended
    conn, transport = _connect(front)
    conn.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
    conn.eof_received()  # half-closed mid-body: nothing more will come
    assert transport.closed and not transport.ended


def test_held_responses_wait_for_the_commit_in_order() -> None:
    backend = HoldingBackend(Config(mode="batched"))
    front = _front(backend)
    conn, transport = _connect(front)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.output == b""  # both held
    assert backend.keys == ["ip:127.0.0.1"] * 2
    first = backend.commit
    backend.commit = Commit()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first.release()  # the connection holds for the later commit now: nothing yet
    assert transport.output == b""
    backend.commit.release()  # releasing the later commit releases everything before it
    assert _statuses(transport.output) == [302, 200, 302]
    assert transport.closed  # the close waited for the held bytes


def test_held_responses_of_a_gone_client_are_dropped() -> None:
    backend = HoldingBackend(Config(mode="batched"))
    front = _front(backend)
    conn, transport = _connect(front)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    transport.closed = True
    conn.connection_lost(None)
    backend.commit.release()
    assert transport.data == []
    assert backend.keys == ["ip:127.0.0.1"]  # counted all the same


def test_too_many_held_responses_pause_reading() -> None:
    import asyncio

    async def scenario() -> None:
        backend = HoldingBackend(Config(mode="batched"))
        front = _front(backend)
        front.loop = asyncio.get_running_loop()
        conn, transport = _connect(front)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 5000)
        assert not transport.reading
        assert conn.backlog is not None  # the rest of the read waits unparsed
        while conn.backlog is not None or backend.commit.holders:
            commit, backend.commit = backend.commit, Commit()
            commit.release()
            await asyncio.sleep(0)
        assert transport.reading
        assert len(_statuses(transport.output)) == 5000

    asyncio.run(scenario())


def test_head_timeout_from_the_first_byte() -> None:
    front = _front(request_timeout_s=10, keepalive_timeout_s=60)
    conn, transport = _connect(front)
    front.now = 100.0
    conn.data_received(b"GET / HTTP/1.1\r\nHo")
    conn.check_timeouts(109.0)
    assert transport.data == []
    conn.check_timeouts(110.5)
    assert _statuses(transport.output) == [408] and transport.closed
    assert front.head_timeouts == 1


def test_body_bytes_start_no_head_timer_and_idle_is_the_keep_alive_timeout() -> None:
    front = _front(request_timeout_s=10, keepalive_timeout_s=60)
    conn, transport = _connect(front)
    front.now = 100.0
    conn.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
    front.now = 108.0
    conn.data_received(b"cd")  # the body trickles in: each read restarts its stall timer
    assert _statuses(transport.output) == [302]
    conn.check_timeouts(150.0)  # idle for 42 s: more than a request timeout, less than keep-alive
    assert not transport.closed and _statuses(transport.output) == [302]
    conn.check_timeouts(168.5)
    assert transport.closed and _statuses(transport.output) == [302]  # closed without a 408
    assert front.head_timeouts == 0


def test_stalled_body_gets_408() -> None:
    front = _front(request_timeout_s=10)
    conn, transport = _connect(front)
    front.now = 100.0
    conn.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
    conn.check_timeouts(111.0)
    assert _statuses(transport.output) == [408] and transport.closed
    assert front.pipeline.requests == 0


def test_a_connection_that_never_sends_gets_408() -> None:
    front = _front(request_timeout_s=10)
    conn, transport = _connect(front)
    conn.check_timeouts(front.now + 11)
    assert _statuses(transport.output) == [408] and transport.closed


def test_pipelined_answers_beyond_the_queue_limit_pause_reading() -> None:
    import asyncio

    async def scenario() -> None:
        class Slow(Backend):
            name = "slow"

            def __init__(self, config: Config) -> None:
                super().__init__(config)
                self.gate = asyncio.Event()

            async def incr(self, key: str) -> int:
                await self.gate.wait()
                return 1

        backend = Slow(Config(mode="raw"))
        front = _front(backend)
        front.loop = asyncio.get_running_loop()
        conn, transport = _connect(front)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        assert not transport.reading
        backend.gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert _statuses(transport.output) == [302] * 100
        assert transport.reading

    asyncio.run(scenario())


def test_trailer_fields_are_not_request_headers() -> None:
    front = _front(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    conn, transport = _connect(front)
    conn.data_received(
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nHost: y\r\n\r\n"
    )
    assert _statuses(transport.output) == [302]
    assert front.pipeline.resolver.resolve("127.0.0.1", "1.1.1.1") == "1.1.1.1"
    assert conn.xff == [b"1.1.1.1"]  # the trailer's value never joined the header's


def test_trailer_fields_are_bounded() -> None:
    front = _front()
    conn, transport = _connect(front)
    conn.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Big: ")
    for _ in range(10):
        conn.data_received(b"a" * 4096)
        if transport.ended:
            break
    assert _statuses(transport.output) == [431] and transport.ended
    assert front.pipeline.requests == 0


def test_one_large_read_of_pipelined_requests_stays_within_the_bound() -> None:
    import asyncio

    async def scenario() -> None:
        class Slow(Backend):
            name = "slow"
            task_free = True

            def __init__(self, config: Config) -> None:
                super().__init__(config)
                self.gate = asyncio.get_running_loop().create_future()

            async def incr(self, key: str) -> int:
                return await asyncio.shield(self.gate)

        backend = Slow(Config(mode="raw"))
        front = _front(backend)
        front.loop = asyncio.get_running_loop()
        conn, transport = _connect(front)
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        conn.data_received(request * 10_000)  # one read, 270 KB
        assert not transport.reading
        assert front.pipeline.requests <= 64 + 4096 // len(request) + 1  # bounded, not 10,000
        assert conn.backlog is not None
        backend.gate.set_result(1)
        for _ in range(2000):
            await asyncio.sleep(0)
            if front.pipeline.requests == 10_000 and not conn.queue:
                break
        assert _statuses(transport.output) == [302] * 10_000

    asyncio.run(scenario())


def test_a_client_that_never_reads_is_cut_after_its_close_stalls() -> None:
    front = _front(request_timeout_s=10, keepalive_timeout_s=60)
    conn, _ = _connect(front)

    class Stuck(RecordingTransport):
        aborted = False

        def close(self) -> None:
            self.closed = True  # closing: the write buffer never drains

        def abort(self) -> None:
            self.aborted = True

    stuck = Stuck()
    conn.transport = stuck  # type: ignore[assignment]
    conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.check_timeouts(front.now + 61)  # keep-alive timeout: close
    assert stuck.closed and not stuck.aborted
    conn.check_timeouts(front.now + 62)
    conn.check_timeouts(front.now + 73)  # still closing a request timeout later: cut
    assert stuck.aborted


def test_a_reset_connection_without_a_peer_is_not_served() -> None:
    front = _front()

    class NoPeer(RecordingTransport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 10060) if name == "sockname" else None

    conn = _Connection(front)
    transport = NoPeer()
    conn.connection_made(transport)  # type: ignore[arg-type]
    assert transport.closed and conn not in front.connections
    assert front.pipeline.requests == 0


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
    ],
    ids=["http10-chunked", "http10-keep-alive-and-close"],
)
def test_http10_closes_when_it_must(request_bytes: bytes) -> None:
    front = _front()
    conn, transport = _connect(front)
    conn.data_received(request_bytes + b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert _statuses(transport.output) == [302]
    assert transport.closed


REQ = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def _drained(backend: Backend, before: bytes, after: bytes = b"") -> RecordingTransport:
    """`before` read, then the drain (what HttpToolsFrontEnd.stop does), then `after` read."""
    front = _front(backend)
    conn, t = _connect(front)
    conn.data_received(before)
    front.draining = True
    conn.drain()
    if after:
        conn.data_received(after)
    return t


def test_drain_makes_the_held_answer_the_last_and_reads_nothing_after_it() -> None:
    # SIGTERM while an answer is held for a flush (encoded keep-alive before the drain): it now
    # says close, and a request arriving after the drain began is neither counted nor answered
    # after that close (the client would count it lost and send it again).
    backend = HoldingBackend(Config(mode="off"))
    t = _drained(backend, REQ, REQ)
    assert len(backend.keys) == 1
    backend.commit.release()
    assert _statuses(t.output) == [302] and t.output.count(b"\r\nConnection: close\r\n") == 1
    assert t.closed


class _Callbacks(Backend):
    """A backend whose increments reply on callbacks, each when the test says."""

    name = "callbacks"
    replies_on_callbacks = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.slots: list[Any] = []

    async def incr(self, key: str) -> int:
        raise AssertionError("the callback path is taken")

    def incr_then(self, key: str, slot: Any) -> bool:
        self.slots.append(slot)
        return True


def test_drain_makes_the_awaited_answer_the_last_and_reads_nothing_after_it() -> None:
    backend = _Callbacks(Config(mode="off"))
    t = _drained(backend, REQ, REQ)
    assert len(backend.slots) == 1  # the second request was not read, so not counted
    backend.slots[0].set_result(1)
    assert _statuses(t.output) == [302] and t.output.count(b"\r\nConnection: close\r\n") == 1
    assert t.closed


def test_drain_leaves_earlier_held_answers_as_they_were() -> None:
    backend = HoldingBackend(Config(mode="off"))
    t = _drained(backend, REQ * 2)
    backend.commit.release()
    first, second = t.output.split(b"HTTP/1.1 ")[1:]
    assert b"Connection:" not in first and b"\r\nConnection: close\r\n" in second
    assert t.closed


def test_closing_rewrites_only_the_head() -> None:
    from gateway.http.httptools_impl import closing

    body = b"a\r\n\r\nConnection: keep-alive\r\n"  # looks like fields, is body
    data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(body), body)
    assert closing(data) == b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(body),
        body,
    )
    plain = b"HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n"
    assert closing(plain) == b"HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    already = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"
    assert closing(already) == already
    assert closing(b"partial head") == b"partial head"
