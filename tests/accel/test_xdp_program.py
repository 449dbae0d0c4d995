"""The XDP guard program on crafted packets (``BPF_PROG_TEST_RUN``), nothing attached.

Each test loads ``xdp_guard.bpf.o`` through :meth:`XdpGuard.load` (maps filled from a config,
as the proxy does) and runs the program on hand-built frames: IPv4 and IPv6, fragments,
extension headers, VLAN tags, short and truncated packets, ARP, neighbour discovery, other
ports, the SYN buckets and the QUIC answer (checked field by field, checksums included).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator

import pytest
import trio_sni_loader as loader
from proxytest import loader_fds_opened_since
from trio_sni_loader.btf import Kind, parse_btf

from trio_sni.accel import objects
from trio_sni.accel.xdp import GUARD_CONFIG, MAPS, PROGRAM, SYN_SOURCE, XdpCounter, XdpGuard
from trio_sni.sansio.config import Clients, FloodGuard, XdpConfig

ABORTED, DROP, PASS, TX = 0, 1, 2, 3
PORT = 8443
GUEST_MAC = bytes.fromhex("020000000002")
HOST_MAC = bytes.fromhex("020000000001")

ETH_IP, ETH_IPV6, ETH_ARP, ETH_VLAN = 0x0800, 0x86DD, 0x0806, 0x8100
TCP, UDP, ICMP, ICMPV6, FRAGMENT, DSTOPTS = 6, 17, 1, 58, 44, 60
SYN, ACK = 0x02, 0x10

ALLOWED4, DENIED4, STRANGER4, HOST4 = "198.51.100.2", "198.51.100.66", "203.0.113.9", "198.51.100.1"
ALLOWED6, DENIED6, STRANGER6, HOST6 = "2001:db8::2", "2001:db8::66", "2001:db8:1::9", "2001:db8::1"
CLIENTS = Clients(
    allow=("198.51.100.0/24", "2001:db8::/64"), deny=("198.51.100.66/32", "2001:db8::66/128")
)


# ------------------------------------------------------------------------------------------
# Frames


def eth(proto: int, payload: bytes, *, dst: bytes = HOST_MAC, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", ETH_VLAN, vlan) if vlan is not None else b""
    return dst + GUEST_MAC + tag + struct.pack("!H", proto) + payload


def ipv4(
    src: str, proto: int, payload: bytes, *, dst: str = HOST4, frag: int = 0, options: bytes = b""
) -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        20 + len(options) + len(payload),
        1,
        frag,
        64,
        proto,
        0,
        ipaddress.ip_address(src).packed,
        ipaddress.ip_address(dst).packed,
    )
    return header + options + payload


def ipv6(src: str, next_header: int, payload: bytes, *, dst: str = HOST6) -> bytes:
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(payload),
            next_header,
            64,
            ipaddress.ip_address(src).packed,
            ipaddress.ip_address(dst).packed,
        )
        + payload
    )


def tcp(dport: int = PORT, flags: int = SYN, sport: int = 40000) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(dport: int = 443, payload: bytes = b"\xc0" + bytes(63), sport: int = 50000) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def syn4(src: str, dport: int = PORT, flags: int = SYN) -> bytes:
    return eth(ETH_IP, ipv4(src, TCP, tcp(dport, flags)))


def syn6(src: str, dport: int = PORT, flags: int = SYN) -> bytes:
    return eth(ETH_IPV6, ipv6(src, TCP, tcp(dport, flags)))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# ------------------------------------------------------------------------------------------
# Fixtures


def load(clients: Clients = CLIENTS, **xdp: object) -> XdpGuard:
    return XdpGuard.load(XdpConfig(**xdp), clients, [PORT])  # type: ignore[arg-type]


@pytest.fixture
def guard() -> Iterator[XdpGuard]:
    before = loader.live_fds()
    with load() as g:
        yield g
    assert not loader_fds_opened_since(before)


def run(guard: XdpGuard, frame: bytes) -> int:
    return guard.program.test_run(frame).retval


def dropped(guard: XdpGuard) -> dict[str, int]:
    return {k: v for k, v in guard.counters().items() if v}


# ------------------------------------------------------------------------------------------
# Unprivileged: the object and the Python mirror of its structs


def test_object_has_the_maps_the_guard_uses() -> None:
    spec = loader.load_collection_spec(objects.object_bytes("xdp_guard.bpf.o"))
    assert set(spec.maps) == set(MAPS)
    assert list(spec.programs) == [PROGRAM]
    assert spec.programs[PROGRAM].type == loader.ProgType.XDP
    for name in ("allow_v4", "allow_v6", "deny_v4", "deny_v6"):
        assert spec.maps[name].type == loader.MapType.LPM_TRIE
        assert spec.maps[name].flags & loader.MapFlag.NO_PREALLOC  # docs/kernel-facts.md, fact 20
    assert spec.maps["allow_v4"].key_size == 8
    assert spec.maps["allow_v6"].key_size == 20
    assert spec.maps["config"].value_size == GUARD_CONFIG.size
    assert spec.maps["syn_sources"].value_size == SYN_SOURCE.size
    assert spec.maps["counters"].max_entries == len(XdpCounter)
    assert spec.btf is not None
    btf = parse_btf(spec.btf)
    config = btf.by_name("guard_config", Kind.STRUCT)
    assert config is not None
    assert [m.name for m in config.members] == [
        "flags",
        "_pad",
        "syn_interval_ns",
        "syn_burst_ns",
        "global_interval_ns",
        "global_burst_ns",
    ]
    source = btf.by_name("syn_source", Kind.STRUCT)
    assert source is not None
    assert [m.name for m in source.members] == ["tat", "dropped"]


# ------------------------------------------------------------------------------------------
# Address lists


@pytest.mark.bpf
@pytest.mark.parametrize(
    ("frame", "verdict", "reason"),
    [
        (syn4(ALLOWED4), PASS, "xdp_passed"),
        (syn4(DENIED4), DROP, "xdp_dropped_denied"),
        (syn4(STRANGER4), DROP, "xdp_dropped_not_allowed"),
        (syn6(ALLOWED6), PASS, "xdp_passed"),
        (syn6(DENIED6), DROP, "xdp_dropped_denied"),
        (syn6(STRANGER6), DROP, "xdp_dropped_not_allowed"),
        (syn4(STRANGER4, flags=ACK), DROP, "xdp_dropped_not_allowed"),  # every segment, not SYNs
        (syn6(STRANGER6, flags=ACK), DROP, "xdp_dropped_not_allowed"),
        (eth(ETH_IP, ipv4(STRANGER4, TCP, tcp()), vlan=7), DROP, "xdp_dropped_not_allowed"),
        (eth(ETH_IP, ipv4(ALLOWED4, TCP, tcp()), vlan=7), PASS, "xdp_passed"),
    ],
    ids=[
        "v4-allowed",
        "v4-denied",
        "v4-unlisted",
        "v6-allowed",
        "v6-denied",
        "v6-unlisted",
        "v4-ack",
        "v6-ack",
        "vlan-unlisted",
        "vlan-allowed",
    ],
)
def test_address_lists(guard: XdpGuard, frame: bytes, verdict: int, reason: str) -> None:
    assert run(guard, frame) == verdict
    assert dropped(guard) == {reason: 1}


@pytest.mark.bpf
@pytest.mark.parametrize(
    "frame",
    [
        syn4(STRANGER4, dport=22),
        syn6(DENIED6, dport=22),
        eth(ETH_IP, ipv4(DENIED4, UDP, udp(443))),  # reject_quic is off
        eth(ETH_IP, ipv4(STRANGER4, ICMP, bytes(16))),
        eth(ETH_ARP, bytes.fromhex("0001080006040001") + GUEST_MAC + bytes(4) + bytes(10)),
        # neighbour solicitation from an unlisted address
        eth(
            ETH_IPV6,
            ipv6(STRANGER6, ICMPV6, bytes([135, 0, 0, 0]) + bytes(20)),
            dst=bytes.fromhex("3333ff000001"),
        ),
        eth(0x88CC, bytes(40)),  # LLDP
    ],
    ids=["v4-other-port", "v6-other-port", "udp-443", "icmp", "arp", "ndp", "lldp"],
)
def test_everything_else_passes(guard: XdpGuard, frame: bytes) -> None:
    assert run(guard, frame) == PASS
    assert dropped(guard) == {"xdp_passed": 1}


@pytest.mark.bpf
@pytest.mark.parametrize(
    "frame",
    [
        eth(ETH_IP, b""),  # an Ethernet header and nothing else (test_run needs 14 bytes)
        eth(ETH_IP, ipv4(STRANGER4, TCP, tcp())[:19]),  # truncated IPv4 header
        eth(ETH_IP, bytes([0x44]) + ipv4(STRANGER4, TCP, tcp())[1:]),  # IHL below 5
        eth(ETH_IPV6, ipv6(STRANGER6, TCP, tcp())[:39]),  # truncated IPv6 header
        eth(ETH_VLAN, b"\x00"),  # truncated VLAN tag
    ],
    ids=["eth-only", "ipv4-truncated", "ipv4-bad-ihl", "ipv6-truncated", "vlan-truncated"],
)
def test_packets_without_a_readable_ip_header_pass(guard: XdpGuard, frame: bytes) -> None:
    # The stack drops them itself; no address is readable, so there is nothing to judge.
    assert run(guard, frame) == PASS


@pytest.mark.bpf
@pytest.mark.parametrize("src", [ALLOWED4, STRANGER4])
@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("first-fragment", lambda s: ipv4(s, TCP, tcp(), frag=0x2000)),  # MF, offset 0
        ("later-fragment", lambda s: ipv4(s, TCP, b"x" * 16, frag=0x0003)),  # offset 24
        ("tiny-first-fragment", lambda s: ipv4(s, TCP, tcp()[:8], frag=0x2000)),  # RFC 1858
        ("truncated-tcp", lambda s: ipv4(s, TCP, tcp()[:19])),
        ("later-udp-fragment", lambda s: ipv4(s, UDP, b"x" * 16, frag=0x0003)),
    ],
)
def test_ipv4_fragments_and_truncated_tcp_meet_the_address_lists(
    guard: XdpGuard, src: str, name: str, payload: object
) -> None:
    """Where the port cannot be read, the lists apply as if the packet were for the proxy, so a
    blocked client cannot get a SYN through by fragmenting it; allowed ones pass."""
    frame = eth(ETH_IP, payload(src))  # type: ignore[operator]
    assert run(guard, frame) == (PASS if src == ALLOWED4 else DROP)


def fragment_header(next_header: int, offset_units: int, more: bool) -> bytes:
    return struct.pack("!BBHI", next_header, 0, offset_units << 3 | int(more), 0x1234)


def destination_options(next_header: int) -> bytes:
    return bytes([next_header, 0]) + bytes([1, 4, 0, 0, 0, 0])  # PadN to 8 bytes


@pytest.mark.bpf
@pytest.mark.parametrize("src", [ALLOWED6, STRANGER6])
@pytest.mark.parametrize(
    ("name", "next_header", "chain"),
    [
        ("first-fragment", FRAGMENT, fragment_header(TCP, 0, True) + tcp()),
        ("later-fragment", FRAGMENT, fragment_header(TCP, 3, False) + b"x" * 16),
        ("dst-options", DSTOPTS, destination_options(TCP) + tcp()),
        (
            "seven-extension-headers",
            DSTOPTS,
            b"".join(destination_options(DSTOPTS) for _ in range(6))
            + destination_options(TCP)
            + tcp(),
        ),
        ("truncated-extension", DSTOPTS, destination_options(TCP)[:4]),
    ],
)
def test_ipv6_extension_headers_and_fragments(
    guard: XdpGuard, src: str, name: str, next_header: int, chain: bytes
) -> None:
    assert run(guard, eth(ETH_IPV6, ipv6(src, next_header, chain))) == (
        PASS if src == ALLOWED6 else DROP
    )


@pytest.mark.bpf
def test_ipv6_extension_headers_to_another_port_pass(guard: XdpGuard) -> None:
    chain = destination_options(TCP) + tcp(dport=22)
    assert run(guard, eth(ETH_IPV6, ipv6(STRANGER6, DSTOPTS, chain))) == PASS


@pytest.mark.bpf
def test_ipv4_mapped_config_entries_judge_ipv4_clients() -> None:
    clients = Clients(allow=("::ffff:198.51.100.0/120",), deny=("::ffff:198.51.100.66/128",))
    with load(clients) as g:
        assert run(g, syn4(ALLOWED4)) == PASS
        assert run(g, syn4(DENIED4)) == DROP
        assert run(g, syn4(STRANGER4)) == DROP
        assert run(g, syn6(ALLOWED6)) == DROP  # the allow list has no IPv6 network


@pytest.mark.bpf
def test_empty_allow_list_allows_all_but_the_denied() -> None:
    with load(Clients(deny=("203.0.113.0/24",))) as g:
        assert run(g, syn4(ALLOWED4)) == PASS
        assert run(g, syn6(STRANGER6)) == PASS
        assert run(g, syn4(STRANGER4)) == DROP


@pytest.mark.bpf
def test_update_changes_the_lists_in_place(guard: XdpGuard) -> None:
    assert run(guard, syn4(STRANGER4)) == DROP
    guard.update(XdpConfig(), Clients(allow=("203.0.113.0/24",), deny=("2001:db8::/32",)))
    assert run(guard, syn4(STRANGER4)) == PASS
    assert run(guard, syn4(ALLOWED4)) == DROP
    assert run(guard, syn6(ALLOWED6)) == DROP
    assert guard.status().allow_entries == 1
    assert guard.status().deny_entries == 1
    guard.update(XdpConfig(), Clients())
    assert [run(guard, f) for f in (syn4(DENIED4), syn6(DENIED6), syn4(STRANGER4))] == [PASS] * 3
    for name in ("allow_v4", "allow_v6", "deny_v4", "deny_v6"):
        assert list(guard.maps[name].keys()) == []


# ------------------------------------------------------------------------------------------
# SYN flood guard


@pytest.mark.bpf
def test_syn_bucket_per_source() -> None:
    # 0.1 SYN/s: no token comes back while the test runs, so the counts are exact.
    with load(Clients(), flood_guard=FloodGuard(per_source_rate=0.1, per_source_burst=5)) as g:
        verdicts = [run(g, syn4(STRANGER4)) for _ in range(12)]
        assert verdicts == [PASS] * 5 + [DROP] * 7
        assert run(g, syn4(STRANGER4, flags=SYN | ACK)) == PASS  # not a new connection
        assert run(g, syn4(STRANGER4, flags=ACK)) == PASS
        assert run(g, syn6(STRANGER6)) == PASS  # another source has its own bucket
        assert [run(g, syn6(STRANGER6)) for _ in range(5)] == [PASS] * 4 + [DROP]
        counters = dropped(g)
        assert counters["xdp_dropped_syn_flood"] == 8
        assert counters["xdp_syn_offenders"] == 2
        entry = g.maps["syn_sources"].lookup(ipaddress.IPv6Address(f"::ffff:{STRANGER4}").packed)
        assert SYN_SOURCE.unpack(entry)[1] == 7


@pytest.mark.bpf
def test_global_syn_bucket() -> None:
    fg = FloodGuard(per_source_rate=0.1, per_source_burst=2, global_rate=0.1, global_burst=3)
    with load(Clients(), flood_guard=fg) as g:
        sources = [f"203.0.113.{i}" for i in range(1, 6)]
        assert [run(g, syn4(s)) for s in sources] == [PASS] * 3 + [DROP] * 2
        assert dropped(g)["xdp_dropped_syn_flood_global"] == 2


@pytest.mark.bpf
def test_zero_rates_turn_the_buckets_off() -> None:
    with load(Clients(), flood_guard=FloodGuard(per_source_rate=0)) as g:
        assert all(run(g, syn4(STRANGER4)) == PASS for _ in range(300))


# ------------------------------------------------------------------------------------------
# QUIC rejection


@pytest.mark.bpf
def test_quic_to_443_gets_an_icmp_port_unreachable() -> None:
    with load(reject_quic=True) as g:
        request = eth(ETH_IP, ipv4(ALLOWED4, UDP, udp(443)))
        result = g.program.test_run(request)
        assert result.retval == TX
        out = result.data
        assert len(out) == 14 + 20 + 8 + 28
        assert out[:6] == GUEST_MAC
        assert out[6:12] == HOST_MAC
        assert struct.unpack("!H", out[12:14])[0] == ETH_IP
        ip = out[14:34]
        assert ip[0] == 0x45
        assert ip[9] == ICMP
        assert struct.unpack("!H", ip[2:4])[0] == 56
        assert ip[12:16] == ipaddress.ip_address(HOST4).packed
        assert ip[16:20] == ipaddress.ip_address(ALLOWED4).packed
        assert checksum(ip) == 0xFFFF
        icmp = out[34:]
        assert icmp[:2] == b"\x03\x03"  # destination unreachable, port unreachable
        assert checksum(icmp) == 0xFFFF
        assert icmp[8:] == request[14 : 14 + 28]  # the offending IP header and UDP header
        assert dropped(g) == {"xdp_dropped_quic": 1, "xdp_quic_answered": 1}


@pytest.mark.bpf
def test_quic_over_ipv6_gets_an_icmpv6_port_unreachable() -> None:
    with load(reject_quic=True) as g:
        request = eth(ETH_IPV6, ipv6(ALLOWED6, UDP, udp(PORT)))  # a listening port, too
        result = g.program.test_run(request)
        assert result.retval == TX
        out = result.data
        assert len(out) == 14 + 40 + 8 + 48
        ip6 = out[14:54]
        assert ip6[6] == ICMPV6
        assert struct.unpack("!H", ip6[4:6])[0] == 56
        assert ip6[8:24] == ipaddress.ip_address(HOST6).packed
        assert ip6[24:40] == ipaddress.ip_address(ALLOWED6).packed
        icmp = out[54:]
        assert icmp[:2] == b"\x01\x04"
        pseudo = ip6[8:40] + struct.pack("!IxxxB", len(icmp), ICMPV6)
        assert checksum(pseudo + icmp) == 0xFFFF
        assert icmp[8:] == request[14 : 14 + 48]


@pytest.mark.bpf
@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (eth(ETH_IP, ipv4(DENIED4, UDP, udp())), "xdp_dropped_denied"),
        (eth(ETH_IP, ipv4(STRANGER4, UDP, udp())), "xdp_dropped_not_allowed"),
        (eth(ETH_IP, ipv4(ALLOWED4, UDP, udp()), dst=b"\xff" * 6), "xdp_dropped_quic"),
        (eth(ETH_IP, ipv4(ALLOWED4, UDP, udp(), options=bytes(4))), "xdp_dropped_quic"),
        (eth(ETH_IP, ipv4(ALLOWED4, UDP, udp()), vlan=7), "xdp_dropped_quic"),
        (
            eth(ETH_IPV6, ipv6(ALLOWED6, DSTOPTS, destination_options(UDP) + udp())),
            "xdp_dropped_quic",
        ),
    ],
    ids=["denied", "unlisted", "broadcast", "ip-options", "vlan", "ipv6-ext"],
)
def test_quic_that_cannot_be_answered_is_dropped(frame: bytes, reason: str) -> None:
    with load(reject_quic=True) as g:
        assert run(g, frame) == DROP
        assert dropped(g) == {reason: 1}


@pytest.mark.bpf
def test_other_udp_passes_with_reject_quic(guard: XdpGuard) -> None:
    guard.update(XdpConfig(reject_quic=True), CLIENTS)
    assert run(guard, eth(ETH_IP, ipv4(STRANGER4, UDP, udp(53)))) == PASS


# ------------------------------------------------------------------------------------------
# A quic listener's port: its UDP is the proxy's own


QUIC_LISTENER = 9443


def load_with_quic_listener(clients: Clients = CLIENTS, **xdp: object) -> XdpGuard:
    """A guard for TCP on PORT and 443 and a ``quic`` listener on QUIC_LISTENER and 443."""
    config = XdpConfig(**xdp)  # type: ignore[arg-type]
    return XdpGuard.load(config, clients, [PORT, 443], [QUIC_LISTENER, 443])


@pytest.mark.bpf
@pytest.mark.parametrize("reject_quic", [True, False], ids=["reject_quic", "no_reject_quic"])
@pytest.mark.parametrize("dport", [QUIC_LISTENER, 443])
def test_udp_to_a_quic_listener_passes_the_address_lists_and_is_never_rejected(
    reject_quic: bool, dport: int
) -> None:
    with load_with_quic_listener(reject_quic=reject_quic) as g:
        assert run(g, eth(ETH_IP, ipv4(ALLOWED4, UDP, udp(dport)))) == PASS
        assert run(g, eth(ETH_IPV6, ipv6(ALLOWED6, UDP, udp(dport)))) == PASS
        assert run(g, eth(ETH_IP, ipv4(DENIED4, UDP, udp(dport)))) == DROP
        assert run(g, eth(ETH_IPV6, ipv6(STRANGER6, UDP, udp(dport)))) == DROP
        assert dropped(g) == {
            "xdp_passed": 2,
            "xdp_dropped_denied": 1,
            "xdp_dropped_not_allowed": 1,
        }
        assert g.status().quic_ports == (443, QUIC_LISTENER)


@pytest.mark.bpf
def test_reject_quic_still_answers_udp_to_the_other_listening_ports() -> None:
    with load_with_quic_listener(reject_quic=True) as g:
        assert run(g, eth(ETH_IP, ipv4(ALLOWED4, UDP, udp(PORT)))) == TX
        assert dropped(g) == {"xdp_dropped_quic": 1, "xdp_quic_answered": 1}


@pytest.mark.bpf
def test_tcp_to_a_port_that_only_a_quic_listener_uses_is_not_guarded() -> None:
    with load_with_quic_listener() as g:
        assert run(g, syn4(STRANGER4, dport=QUIC_LISTENER)) == PASS
        assert run(g, syn4(STRANGER4, dport=443)) == DROP  # 443 has a TCP listener too
