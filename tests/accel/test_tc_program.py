"""The TC shaper program on crafted packets (BPF_PROG_TEST_RUN), and its config mirror.

Each run sets ``skb->priority`` through the ``__sk_buff`` context, the way SO_PRIORITY on the
proxy's client socket does for real packets. Nothing is attached to any interface here.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest
import trio_sni_loader as loader

from trio_sni.accel.tc import SLOTS, TcShaper
from trio_sni.sansio.config import QOS_PRIORITY, TcConfig

pytestmark = pytest.mark.bpf

LISTEN_PORT = 8443
CLIENT_V4 = "198.51.100.2"
CLIENT_V6 = "2001:db8::2"
#: TCX verdicts as BPF_PROG_TEST_RUN reports them (a u32): NEXT (-1) passes on, 2 drops.
NEXT = 0xFFFFFFFF
DROP = 2
#: ``struct __sk_buff``: 192 bytes, ``priority`` at offset 32 (include/uapi/linux/bpf.h).
SKB_CTX_SIZE = 192
SKB_PRIORITY_OFFSET = 32
#: Packets up to a page fit BPF_PROG_TEST_RUN's skb; 3000 bytes exhausts a bucket quickly.
PAYLOAD = 3000 - 14 - 20 - 20


def eth(proto: int) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", proto)


def ipv4(
    payload: bytes, *, dst: str = CLIENT_V4, proto: int = socket.IPPROTO_TCP, frag: int = 0x4000
) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        1,
        frag,
        64,
        proto,
        0,
        ipaddress.IPv4Address("198.51.100.1").packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return eth(0x0800) + header + payload


def ipv6(payload: bytes, *, dst: str = CLIENT_V6, nexthdr: int = socket.IPPROTO_TCP) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        nexthdr,
        64,
        ipaddress.IPv6Address("2001:db8::1").packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return eth(0x86DD) + header + payload


def tcp(sport: int = LISTEN_PORT, dport: int = 40000, size: int = PAYLOAD) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + bytes(size)


def ctx(priority: int = 0) -> bytes:
    data = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", data, SKB_PRIORITY_OFFSET, priority)
    return bytes(data)


def config(**overrides: object) -> TcConfig:
    # The slowest cap: the bucket refills by 1 KB/s, nothing measurable within a test.
    settings: dict[str, object] = {
        "enabled": True,
        "interface": "unused0",
        "per_client_bps": 8000,
        "bulk_bps": 8000,
    }
    settings.update(overrides)
    return TcConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
def shaper() -> Iterator[TcShaper]:
    with TcShaper.load(config(), [LISTEN_PORT]) as loaded:
        yield loaded


def run(shaper: TcShaper, packet: bytes, *, qos: str = "normal", repeat: int = 1) -> int:
    return shaper.program.test_run(packet, ctx=ctx(QOS_PRIORITY[qos]), repeat=repeat).retval


def counted(shaper: TcShaper) -> dict[str, int]:
    return {k: v for k, v in shaper.counters().items() if v}


def test_counters_start_at_zero_for_every_slot(shaper: TcShaper) -> None:
    counters = shaper.counters()
    assert len(counters) == 4 * len(SLOTS)
    assert not any(counters.values())


@pytest.mark.parametrize("build", [ipv4, ipv6], ids=["ipv4", "ipv6"])
def test_a_client_gets_its_burst_then_drops(shaper: TcShaper, build) -> None:  # type: ignore[no-untyped-def]
    packet = build(tcp())
    burst = config().burst_bytes
    fits = burst // len(packet)
    assert run(shaper, packet, repeat=fits) == NEXT
    assert run(shaper, packet) == DROP
    assert run(shaper, packet) == DROP
    counters = counted(shaper)
    # The refill at 1 KB/s can add a packet's worth at most, within a test's runtime.
    assert counters["tc_packets_passed_normal"] in (fits, fits + 1)
    assert counters["tc_bytes_passed_normal"] == counters["tc_packets_passed_normal"] * len(packet)
    assert counters["tc_packets_dropped_normal"] == fits + 2 - counters["tc_packets_passed_normal"]
    assert shaper.bucket_count() == 1


def test_each_client_and_class_has_its_own_bucket(shaper: TcShaper) -> None:
    packet = ipv4(tcp())
    fits = config().burst_bytes // len(packet)
    run(shaper, packet, repeat=fits + 1)
    assert run(shaper, packet) == DROP
    assert run(shaper, ipv4(tcp(), dst="198.51.100.3")) == NEXT  # another client
    assert run(shaper, packet, qos="bulk") == NEXT  # the same client, another class
    assert shaper.bucket_count() == 3


def test_the_class_comes_from_the_priority_and_high_is_not_capped(shaper: TcShaper) -> None:
    packet = ipv6(tcp())
    assert run(shaper, packet, qos="high", repeat=200) == NEXT  # 600 KB, over any burst
    assert run(shaper, packet, qos="bulk") == NEXT
    assert run(shaper, packet, qos="normal") == NEXT
    assert run(shaper, packet, qos="high") == NEXT
    counters = counted(shaper)
    assert counters["tc_packets_passed_high"] == 201
    assert counters["tc_packets_passed_bulk"] == counters["tc_packets_passed_normal"] == 1
    assert shaper.bucket_count() == 2  # an uncapped class needs no bucket
    # Any priority the proxy does not set is the normal class.
    shaper.program.test_run(packet, ctx=ctx(5))
    assert shaper.counters()["tc_packets_passed_normal"] == 2


def test_exempt_clients_pass_and_reload_changes_caps_live(shaper: TcShaper) -> None:
    packet = ipv4(tcp())
    run(shaper, packet, repeat=200)
    assert run(shaper, packet) == DROP
    shaper.configure(config(exempt=("198.51.100.0/24", "2001:db8::/64")))
    assert run(shaper, packet) == NEXT
    assert run(shaper, ipv6(tcp())) == NEXT
    assert shaper.counters()["tc_packets_passed_exempt"] == 2
    shaper.configure(config())  # the list is replaced, not added to
    assert run(shaper, packet) == DROP
    shaper.configure(config(per_client_bps=0))  # no cap for normal any more
    assert run(shaper, packet) == NEXT


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(ipv4(tcp(sport=443)), id="v4-not-from-a-listening-port"),
        pytest.param(ipv6(tcp(sport=40000, dport=LISTEN_PORT)), id="v6-to-the-listening-port"),
        pytest.param(ipv4(tcp(), proto=socket.IPPROTO_UDP), id="v4-udp"),
        pytest.param(ipv6(tcp(), nexthdr=socket.IPPROTO_UDP), id="v6-udp"),
        pytest.param(ipv4(tcp(), frag=0x2000), id="v4-first-fragment"),
        pytest.param(ipv4(tcp(), frag=0x0010), id="v4-later-fragment"),
        pytest.param(ipv6(b"\x06\x00\x00\x01" + bytes(4) + tcp(), nexthdr=44), id="v6-fragment"),
        pytest.param(eth(0x0806) + bytes(28), id="arp"),
        pytest.param(eth(0x0806), id="ethernet-header-only"),
        pytest.param(ipv4(b"\x20\xfb")[:35], id="truncated-tcp-header-v4"),
        pytest.param(ipv6(b"\x20"), id="truncated-tcp-header-v6"),
        pytest.param(
            ipv4(b"\x20\xfb\x00\x01")[:14] + b"\x4f" + ipv4(b"\x20\xfb\x00\x01")[15:],
            id="ipv4-options-past-the-end",
        ),
        pytest.param(eth(0x0800)[:12] + b"\x45" + bytes(40), id="bad-ethertype"),
        pytest.param(ipv4(tcp())[:14] + b"\x65" + ipv4(tcp())[15:], id="ip-version-6-in-v4"),
    ],
)
def test_traffic_that_is_not_the_proxys_passes_as_other(shaper: TcShaper, packet: bytes) -> None:
    assert run(shaper, packet, repeat=200) == NEXT  # never capped, however much
    assert counted(shaper) == {
        "tc_packets_passed_other": 200,
        "tc_bytes_passed_other": 200 * len(packet),
    }
    assert shaper.bucket_count() == 0


@pytest.mark.parametrize("packet", [ipv4(b"")[:33], ipv6(b"")[:53]], ids=["ipv4", "ipv6"])
def test_the_kernel_refuses_to_test_run_a_truncated_ip_header(
    shaper: TcShaper, packet: bytes
) -> None:
    # BPF_PROG_TEST_RUN wants a whole IP header when the ethertype says IP; the program's
    # bounds checks for those cases are covered by the truncated TCP headers above.
    with pytest.raises(loader.BPFSyscallError, match="EINVAL"):
        run(shaper, packet)


def test_the_ports_map_grows_with_the_listeners() -> None:
    ports = range(20000, 20100)
    with TcShaper.load(config(), ports) as shaper:
        assert sorted(shaper.ports.keys()) == list(ports)
        assert run(shaper, ipv4(tcp(sport=20099))) == NEXT
        assert shaper.counters()["tc_packets_passed_normal"] == 1


def test_a_missing_interface_is_a_loader_error_and_leaves_nothing_open() -> None:
    with pytest.raises(loader.LoaderError, match="no network interface named 'unused0'"):
        TcShaper.start(config(), [LISTEN_PORT])
