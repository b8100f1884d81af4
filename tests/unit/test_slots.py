"""Cluster key rules: hash slots, redirect replies, CLUSTER SLOTS, slot tags."""

from __future__ import annotations

import pytest

from gateway.resp import ReplyError
from gateway.slots import SlotTags, key_slot, parse_cluster_slots, parse_redirect


def test_key_slot_matches_redis() -> None:
    # Values from CLUSTER KEYSLOT on a real Redis.
    assert key_slot("foo") == 12182
    assert key_slot("bar") == 5061
    assert key_slot(b"foo") == 12182


def test_hash_tags() -> None:
    assert key_slot("{user1000}.following") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == key_slot("foo{}{bar}")  # empty tag: the whole key
    assert key_slot("foo{}{bar}") != key_slot("bar")
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("foo{bar}{zap}") == key_slot("bar")


def test_redirects() -> None:
    moved = parse_redirect(ReplyError("MOVED 3999 127.0.0.1:6381"), "h")
    assert moved is not None and (moved.ask, moved.slot, moved.host, moved.port) == (False, 3999, "127.0.0.1", 6381)
    ask = parse_redirect(ReplyError("ASK 1 :7000"), "10.0.0.5")
    assert ask is not None and (ask.ask, ask.host, ask.port) == (True, "10.0.0.5", 7000)
    v6 = parse_redirect(ReplyError("MOVED 2 [::1]:7001"), "h")
    assert v6 is not None and v6.host == "::1"
    assert parse_redirect(ReplyError("ERR no"), "h") is None
    assert parse_redirect(ReplyError("MOVED x y:z"), "h") is None
    assert parse_redirect(5, "h") is None
    assert parse_redirect(ReplyError("MOVED 16384 h:7000"), "h") is None
    assert parse_redirect(ReplyError("MOVED -1 h:7000"), "h") is None


def test_cluster_slots() -> None:
    reply = [[0, 5460, [b"127.0.0.1", 7000, b"id1"]], [5461, 16383, [b"", 7001, b"id2"], [b"127.0.0.1", 7002, b"r"]]]
    ranges = parse_cluster_slots(reply, "seed")
    assert [tuple(r) for r in ranges] == [(0, 5460, "127.0.0.1", 7000), (5461, 16383, "seed", 7001)]
    with pytest.raises(ValueError):
        parse_cluster_slots(ReplyError("ERR This instance has cluster support disabled"), "h")
    with pytest.raises(ValueError):
        parse_cluster_slots([[0, 1]], "h")
    # A bad node's reply is refused whole, never an IndexError that stops the gateway.
    for bad in ([[0, 16383, []]], [[0, 16384, [b"h", 7000]]], [[-1, 5, [b"h", 7000]]], [[9, 5, [b"h", 7000]]]):
        with pytest.raises(ValueError):
            parse_cluster_slots(bad, "h")


def test_slot_tags_cover_every_slot() -> None:
    tags = SlotTags()
    for slot in (0, 1, 12182, 16383):
        assert key_slot("{" + tags.tag(slot) + "}") == slot
        assert key_slot(f"gateway:batch-seq:abc:{{{tags.tag(slot)}}}") == slot
