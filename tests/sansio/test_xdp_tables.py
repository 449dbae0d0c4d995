"""What the XDP guard's maps hold for a config: LPM keys and the SYN bucket settings."""

from __future__ import annotations

import ipaddress

import pytest

from trio_sni.sansio.config import Clients, FloodGuard
from trio_sni.sansio.policy import Policy
from trio_sni.sansio.xdp_tables import (
    FLAG_ALLOW_LIST,
    FLAG_REJECT_QUIC,
    GuardSettings,
    gcra,
    guard_settings,
    lpm_keys,
)


def key(prefixlen: int, address: bytes) -> bytes:
    return prefixlen.to_bytes(4, "little") + address


def test_lpm_keys_split_by_family_with_host_bits_cleared() -> None:
    keys = lpm_keys(["10.1.2.3/8", "198.51.100.7/32", "2001:db8::1/32", "::/0"])
    assert keys.v4 == {key(8, bytes([10, 0, 0, 0])), key(32, bytes([198, 51, 100, 7]))}
    assert keys.v6 == {key(32, bytes.fromhex("20010db8") + bytes(12)), key(0, bytes(16))}
    assert len(keys) == 4


def test_ipv4_mapped_networks_become_ipv4_keys_as_in_the_policy() -> None:
    keys = lpm_keys(["::ffff:10.0.0.0/104", "::ffff:192.0.2.1"])
    assert keys.v4 == {key(8, bytes([10, 0, 0, 0])), key(32, bytes([192, 0, 2, 1]))}
    assert keys.v6 == frozenset()
    # The userspace policy reads the same list the same way.
    policy = Policy.from_rules([], Clients(deny=("::ffff:10.0.0.0/104",)))
    assert policy.check_client(ipaddress.ip_address("10.9.9.9")) is not None


def test_duplicates_collapse() -> None:
    assert len(lpm_keys(["10.0.0.1/8", "10.0.0.0/8"])) == 1


@pytest.mark.parametrize(
    ("rate", "burst", "expected"),
    [
        (0, 100, (0, 0)),
        (100, 200, (10_000_000, 2_000_000_000)),
        (0.5, 3, (2_000_000_000, 6_000_000_000)),
        (1e12, 1, (1, 1)),  # faster than 1 per ns is 1 per ns
        (1e-12, 10**6, (1 << 62, 1 << 62)),  # slower than "never" fits in a u64 still
    ],
)
def test_gcra(rate: float, burst: int, expected: tuple[int, int]) -> None:
    assert gcra(rate, burst) == expected


def test_guard_settings() -> None:
    fg = FloodGuard(per_source_rate=10, per_source_burst=20, global_rate=1000, global_burst=50)
    assert guard_settings(Clients(), fg, reject_quic=False) == GuardSettings(
        0, 100_000_000, 2_000_000_000, 1_000_000, 50_000_000
    )
    flags = guard_settings(Clients(allow=("::/0",)), fg, reject_quic=True).flags
    assert flags == FLAG_ALLOW_LIST | FLAG_REJECT_QUIC
    assert guard_settings(Clients(deny=("::/0",)), fg, reject_quic=False).flags == 0
