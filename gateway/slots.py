"""Redis Cluster's key rules, without I/O: hash slots, redirects, the slot map.

A key's slot is CRC16 (XMODEM, which is `binascii.crc_hqx` from 0) of the key,
or of its hash tag, the part between the first `{` and the next `}` when that
part is not empty, modulo 16384.
"""

from __future__ import annotations

from binascii import crc_hqx
from typing import NamedTuple

from .resp import Reply, ReplyError

SLOTS = 16384


def key_slot(key: str | bytes) -> int:
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc_hqx(data, 0) % SLOTS


class Redirect(NamedTuple):
    ask: bool  # ASK: this command only, after ASKING; MOVED: the slot's new owner
    slot: int
    host: str
    port: int


def parse_redirect(reply: Reply, default_host: str) -> Redirect | None:
    """`-MOVED 3999 127.0.0.1:6381` or `-ASK ...` as a Redirect; None for any other reply."""
    if not isinstance(reply, ReplyError):
        return None
    parts = str(reply).split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _sep, port = parts[2].rpartition(":")
    try:
        redirect = Redirect(parts[0] == "ASK", int(parts[1]), host.strip("[]") or default_host, int(port))
    except ValueError:
        return None
    # A slot outside the map would index past it (or, negative, name another slot).
    return redirect if 0 <= redirect.slot < SLOTS else None


class SlotRange(NamedTuple):
    start: int
    end: int  # inclusive
    host: str
    port: int


def parse_cluster_slots(reply: Reply, default_host: str) -> list[SlotRange]:
    """The masters of a CLUSTER SLOTS reply; an empty host means the node that answered."""
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SLOTS answered {reply!r}")
    out = []
    for entry in reply:
        # A node's reply is checked whole before use: a master entry without host and port, or
        # a range outside 0..16383, is a bad reply (the next node is asked), never an IndexError.
        if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[2], list) or len(entry[2]) < 2:
            raise ValueError(f"unexpected CLUSTER SLOTS entry {entry!r}")
        start, end, master = entry[0], entry[1], entry[2]
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(master[1], int)):
            raise ValueError(f"unexpected CLUSTER SLOTS entry {entry!r}")
        if not 0 <= start <= end < SLOTS:
            raise ValueError(f"CLUSTER SLOTS range {start}..{end} outside 0..{SLOTS - 1}")
        raw_host = master[0]
        host = raw_host.decode() if isinstance(raw_host, bytes) else str(raw_host or "")
        if host in ("", "?"):
            host = default_host
        out.append(SlotRange(start, end, host, master[1]))
    return out


class SlotTags:
    """For each slot, a short string whose hash slot it is, to build keys that land in
    a chosen slot (`name:{tag}`). The table is built once, on first use (~0.2 s)."""

    def __init__(self) -> None:
        self._tags: list[str] | None = None

    def tag(self, slot: int) -> str:
        if self._tags is None:
            tags: list[str | None] = [None] * SLOTS
            missing = SLOTS
            n = 0
            while missing:
                text = str(n)
                s = crc_hqx(text.encode(), 0) % SLOTS
                if tags[s] is None:
                    tags[s] = text
                    missing -= 1
                n += 1
            self._tags = [t for t in tags if t is not None]
        return self._tags[slot]
