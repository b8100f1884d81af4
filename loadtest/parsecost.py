"""What the RESP reply parser costs, in memory, on the reply shapes the gateway reads.

    python -m loadtest.parsecost [--rounds 5]

No socket and no Redis: `gateway.resp.Parser` fed the bytes of each shape, timed with
`perf_counter`, the median of the rounds. The shapes are one `INCRBY` reply per read (`raw`,
`pooled`, `multiplexed` at low load), 50 replies per read (a pipelined or multiplexed burst), a
flush's array of 50 integers in one read (`batched`), and an array of 80,000 integers that
arrives in 4 KiB reads: a parser that re-read a partial reply from its start on every read took
time quadratic in the reply's size there. Run it pinned (`taskset -c 0`); it reports whether the
compiled build or the interpreted module ran.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from gateway import resp
from gateway.resp import NEED_DATA, Parser


def one_per_read(n: int = 300_000) -> float:
    p = Parser()
    t = time.perf_counter()
    for _ in range(n):
        p.feed(b":12345\r\n")
        p.next_reply()
        p.next_reply()
    return (time.perf_counter() - t) / n * 1e9


def fifty_per_read(n: int = 10_000) -> float:
    data = b"".join(b":%d\r\n" % i for i in range(50))
    p = Parser()
    t = time.perf_counter()
    for _ in range(n):
        p.feed(data)
        while p.next_reply() is not NEED_DATA:
            pass
    return (time.perf_counter() - t) / (n * 50) * 1e9


def array_of_fifty(n: int = 20_000) -> float:
    data = b"*50\r\n" + b"".join(b":%d\r\n" % i for i in range(50))
    p = Parser()
    t = time.perf_counter()
    for _ in range(n):
        p.feed(data)
        p.next_reply()
        p.next_reply()
    return (time.perf_counter() - t) / n * 1e9


def split_array(k: int = 80_000, chunk: int = 4096) -> float:
    data = b"*%d\r\n" % k + b"".join(b":%d\r\n" % i for i in range(k))
    p = Parser()
    got: object = None
    t = time.perf_counter()
    for i in range(0, len(data), chunk):
        p.feed(data[i : i + chunk])
        reply = p.next_reply()
        if reply is not NEED_DATA:
            got = reply
    elapsed = time.perf_counter() - t
    if not (isinstance(got, list) and len(got) == k):
        raise SystemExit("the split array was not parsed whole")
    return elapsed * 1e3


SHAPES: list[tuple[str, Callable[[], float], str]] = [
    ("one reply per read", one_per_read, "ns/reply"),
    ("50 replies per read", fifty_per_read, "ns/reply"),
    ("array of 50, one read", array_of_fifty, "ns/array"),
    ("array of 80,000 in 4 KiB reads", split_array, "ms"),
]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.parsecost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    compiled = not resp.__file__.endswith(".py") if resp.__file__ else False
    print(f"gateway.resp: {'compiled' if compiled else 'interpreted'} ({resp.__file__})")
    for name, measure, unit in SHAPES:
        xs = [measure() for _ in range(args.rounds)]
        print(f"{name:32s} {statistics.median(xs):10.1f} {unit}   (min {min(xs):.1f})")


if __name__ == "__main__":
    main()
