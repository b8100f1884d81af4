"""The limiter without Redis: reading a script's reply, the response fields, the keys' slot."""

from __future__ import annotations

import pytest

from gateway import errors
from gateway.errors import AccountingError
from gateway.limit.algorithms import Decision, Rate
from gateway.limit.limiter import Limiter
from gateway.limit.scripts import check_prefix, decide_script, flush_script, limit_key
from gateway.resp import ReplyError
from gateway.slots import key_slot


def test_read_a_decision() -> None:
    total, d = Limiter.read([7, 0, 0, 250_000, 1_500_000])
    assert total == 7 and d == Decision(False, 0, 0.25, 1.5)


@pytest.mark.parametrize("reply", [None, b"x", [1, 2, 3], [1, 1, 1, 1, b"1"], 5])
def test_unexpected_replies_are_protocol_failures(reply: object) -> None:
    with pytest.raises(AccountingError) as info:
        Limiter.read(reply)  # type: ignore[arg-type]
    assert info.value.kind == errors.PROTOCOL


def test_error_replies_keep_their_kind() -> None:
    with pytest.raises(AccountingError) as info:
        Limiter.read(ReplyError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert info.value.kind != errors.PROTOCOL


def test_fields_in_the_drafts_syntax() -> None:
    limiter = Limiter(Rate(100, 60.0), "sliding")
    assert limiter.fields(Decision(True, 42, 12.2, 0.0)) == (
        ("RateLimit-Policy", '"default";q=100;w=60'),
        ("RateLimit", '"default";r=42;t=13'),
    )
    # A sub-second window still says w=1: the field is whole seconds.
    assert Limiter(Rate(5, 0.2), "gcra").policy == '"default";q=5;w=1'


def test_clients_limited_until_their_wait_ends() -> None:
    limiter = Limiter(Rate(1, 1.0), "fixed")
    limiter.count("a", Decision(False, 0, 1.0, 60.0))
    limiter.count("b", Decision(False, 0, 1.0, 0.0))
    limiter.count("c", Decision(True, 0, 1.0, 0.0))
    assert (limiter.allowed, limiter.limited, limiter.clients_limited()) == (1, 2, 1)


@pytest.mark.parametrize("prefix", ["ip:", "", "{ip}:", "gw:{tenant-1}:"])
def test_limit_keys_share_the_counters_slot(prefix: str) -> None:
    assert check_prefix(prefix) is None
    for ip in ("10.0.0.1", "2001:db8::1"):
        total = prefix + ip
        assert key_slot(limit_key(total, "gcra")) == key_slot(total)


@pytest.mark.parametrize("prefix", ["ip}", "{ip", "{}ip:", "}{ip}:"])
def test_prefixes_that_cannot_share_a_slot_are_refused(prefix: str) -> None:
    assert check_prefix(prefix) is not None


def test_scripts_differ_per_algorithm_and_keep_the_increment() -> None:
    shas = {decide_script(a).sha for a in ("fixed", "sliding", "gcra")}
    shas |= {flush_script(a).sha for a in ("fixed", "sliding", "gcra")}
    assert len(shas) == 6
    assert "redis.pcall('INCRBY', KEYS[1], 1)" in decide_script("sliding").body
