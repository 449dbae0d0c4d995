"""What the XDP guard's maps must hold for a configuration (pure: no maps, no syscalls).

One pair of lists, ``clients.allow`` and ``clients.deny``, drives both the userspace policy and
the XDP program, with the same meaning: deny wins, an empty allow list allows everyone, and
IPv4-mapped networks (``::ffff:10.0.0.0/104``) mean their IPv4 network, because the XDP program
sees IPv4 clients as IPv4 packets.

LPM trie keys are ``struct {u32 prefixlen (host order); u8 addr[4 or 16] (network order)}``
(docs/kernel-facts.md, fact 20); BPF targets are little-endian.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import attrs

from .config import Clients, FloodGuard

#: ``guard_config.flags`` bits (bpf/xdp_guard.bpf.c).
FLAG_ALLOW_LIST = 1
FLAG_REJECT_QUIC = 2

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NS_PER_S = 1_000_000_000
#: Bucket sizes are capped so that ``now + interval`` cannot wrap a u64 in the program (a rate
#: that slow means "about never" anyway: 2^62 ns is 146 years).
_NS_MAX = 1 << 62


@attrs.frozen
class LpmKeys:
    """The keys of one list, split into the IPv4 and the IPv6 trie."""

    v4: frozenset[bytes]
    v6: frozenset[bytes]

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)


def lpm_keys(cidrs: Iterable[str]) -> LpmKeys:
    """LPM trie keys for CIDR texts (already validated by the config).

    Host bits are cleared (``10.1.2.3/8`` is ``10.0.0.0/8``), as the userspace policy does.
    """
    v4: set[bytes] = set()
    v6: set[bytes] = set()
    for text in cidrs:
        net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.ip_network(
            text, strict=False
        )
        if (
            isinstance(net, ipaddress.IPv6Network)
            and net.prefixlen >= 96
            and net.subnet_of(_IPV4_MAPPED)
        ):
            net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        key = net.prefixlen.to_bytes(4, "little") + net.network_address.packed
        (v4 if net.version == 4 else v6).add(key)
    return LpmKeys(frozenset(v4), frozenset(v6))


@attrs.frozen
class GuardSettings:
    """The values of ``struct guard_config``: flags and the two GCRA buckets in nanoseconds."""

    flags: int
    syn_interval_ns: int
    syn_burst_ns: int
    global_interval_ns: int
    global_burst_ns: int


def gcra(rate: float, burst: int) -> tuple[int, int]:
    """``(interval, burst)`` in ns for a bucket of ``rate`` per second and ``burst`` at once;
    ``(0, 0)`` (no limit) for a rate of 0."""
    if rate <= 0:
        return 0, 0
    interval = min(max(1, round(_NS_PER_S / rate)), _NS_MAX)
    return interval, min(interval * burst, _NS_MAX)


def guard_settings(
    clients: Clients, flood_guard: FloodGuard, *, reject_quic: bool
) -> GuardSettings:
    """The settings for ``clients`` (only whether ``allow`` is empty matters here) and the
    flood guard."""
    flags = (FLAG_ALLOW_LIST if clients.allow else 0) | (FLAG_REJECT_QUIC if reject_quic else 0)
    syn = gcra(flood_guard.per_source_rate, flood_guard.per_source_burst)
    total = gcra(flood_guard.global_rate, flood_guard.global_burst)
    return GuardSettings(flags, *syn, *total)
