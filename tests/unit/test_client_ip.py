import ipaddress

import pytest

from gateway.client_ip import MAX_FORWARDED_ENTRIES, ClientIPResolver, canonical

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("1.2.3.4:8080", "1.2.3.4"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("unknown", None),
        ("", None),
        ("1.2.3", None),
        ("300.1.1.1", None),
        ("_hidden", None),
        ("[::1", None),
        ("[::1]x", None),
        ("1.2.3.4\r\nINCRBY", None),
        ("a" * 100, None),
    ],
)
def test_canonical(text: str, expected: str | None) -> None:
    assert canonical(text) == expected


def test_untrusted_peer_ignores_forwarded_for() -> None:
    r = ClientIPResolver(TRUSTED)
    assert r.resolve("203.0.113.9", "1.1.1.1") == "203.0.113.9"


def test_no_trusted_proxies_means_peer_only() -> None:
    r = ClientIPResolver()
    assert r.resolve("10.1.1.1", "1.1.1.1") == "10.1.1.1"


def test_trusted_peer_uses_forwarded_for() -> None:
    r = ClientIPResolver(TRUSTED)
    assert r.resolve("10.0.0.1", "198.51.100.7") == "198.51.100.7"


def test_chain_takes_rightmost_untrusted() -> None:
    r = ClientIPResolver(TRUSTED)
    # the client can forge the leftmost entries; the first untrusted from the right is the one our proxy saw
    assert r.resolve("10.0.0.1", "6.6.6.6, 198.51.100.7, 10.2.2.2") == "198.51.100.7"


def test_chain_of_only_trusted_takes_leftmost() -> None:
    r = ClientIPResolver(TRUSTED)
    assert r.resolve("10.0.0.1", "10.9.9.9, 10.2.2.2") == "10.9.9.9"


def test_garbage_header_is_ignored() -> None:
    r = ClientIPResolver(TRUSTED)
    assert r.resolve("10.0.0.1", "not-an-ip") == "10.0.0.1"
    assert r.resolve("10.0.0.1", "198.51.100.7, garbage") == "10.0.0.1"
    assert r.resolve("10.0.0.1", ",") == "10.0.0.1"
    assert r.resolve("10.0.0.1", "") == "10.0.0.1"


def test_garbage_left_of_the_client_does_not_matter() -> None:
    r = ClientIPResolver(TRUSTED)
    assert r.resolve("10.0.0.1", "garbage, 198.51.100.7") == "198.51.100.7"


def test_ipv6_peer_and_chain() -> None:
    r = ClientIPResolver(TRUSTED)
    assert r.resolve("fd00::1", "2001:DB8::0001") == "2001:db8::1"
    assert r.resolve("::ffff:10.0.0.5", "[2001:db8::2]:1234") == "2001:db8::2"
    assert r.resolve("2001:db8::5", "1.1.1.1") == "2001:db8::5"


def test_unparsable_peer_gives_none() -> None:
    assert ClientIPResolver(TRUSTED).resolve(None, "1.1.1.1") is None
    assert ClientIPResolver(TRUSTED).resolve("/tmp/sock", None) is None


def test_forwarded_for_as_separate_header_values() -> None:
    r = ClientIPResolver(TRUSTED)
    # Two X-Forwarded-For headers read as one list: the same answer as their comma-joined text.
    assert r.resolve("10.0.0.1", ["6.6.6.6, 198.51.100.7", "10.2.2.2"]) == "198.51.100.7"
    assert r.resolve("10.0.0.1", ["10.9.9.9", "10.2.2.2, 10.3.3.3"]) == "10.9.9.9"
    assert r.resolve("10.0.0.1", ["198.51.100.7", "bogus"]) == "10.0.0.1"


def test_forwarded_for_bomb_costs_bounded_work() -> None:
    # A trusted peer sends 120 headers of 8 KB of trusted addresses. Every entry used to be
    # split out and parsed (0.5 s of CPU per request); the walk now stops after
    # MAX_FORWARDED_ENTRIES entries and ignores the chain, and an untrusted entry near the
    # right end is found without looking at the rest.
    r = ClientIPResolver(TRUSTED)
    value = ", ".join(f"10.{i % 250}.{i % 7}.{i % 13}" for i in range(700))[:8192].rsplit(",", 1)[0]
    bomb = [value] * 120
    calls = 0
    canonical_cached = r._canonical

    def counting(text: str) -> str | None:
        nonlocal calls
        calls += 1
        return canonical_cached(text)

    r._canonical = counting  # type: ignore[method-assign]
    assert r.resolve("10.0.0.1", bomb) == "10.0.0.1"  # too many trusted hops: the header is ignored
    assert r.resolve("10.0.0.1", ",".join(bomb)) == "10.0.0.1"
    assert calls <= 2 * (1 + MAX_FORWARDED_ENTRIES)
    calls = 0
    assert r.resolve("10.0.0.1", [*bomb, "198.51.100.7, 10.1.1.1"]) == "198.51.100.7"
    assert calls == 3  # the peer, then two entries from the right
    # An entry far too long to be an address is not copied out or parsed.
    assert r.resolve("10.0.0.1", "198.51.100.7," + "1" * 100_000) == "10.0.0.1"


def test_chain_at_the_entry_limit_still_resolves() -> None:
    r = ClientIPResolver(TRUSTED)
    chain = ["198.51.100.7"] + ["10.0.0.2"] * (MAX_FORWARDED_ENTRIES - 1)
    assert r.resolve("10.0.0.1", ", ".join(chain)) == "198.51.100.7"
    assert r.resolve("10.0.0.1", ", ".join(["198.51.100.7", *chain[1:], "10.0.0.3"])) == "10.0.0.1"
