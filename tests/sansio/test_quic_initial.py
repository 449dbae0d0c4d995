"""The QUIC Initial reader: real clients' Initials (captured from headless Chromium and from
aioquic in ``tests/data/quic``, among them aioquic's resumed Initial with a 0-RTT packet
coalesced behind it, and aioquic's made here, versions 1 and 2), the RFC key vectors, and
packets built here to split, shuffle, repeat and coalesce CRYPTO frames."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import attrs
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from quictest import (
    DCID,
    crypto,
    handshake_message,
    initial,
    padded,
)

from trio_sni.sansio.clienthello import NEED_DATA, ClientHelloReader
from trio_sni.sansio.errors import (
    ClientHelloError,
    HelloTooLargeError,
    MalformedHelloError,
    NotQuicInitialError,
    QuicVersionError,
)
from trio_sni.sansio.quic_initial import (
    QUIC_V1,
    QUIC_V2,
    QuicInitialReader,
    initial_keys,
    peek_long_header,
)

CURL = handshake_message("curl.bin")
CHROMIUM_PQ = handshake_message("chromium-pq.bin")
#: The 0-RTT long-header packet type: 0b01 in version 1 (RFC 9000 section 17.2), 0b10 in
#: version 2 (RFC 9369 section 3.2), where 0b01 is the Initial.
ZERO_RTT_TYPE = {QUIC_V1: 0b01, QUIC_V2: 0b10}


def aioquic_datagrams(version: int, server_name: str, alpn: list[str]) -> list[bytes]:
    """What a real QUIC client sends first."""
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=alpn,
        server_name=server_name,
        original_version=version,
        supported_versions=[version],
    )
    connection = QuicConnection(configuration=configuration)
    connection.connect(("127.0.0.1", 443), now=0.0)
    return [data for data, _addr in connection.datagrams_to_send(now=0.0)]


def read_all(datagrams: list[bytes], reader: QuicInitialReader | None = None) -> object:
    reader = reader or QuicInitialReader()
    hello = None
    for datagram in datagrams:
        hello = reader.feed(datagram)
    return hello


@pytest.mark.parametrize(
    ("version", "key", "iv", "hp"),
    [
        # RFC 9001 appendix A.1 and RFC 9369 appendix A.1 (DCID 0x8394c8f03e515708).
        (
            QUIC_V1,
            "1f369613dd76d5467730efcbe3b1a22d",
            "fa044b2f42a3fd3b46fb255c",
            "9f50449e04a0e810283a1e9933adedd2",
        ),
        (
            QUIC_V2,
            "8b1a0bc121284290a29e0971b5cd045d",
            "91f73e2351d8fa91660e909f",
            "45b95e15235d6f45a6b19cbcb0294ba9",
        ),
    ],
)
def test_initial_keys_are_the_rfc_vectors(version: int, key: str, iv: str, hp: str) -> None:
    keys = initial_keys(version, DCID)
    assert (keys.key.hex(), keys.iv.hex(), keys.hp.hex()) == (key, iv, hp)


@pytest.mark.parametrize("version", [QUIC_V1, QUIC_V2])
def test_a_real_clients_initial_gives_its_server_name_and_alpn(version: int) -> None:
    datagrams = aioquic_datagrams(version, "WWW.Example.COM", ["h3", "acme-tls/1"])
    reader = QuicInitialReader()
    hello = read_all(datagrams, reader)
    assert hello is not None
    assert hello.server_name == "www.example.com"  # type: ignore[attr-defined]
    assert hello.alpn == ("h3", "acme-tls/1")  # type: ignore[attr-defined]
    assert reader.version == version


CAPTURES = sorted((Path(__file__).parent.parent / "data" / "quic").glob("*.json"))


@pytest.mark.parametrize("path", CAPTURES, ids=[p.stem for p in CAPTURES])
def test_captured_initials_from_real_clients_in_either_order(path: Path) -> None:
    """Chromium's first flight is a post-quantum hello over two Initials in two datagrams
    (then retransmissions); aioquic's fits one, also when a 0-RTT packet is coalesced behind
    the Initial. Any order gives the same hello."""
    capture = json.loads(path.read_text())
    datagrams = [bytes.fromhex(d) for d in capture["datagrams"]]
    for order in (datagrams, datagrams[::-1]):
        reader = QuicInitialReader()
        hello = None
        for datagram in order:
            hello = reader.feed(datagram)
            if hello is not None:
                break
        assert hello is not None
        assert hello.server_name == capture["server_name"]
        assert list(hello.alpn) == capture["alpn"]
        assert reader.version == capture["quic_version"]
    if path.stem.startswith("chromium"):
        assert hello.size > 1200
        assert hello.has_ech  # ECH GREASE


def coalesced_capture(name: str) -> tuple[dict[str, Any], bytes]:
    """A captured first datagram whose Initial has a 0-RTT packet behind it (RFC 9000 section
    12.2), with the fixture's ``layout`` (aioquic's own parse of the datagram, not ours)."""
    capture = json.loads(
        (Path(__file__).parent.parent / "data" / "quic" / f"{name}.json").read_text()
    )
    [datagram] = [bytes.fromhex(d) for d in capture["datagrams"]]
    return capture, datagram


def extension_types(message: bytes) -> list[int]:
    """The extension types of a ClientHello handshake message, in order (RFC 8446 4.1.2),
    read here without the parser under test."""
    at = 4 + 2 + 32
    at += 1 + message[at]  # legacy_session_id
    at += 2 + int.from_bytes(message[at : at + 2], "big")  # cipher_suites
    at += 1 + message[at]  # legacy_compression_methods
    end = at + 2 + int.from_bytes(message[at : at + 2], "big")
    at += 2
    types = []
    while at < end:
        types.append(int.from_bytes(message[at : at + 2], "big"))
        at += 4 + int.from_bytes(message[at + 2 : at + 4], "big")
    assert at == end == len(message)
    return types


# The captures of a resumed aioquic client (tests/data/quic/capture.py); named here, not
# globbed, so that a rerun of capture.py that lost one fails.
ZERO_RTT_CAPTURES = ["aioquic-v1-0rtt", "aioquic-v2-0rtt"]


@pytest.mark.parametrize("name", ZERO_RTT_CAPTURES)
def test_a_real_initial_coalesced_with_0rtt_gives_the_resumed_hello(name: str) -> None:
    """aioquic resuming a session sends its ClientHello and its first request in one
    datagram: the Initial's Length ends before the datagram does, a 0-RTT packet follows, then
    zero bytes to 1200. The reader sees the packets where aioquic's parser does and reads the
    hello from the Initial: a resumption offering early data (pre_shared_key comes last)."""
    capture, datagram = coalesced_capture(name)
    version = capture["quic_version"]
    initial_part, zero_rtt_part, zeros = capture["layout"][0]
    assert (initial_part["type"], zero_rtt_part["type"]) == ("INITIAL", "ZERO_RTT")
    header = peek_long_header(datagram)
    assert header.is_initial
    assert header.end == initial_part["size"] == zero_rtt_part["offset"] < len(datagram)
    behind = peek_long_header(datagram, header.end)
    assert not behind.is_initial
    assert (behind.version, behind.packet_type) == (version, ZERO_RTT_TYPE[version])
    assert behind.dcid == header.dcid
    assert behind.end == zeros["offset"]
    assert not datagram[behind.end :].strip(b"\x00")

    reader = QuicInitialReader()
    hello = reader.feed(datagram)
    assert hello is not None
    assert hello.server_name == capture["server_name"]
    assert hello.alpn == tuple(capture["alpn"])
    assert 0x0304 in hello.supported_versions
    assert not hello.has_ech
    assert hello.record_count == 0
    assert (reader.version, reader.datagrams) == (version, 1)
    types = extension_types(hello.raw)
    assert 42 in types  # early_data
    assert types[-1] == 41  # pre_shared_key, last (RFC 8446 section 4.2.11)


@pytest.mark.parametrize("name", ZERO_RTT_CAPTURES)
def test_the_0rtt_packet_behind_a_real_initial_is_skipped_unread(name: str) -> None:
    """The reader has no 0-RTT keys and needs none: the hello is the same without the 0-RTT
    packet, and with its protected bytes scrambled. On its own, the 0-RTT packet is kept
    waiting for its Initial: it may overtake it (RFC 9000 section 12.2)."""
    capture, datagram = coalesced_capture(name)
    hello = QuicInitialReader().feed(datagram)
    assert hello is not None
    _initial, zero_rtt, _zeros = capture["layout"][0]
    start, end = zero_rtt["offset"], zero_rtt["offset"] + zero_rtt["size"]
    behind = peek_long_header(datagram, start)
    scrambled = bytearray(datagram)
    scrambled[behind.pn_offset : end] = bytes(b ^ 0x5A for b in datagram[behind.pn_offset : end])
    for other in (datagram[:start], padded(datagram[:start]), bytes(scrambled)):
        assert QuicInitialReader().feed(other) == hello
    reader = QuicInitialReader()
    assert reader.feed(datagram[start:end]) is None  # the 0-RTT packet first, alone
    assert reader.feed(datagram[:start]) == hello


def test_datagrams_of_0rtt_packets_alone_are_bounded_like_any_incomplete_hello() -> None:
    capture, datagram = coalesced_capture(ZERO_RTT_CAPTURES[0])
    _initial, zero_rtt, _zeros = capture["layout"][0]
    alone = datagram[zero_rtt["offset"] : zero_rtt["offset"] + zero_rtt["size"]]
    reader = QuicInitialReader(max_datagrams=3)
    for _ in range(3):
        assert reader.feed(alone) is None
    with pytest.raises(MalformedHelloError, match="no complete ClientHello"):
        reader.feed(alone)


@pytest.mark.parametrize("name", ZERO_RTT_CAPTURES)
def test_a_real_coalesced_hello_is_the_same_fed_every_other_way(name: str) -> None:
    """The hello aioquic coalesced with 0-RTT, put into Initials built here (one packet; two
    coalesced packets; two datagrams in either order; shuffled CRYPTO frames), gives an equal
    ClientHello, and the TCP path's reader, given the same message in a TLS record, parses the
    same fields."""
    capture, datagram = coalesced_capture(name)
    version = capture["quic_version"]
    hello = QuicInitialReader().feed(datagram)
    assert hello is not None
    message = hello.raw
    half = len(message) // 2
    first = initial(crypto(0, message[:half]), pn=0, version=version)
    second = initial(crypto(half, message[half:]), pn=1, version=version)
    rng = random.Random(18)
    cuts = sorted(rng.sample(range(1, len(message)), 8))
    pieces = [(a, message[a:b]) for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
    rng.shuffle(pieces)
    shuffled = b"".join(crypto(at, data) for at, data in pieces)
    ways = [
        [padded(initial(crypto(0, message), version=version))],
        [padded(first + second)],
        [padded(first), padded(second)],
        [padded(second), padded(first)],
        [padded(initial(shuffled, version=version))],
    ]
    for datagrams in ways:
        reader = QuicInitialReader()
        assert read_all(datagrams, reader) == hello
        assert reader.version == version

    record = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
    tcp = ClientHelloReader()
    tcp.receive_data(record)
    tcp_hello = tcp.next_event()
    assert tcp_hello is not NEED_DATA
    assert (tcp_hello.raw, tcp_hello.record_count) == (record, 1)
    assert attrs.evolve(tcp_hello, raw=message, record_count=0) == hello


@pytest.mark.parametrize("version", [QUIC_V1, QUIC_V2])
def test_a_post_quantum_hello_over_two_initials_in_either_order(version: int) -> None:
    """Chromium's PQ hello (~1.8 KB) does not fit one 1200-byte datagram."""
    assert len(CHROMIUM_PQ) > 1200
    half = 1000
    first = padded(initial(crypto(0, CHROMIUM_PQ[:half]), pn=0, version=version))
    second = padded(initial(crypto(half, CHROMIUM_PQ[half:]), pn=1, version=version))
    for order in ([first, second], [second, first]):
        reader = QuicInitialReader()
        assert reader.feed(order[0]) is None
        hello = reader.feed(order[1])
        assert hello is not None
        assert hello.raw == CHROMIUM_PQ
        assert hello.record_count == 0


def test_shuffled_overlapping_and_repeated_crypto_frames_in_one_packet() -> None:
    """Clients split and shuffle their CRYPTO frames (Chrome does, on purpose); retransmitted
    ranges overlap. PING and PADDING frames sit between them."""
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(CURL)), 12))
    pieces = [(a, CURL[a:b]) for a, b in zip([0, *cuts], [*cuts, len(CURL)], strict=True)]
    pieces += [(10, CURL[10:60]), (200, CURL[200:230])]  # overlaps, the same bytes
    rng.shuffle(pieces)
    frames = b"".join(crypto(at, data) + b"\x01\x00\x00" for at, data in pieces)
    hello = QuicInitialReader().feed(padded(initial(frames)))
    assert hello is not None
    assert hello.raw == CURL


def test_coalesced_packets_and_a_short_header_after_them() -> None:
    """Two Initials in one datagram, then a short-header packet (unreadable, skipped)."""
    datagram = (
        initial(crypto(0, CURL[:100]), pn=0)
        + initial(crypto(100, CURL[100:]), pn=1)
        + b"\x40"
        + bytes(30)
    )
    hello = QuicInitialReader().feed(padded(datagram))
    assert hello is not None
    assert hello.raw == CURL


def test_a_packet_behind_the_initial_of_another_kind_is_skipped() -> None:
    """A 0-RTT packet (type 1 in version 1) coalesced behind the Initial."""
    zero_rtt = bytes([0xD0]) + QUIC_V1.to_bytes(4, "big") + b"\x08" + DCID + b"\x00"
    zero_rtt += b"\x40\x20" + bytes(32)
    hello = QuicInitialReader().feed(padded(initial(crypto(0, CURL)) + zero_rtt))
    assert hello is not None


def test_long_packet_numbers_are_decoded() -> None:
    hello = QuicInitialReader().feed(padded(initial(crypto(0, CURL), pn=0x123456, pn_len=4)))
    assert hello is not None


@pytest.mark.parametrize(
    ("datagram", "error", "words"),
    [
        (b"\x40" + bytes(1199), NotQuicInitialError, "long-header"),
        (b"", NotQuicInitialError, "long-header"),
        (
            bytes([0xC0]) + (0x1A2A3A4A).to_bytes(4, "big") + b"\x08" + DCID + bytes(1187),
            QuicVersionError,
            "0x1a2a3a4a",
        ),
        (
            bytes([0xC0]) + bytes(4) + b"\x08" + DCID + b"\x00" + bytes(1186),
            NotQuicInitialError,
            "Version Negotiation",
        ),
        (bytes([0xC0]) + QUIC_V1.to_bytes(4, "big") + b"\x30", MalformedHelloError, "DCID"),
    ],
)
def test_what_is_not_a_client_initial_is_named(
    datagram: bytes, error: type[ClientHelloError], words: str
) -> None:
    with pytest.raises(error, match=words):
        QuicInitialReader().feed(datagram)


def test_a_corrupted_packet_does_not_decrypt() -> None:
    packet = bytearray(padded(initial(crypto(0, CURL))))
    packet[100] ^= 1
    with pytest.raises(MalformedHelloError, match="does not decrypt"):
        QuicInitialReader().feed(bytes(packet))


def test_a_truncated_packet_says_where() -> None:
    packet = initial(crypto(0, CURL))
    with pytest.raises(MalformedHelloError, match="runs past the datagram"):
        QuicInitialReader().feed(packet[:-10])


def test_frames_an_initial_may_not_carry_are_refused() -> None:
    with pytest.raises(MalformedHelloError, match=r"frame type 0x8"):
        QuicInitialReader().feed(padded(initial(b"\x08\x00\x01x")))  # STREAM


def test_crypto_frames_that_disagree_are_refused() -> None:
    frames = crypto(0, CURL[:50]) + crypto(20, b"X" * 10)
    with pytest.raises(MalformedHelloError, match="disagree"):
        QuicInitialReader().feed(padded(initial(frames)))


def test_the_size_cap_counts_crypto_offsets() -> None:
    with pytest.raises(HelloTooLargeError, match="offset 5001"):
        QuicInitialReader(max_size=4096).feed(padded(initial(crypto(5000, b"x"))))
    with pytest.raises(HelloTooLargeError, match="announces"):
        QuicInitialReader(max_size=len(CURL) - 1).feed(padded(initial(crypto(0, CURL[:40]))))


def test_a_flow_without_a_complete_hello_is_given_up_after_max_datagrams() -> None:
    reader = QuicInitialReader(max_datagrams=3)
    for pn in range(3):
        assert reader.feed(padded(initial(crypto(0, CURL[:40]), pn=pn))) is None
    with pytest.raises(MalformedHelloError, match="first 3 datagrams"):
        reader.feed(padded(initial(crypto(0, CURL[:40]), pn=3)))


def test_the_version_may_not_change_within_a_flow() -> None:
    reader = QuicInitialReader()
    assert reader.feed(padded(initial(crypto(0, CURL[:40]), version=QUIC_V1))) is None
    with pytest.raises(MalformedHelloError, match="version changed"):
        reader.feed(padded(initial(crypto(40, CURL[40:]), pn=1, version=QUIC_V2)))


def test_a_new_dcid_after_a_retry_gets_its_own_keys() -> None:
    reader = QuicInitialReader()
    assert reader.feed(padded(initial(crypto(0, CURL[:40])))) is None
    hello = reader.feed(padded(initial(crypto(0, CURL), pn=1, dcid=b"\x01" * 8, token=b"t")))
    assert hello is not None


def test_peek_long_header_reads_a_retry_to_the_datagrams_end() -> None:
    retry = bytes([0xF0]) + QUIC_V1.to_bytes(4, "big") + b"\x00\x04abcd" + b"token" + bytes(16)
    header = peek_long_header(retry)
    assert header.scid == b"abcd"
    assert header.end == len(retry)
    assert not header.is_initial
