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
    return encode_args(args)


#: `$<n>\r\n` for the lengths most arguments have: bytes formatting (`b"$%d\r\n" % n`) costs
#: about 800 instructions a call, more than the rest of encoding an argument.
_BULK_HEADS: Final = [b"$" + str(n).encode() + b"\r\n" for n in range(256)]


def encode_args(args: tuple[object, ...]) -> bytes:
    """`encode` for arguments already in a tuple (no call through `*args`)."""
    if not args:
        raise ValueError("a command needs at least one argument")
    heads = _BULK_HEADS
    parts = [b"*" + str(len(args)).encode() + _CRLF]
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
            data = str(arg).encode()
        else:
            data = _to_bytes(arg)
        size = len(data)
        append(heads[size] if size < 256 else b"$" + str(size).encode() + _CRLF)
        append(data)
        append(_CRLF)
    return b"".join(parts)


def encode_many(commands: list[tuple[object, ...]]) -> bytes:
    """Encode a pipeline: the commands back to back, in order."""
    return b"".join([encode_args(c) for c in commands])


#: The largest reply accepted, in bytes on the wire (a bulk string's data, or a whole array with
#: everything in it). The gateway's replies are integers, short arrays (a flush's states, one per
#: key) and CLUSTER SLOTS; 64 MiB is far past any of them and bounds what a faulty or hostile
#: server can make the gateway hold.
MAX_REPLY_BYTES: Final = 64 * 1024 * 1024
#: A line (a type byte up to CRLF) longer than this without its CRLF is not RESP.
MAX_LINE_BYTES: Final = 64 * 1024
MAX_DEPTH: Final = 32


class Parser:
    """Incremental RESP2 reply parser.

    `feed()` any bytes, split anywhere; `next_reply()` returns one whole reply or
    `NEED_DATA`. Each element is parsed once however the bytes are split: an array that
    is not complete yet keeps the items it has on a stack, and the next read goes on from
    the element it stopped at (only that element's own line is read again). So a reply
    of n elements costs O(n) over any number of reads, not O(n) per read.
    """

    __slots__ = ("_buf", "_items", "_left", "_max_reply", "_pos", "_taken")

    def __init__(self, max_reply: int = MAX_REPLY_BYTES) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max_reply = max_reply
        # The arrays begun and not yet whole, outermost first: their items so far, and how
        # many items each still needs. Two lists, not a list of pairs, so that the count
        # is updated in place.
        self._items: list[list[Reply]] = []
        self._left: list[int] = []
        # Bytes of the array reply being parsed that are already consumed (behind `_pos`).
        self._taken = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            # Drop what was consumed before growing the buffer, so it never holds
            # more than the unparsed tail plus the new data.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet: at most the one element that is not whole."""
        return len(self._buf) - self._pos

    def replies(self) -> list[Reply]:
        """Every whole reply buffered so far, in order."""
        out: list[Reply] = []
        while True:
            reply = self.next_reply()
            if reply is NEED_DATA:
                return out
            out.append(reply)  # type: ignore[arg-type]

    def next_reply(self) -> Reply | _NeedData:
        buf = self._buf
        size = len(buf)
        pos = self._pos
        items = self._items
        value: Reply
        while True:
            if pos >= size:
                return NEED_DATA
            end = buf.find(_CRLF, pos + 1)
            if end < 0:
                if size - pos > MAX_LINE_BYTES:
                    raise ProtocolError("RESP line longer than 64 KiB without CRLF")
                return NEED_DATA
            kind = buf[pos]
            start = pos
            if kind == 0x3A:  # ':'
                value = _int(buf[pos + 1 : end])
                pos = end + 2
            elif kind == 0x24:  # '$'
                length = _int(buf[pos + 1 : end])
                if length == -1:
                    value = None
                    pos = end + 2
                else:
                    if length < -1 or length > self._max_reply:
                        raise ProtocolError(f"bad bulk length {length}")
                    last = end + 2 + length
                    if last + 2 > size:
                        return NEED_DATA
                    if buf[last : last + 2] != _CRLF:
                        raise ProtocolError("bulk string not terminated by CRLF")
                    value = bytes(buf[end + 2 : last])
                    pos = last + 2
            elif kind == 0x2B:  # '+'
                value = buf[pos + 1 : end].decode("utf-8", "replace")
                pos = end + 2
            elif kind == 0x2D:  # '-'
                value = ReplyError(buf[pos + 1 : end].decode("utf-8", "replace"))
                pos = end + 2
            elif kind == 0x2A:  # '*'
                count = _int(buf[pos + 1 : end])
                pos = end + 2
                if count == -1:
                    value = None
                elif count < -1:
                    raise ProtocolError(f"bad array length {count}")
                elif count == 0:
                    value = []
                else:
                    if len(items) >= MAX_DEPTH:
                        raise ProtocolError("RESP arrays nested deeper than 32")
                    items.append([])
                    self._left.append(count)
                    self._consumed(pos, start)
                    continue
            else:
                raise ProtocolError(f"unknown RESP type byte {bytes([kind])!r}")
            if not items:
                self._pos = pos
                return value
            self._consumed(pos, start)
            # An element of the innermost open array; each array it completes is in turn
            # an element of the one around it.
            left = self._left
            while True:
                items[-1].append(value)
                left[-1] -= 1
                if left[-1]:
                    break
                left.pop()
                value = items.pop()
                if not items:
                    self._taken = 0
                    return value

    def _consumed(self, pos: int, start: int) -> None:
        """Move past an array's element (or header) that ended at `pos`, within the size bound."""
        self._pos = pos
        self._taken += pos - start
        if self._taken > self._max_reply:
            raise ProtocolError(f"RESP reply larger than {self._max_reply} bytes")


def _int(raw: bytearray) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ProtocolError(f"bad RESP integer {bytes(raw[:32])!r}") from None
