"""Sans-IO RESP2 codec: bytes in, replies out, no sockets.

Owns the wire format only. It never does I/O and never raises on a Redis error
reply: an error is a value (`ReplyError`), because the connection that carried
it is still clean and the caller decides what the error means.

Every command is encoded as an array of length-prefixed bulk strings, never
inline, so no key or value can smuggle a CR/LF and inject a second command.
"""

from __future__ import annotations

from typing import Final

__all__ = ["NEED_DATA", "Parser", "ProtocolError", "Reply", "ReplyError", "encode", "encode_many"]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


class ReplyError(Exception):
    """An error reply (`-ERR ...`). Returned by the parser, not raised by it."""

    @property
    def prefix(self) -> str:
        """The error code Redis puts first (ERR, WRONGTYPE, READONLY, NOAUTH, ...)."""
        text = str(self)
        return text.split(" ", 1)[0] if text else "ERR"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplyError) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))


class ProtocolError(Exception):
    """The peer sent bytes that are not RESP2: the stream cannot be trusted any more."""


Reply = bytes | int | str | None | ReplyError | list["Reply"]

_CRLF: Final = b"\r\n"


def _to_bytes(arg: object) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    if isinstance(arg, bool):
        # bool is an int subclass; "True" on the wire is almost always a bug.
        raise TypeError("refusing to encode a bool as a Redis argument")
    if isinstance(arg, (int, float)):
        return repr(arg).encode()
    raise TypeError(f"cannot encode {type(arg).__name__} as a Redis argument")


def encode(*args: object) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    if not args:
        raise ValueError("a command needs at least one argument")
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        # The types every command here is made of, without _to_bytes's isinstance chain;
        # `type(x) is` keeps bools (an int subclass) and subclasses on the checked path.
        kind = type(arg)
        if kind is str:
            data = arg.encode()  # type: ignore[attr-defined]
        elif kind is bytes:
            data = arg
        elif kind is int:
            data = b"%d" % arg  # type: ignore[str-format]
        else:
            data = _to_bytes(arg)
        append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def encode_many(commands: list[tuple[object, ...]]) -> bytes:
    """Encode a pipeline: the commands back to back, in order."""
    return b"".join(encode(*c) for c in commands)


class _Incomplete(Exception):
    """Internal: the buffer ends inside the reply being parsed."""


class Parser:
    """Incremental RESP2 reply parser.

    `feed()` any bytes, split anywhere; `next_reply()` returns one whole reply or
    `NEED_DATA`. A partial reply is re-read from its first byte once more data
    arrives, which keeps the state to one buffer and one offset; replies on the
    request path are a few bytes, so the re-read costs nothing that matters.
    """

    __slots__ = ("_buf", "_max_bulk", "_pos")

    def __init__(self, max_bulk: int = 512 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max_bulk = max_bulk

    def feed(self, data: bytes) -> None:
        if self._pos:
            # Drop what was consumed before growing the buffer, so it never holds
            # more than the unparsed tail plus the new data.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a reply."""
        return len(self._buf) - self._pos

    def next_reply(self) -> Reply | _NeedData:
        if self._pos >= len(self._buf):
            return NEED_DATA
        try:
            reply, self._pos = self._parse(self._pos, 0)
        except _Incomplete:
            return NEED_DATA
        return reply

    def replies(self) -> list[Reply]:
        """Every whole reply buffered so far, in order."""
        out: list[Reply] = []
        while True:
            reply = self.next_reply()
            if reply is NEED_DATA:
                return out
            out.append(reply)  # type: ignore[arg-type]

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(_CRLF, pos)
        if end < 0:
            if len(self._buf) - pos > 64 * 1024:
                raise ProtocolError("RESP line longer than 64 KiB without CRLF")
            raise _Incomplete
        return bytes(self._buf[pos:end]), end + 2

    def _int(self, raw: bytes) -> int:
        try:
            return int(raw)
        except ValueError:
            raise ProtocolError(f"bad RESP integer {raw[:32]!r}") from None

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        buf = self._buf
        if pos >= len(buf):
            raise _Incomplete
        kind = buf[pos]
        line, pos = self._line(pos + 1)
        if kind == 0x3A:  # ':'
            return self._int(line), pos
        if kind == 0x2B:  # '+'
            return line.decode("utf-8", "replace"), pos
        if kind == 0x2D:  # '-'
            return ReplyError(line.decode("utf-8", "replace")), pos
        if kind == 0x24:  # '$'
            length = self._int(line)
            if length == -1:
                return None, pos
            if length < -1 or length > self._max_bulk:
                raise ProtocolError(f"bad bulk length {length}")
            end = pos + length
            if end + 2 > len(buf):
                raise _Incomplete
            if buf[end : end + 2] != _CRLF:
                raise ProtocolError("bulk string not terminated by CRLF")
            return bytes(buf[pos:end]), end + 2
        if kind == 0x2A:  # '*'
            count = self._int(line)
            if count == -1:
                return None, pos
            if count < -1:
                raise ProtocolError(f"bad array length {count}")
            if depth >= 32:
                raise ProtocolError("RESP arrays nested deeper than 32")
            items: list[Reply] = []
            for _ in range(count):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        raise ProtocolError(f"unknown RESP type byte {bytes([kind])!r}")
