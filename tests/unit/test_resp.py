import pytest

from gateway.accounting import incr_command
from gateway.resp import NEED_DATA, Parser, ProtocolError, ReplyError, encode, encode_args, encode_many

# Every RESP2 reply type, with what the parser must return for it.
CASES = [
    (b"+OK\r\n", "OK"),
    (b"-WRONGTYPE Operation against a key\r\n", ReplyError("WRONGTYPE Operation against a key")),
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # CRLF inside a bulk string is data, not a terminator
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n:1\r\n$1\r\nx\r\n+y\r\n", [1, b"x", "y"]),
    (b"*4\r\n*0\r\n*-1\r\n*1\r\n:5\r\n$-1\r\n", [[], None, [5], None]),
    (b"*2\r\n*2\r\n:1\r\n$-1\r\n*1\r\n-ERR nested\r\n", [[1, None], [ReplyError("ERR nested")]]),
]
STREAM = b"".join(raw for raw, _ in CASES)
EXPECTED = [value for _, value in CASES]


@pytest.mark.parametrize(("raw", "expected"), CASES)
def test_each_reply_type(raw: bytes, expected: object) -> None:
    p = Parser()
    p.feed(raw)
    assert p.next_reply() == expected
    assert p.next_reply() is NEED_DATA
    assert p.buffered == 0


def test_error_reply_is_a_value_with_its_code() -> None:
    p = Parser()
    p.feed(b"-READONLY You can't write against a read only replica.\r\n")
    reply = p.next_reply()
    assert isinstance(reply, ReplyError)
    assert reply.prefix == "READONLY"


def test_every_split_point_of_the_whole_stream() -> None:
    for cut in range(len(STREAM) + 1):
        p = Parser()
        p.feed(STREAM[:cut])
        got = p.replies()
        p.feed(STREAM[cut:])
        got += p.replies()
        assert got == EXPECTED, f"split at {cut}"


def test_one_byte_at_a_time() -> None:
    p = Parser()
    got = []
    for i in range(len(STREAM)):
        p.feed(STREAM[i : i + 1])
        got += p.replies()
    assert got == EXPECTED


def test_every_pair_of_split_points_of_a_nested_reply() -> None:
    raw = CASES[-1][0]
    for a in range(len(raw) + 1):
        for b in range(a, len(raw) + 1):
            p = Parser()
            got = []
            for chunk in (raw[:a], raw[a:b], raw[b:]):
                p.feed(chunk)
                got += p.replies()
            assert got == [CASES[-1][1]], (a, b)


@pytest.mark.parametrize(
    "bad",
    [b"?what\r\n", b":12x\r\n", b"$-5\r\n", b"$3\r\nabcXY", b"*-2\r\n", b"*1" + b"*1\r\n" * 40],
)
def test_protocol_errors(bad: bytes) -> None:
    p = Parser()
    p.feed(bad)
    with pytest.raises(ProtocolError):
        p.next_reply()


def test_a_long_array_in_many_reads_is_parsed_as_it_arrives() -> None:
    # Each read's whole elements are parsed at once and kept: what stays unparsed is at most
    # the one element the read ended in. A parser that re-read a partial reply from its first
    # byte kept the whole prefix (its cost grew with the square of the reply's size).
    count = 5000
    raw = b"*%d\r\n" % count + b"".join(b":%d\r\n" % i for i in range(count))
    p = Parser()
    got = []
    for i in range(0, len(raw), 997):
        p.feed(raw[i : i + 997])
        got += p.replies()
        assert p.buffered < len(b":4999\r\n"), i
    assert got == [list(range(count))]
    assert p.buffered == 0


def test_a_reply_past_the_size_bound_is_a_protocol_error_even_split() -> None:
    too_big = b"*3\r\n:1\r\n$10\r\n0123456789\r\n:3\r\n"
    p = Parser(max_reply=20)
    with pytest.raises(ProtocolError):
        for byte in range(len(too_big)):
            p.feed(too_big[byte : byte + 1])
            p.replies()
    # A bulk string's own length is checked from its header, before its data arrives.
    p = Parser(max_reply=20)
    p.feed(b"$21\r\n")
    with pytest.raises(ProtocolError):
        p.next_reply()
    # Under the bound, one reply after another: the count starts again with each.
    p = Parser(max_reply=20)
    p.feed(b"*2\r\n:1\r\n:2\r\n" * 3)
    assert p.replies() == [[1, 2]] * 3


def test_nesting_too_deep_is_refused_across_reads() -> None:
    p = Parser()
    with pytest.raises(ProtocolError):
        for _ in range(40):
            p.feed(b"*1\r\n")
            p.next_reply()


def test_encode_is_length_prefixed_bulk_strings() -> None:
    assert encode("INCRBY", "ip:1.2.3.4", 1) == b"*3\r\n$6\r\nINCRBY\r\n$10\r\nip:1.2.3.4\r\n$1\r\n1\r\n"
    assert encode(b"GET", "\u00e9") == b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"


def test_encode_every_argument_type_as_its_text() -> None:
    class Key(str):
        pass

    args = (-12, 2**70, 1.5, bytearray(b"ba"), memoryview(b"mv"), Key("sub"), b"")
    assert encode(*args) == b"".join(
        [b"*7\r\n"]
        + [b"$%d\r\n%b\r\n" % (len(x), x) for x in (b"-12", b"%d" % 2**70, b"1.5", b"ba", b"mv", b"sub", b"")]
    )


@pytest.mark.parametrize("size", [0, 9, 10, 99, 100, 255, 256, 257, 1000, 70_000])
def test_encode_prefixes_every_length_right(size: int) -> None:
    # Lengths under 256 come from a table, longer ones are formatted: both sides of the edge.
    data = b"x" * size
    assert encode("SET", data, size) == b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%d\r\n" % (
        size, data, len(str(size)), size
    )  # fmt: skip
    assert encode_args(("SET", data, size)) == encode("SET", data, size)
    assert encode_many([("SET", data, size), ("GET", data)]) == encode("SET", data, size) + encode("GET", data)


def test_encode_cannot_be_injected() -> None:
    # A key carrying CRLF and a second command stays one bulk string of one command.
    key = "x\r\n*1\r\n$8\r\nFLUSHALL\r\n"
    p = Parser()
    p.feed(encode("INCRBY", key, 1))
    assert p.replies() == [[b"INCRBY", key.encode(), b"1"]]


def test_encode_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(TypeError):
        encode("SET", "k", True)
    with pytest.raises(TypeError):
        encode("SET", "k", object())
    with pytest.raises(ValueError):
        encode()


@pytest.mark.parametrize("key", ["ip:127.0.0.1", "ip:2001:db8::1", "", "k\r\n$1\r\n", "ip:é", "x" * 300])
def test_incr_command_is_the_generic_encoding_of_incrby(key: str) -> None:
    # The per-request fast path must send exactly the bytes the generic encoder makes,
    # with the length in bytes (not characters) for a non-ASCII key.
    assert incr_command(key) == encode("INCRBY", key, 1)
