"""Writes deferred to the end of the loop iteration (gateway.outbox): order kept, nothing lost
to a close, nothing sent after an abort, one flush per iteration."""

from __future__ import annotations

import asyncio

from gateway.outbox import FLUSH_AT, WRITE_NOW, Deferred, Outbox, outbox

from .test_http_protocol import RecordingTransport


def Writer(box: Outbox) -> Deferred:
    """A bare `Deferred` on a recording transport (a plain instance: the class may be compiled,
    and a compiled class takes no interpreted subclass)."""
    w = Deferred()
    w.transport = RecordingTransport()  # type: ignore[assignment]
    w.outbox = box
    w.out = None
    w.out_bytes = 0
    w.shut = False
    return w


def close(w: Deferred) -> None:
    """What a protocol does before it closes its transport: send what is pending first."""
    w.flush_out()
    assert w.transport is not None
    w.transport.close()


def sent(w: Deferred) -> list[bytes]:
    return w.transport.data  # type: ignore[union-attr,no-any-return]


async def test_writes_of_one_iteration_leave_together_at_its_end() -> None:
    box = outbox(asyncio.get_running_loop())
    assert outbox(asyncio.get_running_loop()) is box  # one per loop
    a, b = Writer(box), Writer(box)
    a.queue_write(b"1")
    b.queue_write(b"x")
    a.queue_write(b"2")
    assert sent(a) == [] and sent(b) == []  # nothing before the iteration ends
    await asyncio.sleep(0)
    assert sent(a) == [b"12"] and sent(b) == [b"x"]  # one write per connection, in order
    a.queue_write(b"3")
    await asyncio.sleep(0)
    assert sent(a) == [b"12", b"3"]


async def test_a_close_sends_what_is_pending_first() -> None:
    a = Writer(outbox(asyncio.get_running_loop()))
    a.queue_write(b"last answer")
    close(a)
    assert sent(a) == [b"last answer"]
    await asyncio.sleep(0)  # the outbox's flush finds nothing more to send, and writes nothing
    assert sent(a) == [b"last answer"]


async def test_an_abort_sends_nothing_pending() -> None:
    a = Writer(outbox(asyncio.get_running_loop()))
    a.queue_write(b"never")
    assert a.transport is not None
    a.transport.abort()
    await asyncio.sleep(0)
    assert sent(a) == []


async def test_write_now_goes_after_what_is_pending() -> None:
    a = Writer(outbox(asyncio.get_running_loop()))
    a.queue_write(b"first")
    a.write_now(b"second")
    assert sent(a) == [b"first", b"second"]
    await asyncio.sleep(0)
    assert sent(a) == [b"first", b"second"]


def test_without_a_loop_writes_go_at_once() -> None:
    a = Writer(WRITE_NOW)
    a.queue_write(b"now")
    assert sent(a) == [b"now"]


async def test_one_failing_writer_does_not_strand_the_others() -> None:
    box = outbox(asyncio.get_running_loop())
    broken, fine = Writer(box), Writer(box)
    assert broken.transport is not None

    def refuse(data: bytes) -> None:
        raise RuntimeError("broken transport")

    broken.transport.write = refuse  # type: ignore[method-assign]
    broken.queue_write(b"lost")
    fine.queue_write(b"kept")
    await asyncio.sleep(0)
    assert sent(fine) == [b"kept"]
    broken.queue_write(b"again")  # the failed writer is not stuck with its old output
    assert broken.out == [b"again"]


async def test_large_output_is_written_at_once_for_the_flow_control_to_see() -> None:
    # A transport pauses its writer (pause_writing) only once the bytes are written to it: a
    # client that does not read, or a large body streamed down, must not pile up here meanwhile.
    box = outbox(asyncio.get_running_loop())
    big, many = Writer(box), Writer(box)
    big.queue_write(b"b" * FLUSH_AT)
    assert sent(big) == [b"b" * FLUSH_AT]
    chunk = b"c" * (FLUSH_AT // 4)
    for _ in range(3):
        many.queue_write(chunk)
    assert sent(many) == []
    many.queue_write(chunk)  # the fourth reaches the bound: everything pending goes, in order
    assert sent(many) == [chunk * 4] and many.out is None
    many.queue_write(b"small")
    await asyncio.sleep(0)
    assert sent(many) == [chunk * 4, b"small"]


def test_an_outbox_does_not_keep_its_loop_alive() -> None:
    import gc
    import weakref

    loop = asyncio.new_event_loop()
    box = outbox(loop)
    ref = weakref.ref(loop)
    loop.close()
    writer = Writer(box)
    writer.queue_write(b"after the loop closed")  # nothing would ever flush it: written at once
    assert sent(writer) == [b"after the loop closed"]
    del loop, box
    gc.collect()
    assert ref() is None
    assert isinstance(WRITE_NOW, Outbox)


def test_nothing_is_written_once_the_write_side_is_shut() -> None:
    # After write_eof (a lingering close) a transport refuses writes: a writer then drops them.
    w = Writer(WRITE_NOW)
    w.queue_write(b"before")
    w.shut = True
    w.queue_write(b"after")
    w.write_now(b"now")
    w.flush_out()
    assert w.transport is not None and w.transport.data == [b"before"]  # type: ignore[attr-defined]
