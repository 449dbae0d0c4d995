"""The SSRF guard: every refused category, the embedded-IPv4 forms, and the own-address check."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sni.sansio.addresses import refusal_reason


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def mapped(v4: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address((0xFFFF << 32) | v4)


def nat64(v4: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address((0x64FF9B << 96) | v4)


def six_to_four(v4: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | 1)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private (RFC 1918)"),
        ("172.16.0.1", "private (RFC 1918)"),
        ("172.31.255.255", "private (RFC 1918)"),
        ("192.168.1.1", "private (RFC 1918)"),
        ("fd00::1", "unique local (fc00::/7)"),
        ("fc00::1", "unique local (fc00::/7)"),
        ("100.64.1.1", "carrier-grade NAT (100.64.0.0/10)"),
        ("100.127.255.255", "carrier-grade NAT (100.64.0.0/10)"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("febf::1", "link-local"),
        ("fec0::1", "site-local (deprecated, fec0::/10)"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "this network (0.0.0.0/8)"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.254", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("198.18.0.1", "benchmarking (198.18.0.0/15)"),
        ("198.19.255.255", "benchmarking (198.18.0.0/15)"),
        ("2001:2::1", "benchmarking (2001:2::/48)"),
        ("192.0.0.8", "IETF protocol assignments (192.0.0.0/24)"),
        ("192.88.99.1", "reserved (deprecated 6to4 relay anycast)"),
        ("100::1", "discard-only (100::/64)"),
        ("2001:10::1", "reserved (deprecated ORCHID)"),
        ("64:ff9b:1::a00:1", "local-use NAT64 (64:ff9b:1::/48)"),
        # Outside 2000::/3 nothing is allocated for unicast.
        ("4000::1", "reserved"),
        ("1::1", "reserved"),
        # IPv4 inside IPv6: the IPv4 address is what the connection reaches.
        (
            "::ffff:127.0.0.1",
            "loopback, embedded as 127.0.0.1 in an IPv4-mapped (::ffff:0:0/96) address",
        ),
        (
            "::ffff:169.254.169.254",
            "link-local, embedded as 169.254.169.254 in an IPv4-mapped (::ffff:0:0/96) address",
        ),
        (
            "64:ff9b::a00:1",
            "private (RFC 1918), embedded as 10.0.0.1 in a NAT64 (64:ff9b::/96) address",
        ),
        (
            "2002:c0a8:0101::1",
            "private (RFC 1918), embedded as 192.168.1.1 in a 6to4 (2002::/16) address",
        ),
        (
            "::7f00:1",
            "loopback, embedded as 127.0.0.1 in an IPv4-compatible (::/96) address",
        ),
        # Teredo: the client address is stored inverted (~127.0.0.1 == 128.255.255.254).
        (
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "loopback, embedded as 127.0.0.1 in a Teredo (2001::/32) address",
        ),
        (
            "2001:0:a00:1::1",
            "private (RFC 1918), embedded as 10.0.0.1 in a Teredo (2001::/32) address",
        ),
        # Deprecated IPv4-compatible form: reserved even around a public address.
        ("::5db8:d822", "reserved"),
    ],
)
def test_refused(address: str, reason: str) -> None:
    assert refusal_reason(ip(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "1.1.1.1",
        "8.8.8.8",
        "2606:4700::1",
        "2a00:1450:4001:80b::200e",
        "::ffff:93.184.216.34",  # a dual-stack socket reaching a public IPv4 address
        "64:ff9b::5db8:d822",  # 93.184.216.34 through a NAT64 gateway
        "2002:5db8:d822::1",  # 6to4 around a public address
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # RFC 4380's example Teredo address
        # Documentation ranges are not refused: they never route on the Internet, and the
        # namespace tests use them as the "public" side.
        "192.0.2.1",
        "198.51.100.7",
        "203.0.113.200",
        "2001:db8::1",
        "2001:db8:ffff::42",
        # Neighbours of refused blocks.
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "1.0.0.0",
    ],
)
def test_allowed(address: str) -> None:
    assert refusal_reason(ip(address)) is None


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.0.0.1",
        "fd00::1",
        "100.64.1.1",
        "169.254.169.254",
        "fe80::1",
        "198.18.0.1",
        "::ffff:127.0.0.1",
        "64:ff9b::a00:1",
    ],
)
def test_allow_private_lifts_private_categories(address: str) -> None:
    assert refusal_reason(ip(address)) is not None
    assert refusal_reason(ip(address), allow_private=True) is None


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("4000::1", "reserved"),
        (
            "::ffff:224.0.0.1",
            "multicast, embedded as 224.0.0.1 in an IPv4-mapped (::ffff:0:0/96) address",
        ),
    ],
)
def test_allow_private_never_lifts_the_rest(address: str, reason: str) -> None:
    assert refusal_reason(ip(address), allow_private=True) == reason


OWN = [(ip("203.0.113.5"), 443), (ip("2001:db8::5"), 8443), (ip("127.0.0.1"), 8443)]


@pytest.mark.parametrize(
    ("address", "port", "allow_private", "reason"),
    [
        ("203.0.113.5", 443, False, "the proxy's own listen address"),
        ("203.0.113.5", None, False, "the proxy's own listen address"),
        ("203.0.113.5", 8443, False, None),  # another port of the same host: judged normally
        ("::ffff:203.0.113.5", 443, False, "the proxy's own listen address"),
        ("2001:db8::5", 8443, False, "the proxy's own listen address"),
        ("2001:db8::5", 443, False, None),
        ("2001:db8::6", 8443, False, None),
        # allow_private lifts "loopback" but never the loop back into the proxy.
        ("127.0.0.1", 8443, True, "the proxy's own listen address"),
        ("127.0.0.1", 443, True, None),
        ("127.0.0.1", 443, False, "loopback"),
    ],
)
def test_own_listen_addresses(
    address: str, port: int | None, allow_private: bool, reason: str | None
) -> None:
    result = refusal_reason(ip(address), own_addresses=OWN, port=port, allow_private=allow_private)
    assert result == reason


def test_scope_ids_do_not_hide_an_own_address() -> None:
    own = [(ip("fe80::1"), 443)]
    assert refusal_reason(ip("fe80::1%eth0"), own_addresses=own, port=443, allow_private=True) == (
        "the proxy's own listen address"
    )


# --------------------------------------------------------------------------------------------
# Properties


def near_blocks(blocks: list[str]) -> st.SearchStrategy[int]:
    """Integers inside, at the edges of, and just outside the given networks.

    Uniform integers almost never land in a special block; these do, and they probe the
    off-by-one boundaries where a wrong mask would show.
    """
    networks = [ipaddress.ip_network(b) for b in blocks]
    top = (1 << networks[0].max_prefixlen) - 1
    return (
        st.sampled_from(networks)
        .flatmap(
            lambda net: st.one_of(
                st.integers(-2, 2).map(lambda d: int(net.network_address) + d),
                st.integers(-2, 2).map(lambda d: int(net.broadcast_address) + d),
                st.integers(0, net.num_addresses - 1).map(lambda d: int(net.network_address) + d),
            )
        )
        .map(lambda value: min(max(value, 0), top))
    )


SPECIAL_V4 = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
]  # fmt: skip
SPECIAL_V6 = [
    "::/128", "::1/128", "::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48",
    "100::/64", "2001::/23", "2001::/32", "2001:2::/48", "2001:db8::/32", "2001:10::/28",
    "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8", "2000::/3",
]  # fmt: skip

ipv4_ints = st.one_of(st.integers(min_value=0, max_value=2**32 - 1), near_blocks(SPECIAL_V4))
ipv6_ints = st.one_of(st.integers(min_value=0, max_value=2**128 - 1), near_blocks(SPECIAL_V6))
DOCUMENTATION = [
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
]
# Refused on purpose although the stdlib calls them global (IANA: not globally reachable or
# deprecated, apart from two anycast /32s in 192.0.0.0/24 that a proxy has no business with).
REFUSED_THOUGH_STDLIB_GLOBAL = [ipaddress.ip_network(n) for n in ("192.0.0.0/24", "192.88.99.0/24")]


@given(ipv4_ints)
def test_ipv4_agrees_with_the_stdlib_except_documented_choices(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    refused = refusal_reason(address) is not None
    if any(address in net for net in DOCUMENTATION):
        assert not refused
    elif any(address in net for net in REFUSED_THOUGH_STDLIB_GLOBAL):
        assert refused
    else:
        # The stdlib counts multicast as global (it is routable); as a TCP destination it is not.
        assert refused == (not address.is_global or address.is_multicast)


@given(ipv4_ints)
def test_embedded_forms_are_judged_by_their_ipv4_address(value: int) -> None:
    inner = refusal_reason(ipaddress.IPv4Address(value))
    for wrap in (mapped, nat64, six_to_four):
        outer = refusal_reason(wrap(value))
        if inner is None:
            assert outer is None
        else:
            assert outer is not None
            assert outer.startswith(f"{inner}, embedded as {ipaddress.IPv4Address(value)} in ")


@given(ipv6_ints)
def test_ipv6_special_blocks_are_always_refused(value: int) -> None:
    address = ipaddress.IPv6Address(value)
    if (
        address.is_loopback
        or address.is_link_local
        or address.is_site_local
        or address.is_multicast
        or address.is_unspecified
        or address in ipaddress.ip_network("fc00::/7")
        or address not in ipaddress.ip_network("2000::/3")
    ) and (address.ipv4_mapped is None and address not in ipaddress.ip_network("64:ff9b::/96")):
        assert refusal_reason(address) is not None


@given(st.integers(min_value=0, max_value=2**125 - 1))
def test_plain_global_unicast_ipv6_is_allowed(low_bits: int) -> None:
    address = ipaddress.IPv6Address((0b001 << 125) | low_bits)  # somewhere in 2000::/3
    special = [ipaddress.ip_network(n) for n in ("2001::/23", "2002::/16", "2001:db8::/32")]
    if not any(address in net for net in special):
        assert refusal_reason(address) is None
