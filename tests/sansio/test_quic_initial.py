"""The QUIC Initial reader: real clients' Initials (captured from headless Chromium and from
aioquic in ``tests/data/quic``, and aioquic's made here, versions 1 and 2), the RFC key
vectors, and packets built here to split, shuffle, repeat and coalesce CRYPTO frames."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
    (then retransmissions); aioquic's fits one. Any order gives the same hello."""
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
