"""Fuzz targets for QuicInitialReader.

The invariants: whatever datagrams a UDP client sends, :meth:`QuicInitialReader.feed` returns
None, returns a ClientHello, or raises a ClientHelloError; nothing else. And a hello split into
CRYPTO frames at any offsets, overlapping or repeated, spread over any number of Initial
packets and datagrams in any order, reads back as exactly the message that was sent.
Inputs: random bytes behind a plausible long header, real protected Initials with one byte
changed or cut short, and structured hellos (``strategies.client_hellos``).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from quictest import DCID, crypto, handshake_message, initial, padded
from strategies import GeneratedHello, client_hellos

from trio_sni.sansio.clienthello import ClientHello
from trio_sni.sansio.errors import ClientHelloError
from trio_sni.sansio.quic_initial import QUIC_V1, QUIC_V2, QuicInitialReader

CURL = handshake_message("curl.bin")
CHROMIUM_PQ = handshake_message("chromium-pq.bin")


def outcome(datagrams: list[bytes]) -> object:
    """Feed as the proxy does; only ClientHelloError is caught."""
    reader = QuicInitialReader()
    try:
        for datagram in datagrams:
            hello = reader.feed(datagram)
            if hello is not None:
                return hello
    except ClientHelloError as exc:
        return exc
    return None


@given(st.lists(st.binary(max_size=1300), min_size=1, max_size=4))
def test_arbitrary_datagrams(datagrams: list[bytes]) -> None:
    outcome(datagrams)


@given(st.sampled_from([QUIC_V1, QUIC_V2, 0x1A2A3A4A, 0]), st.binary(max_size=1300))
def test_bytes_behind_a_long_header(version: int, rest: bytes) -> None:
    outcome([bytes([0xC0]) + version.to_bytes(4, "big") + b"\x08" + DCID + rest])


@given(st.integers(0, 1199), st.integers(1, 255), st.integers(1, 1200))
def test_a_real_initial_with_one_byte_changed_or_cut(at: int, flip: int, keep: int) -> None:
    packet = bytearray(padded(initial(crypto(0, CURL))))
    packet[at] ^= flip
    result = outcome([bytes(packet)])
    assert not isinstance(result, ClientHello) or result.raw == CURL
    result = outcome([bytes(packet[:keep])])
    assert not isinstance(result, ClientHello) or result.raw == CURL


@st.composite
def spread(draw: st.DrawFn, message: bytes) -> list[bytes]:
    """``message`` in CRYPTO frames (overlaps and repeats included) over shuffled Initial
    packets, coalesced into shuffled datagrams."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(message) - 1)), max_size=8)))
    pieces = [(a, message[a:b]) for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
    extra = draw(st.lists(st.tuples(st.integers(0, len(message) - 1), st.integers(1, 64))))
    pieces += [(a, message[a : a + n]) for a, n in extra[:4]]
    pieces = draw(st.permutations(pieces))
    packets_n = draw(st.integers(1, min(4, len(pieces))))
    version = draw(st.sampled_from([QUIC_V1, QUIC_V2]))
    packets = [
        initial(b"".join(crypto(a, d) for a, d in pieces[i::packets_n]), pn=i, version=version)
        for i in range(packets_n)
    ]
    datagrams: list[bytes] = []
    for packet in draw(st.permutations(packets)):
        if datagrams and len(datagrams[-1]) + len(packet) <= 1400 and draw(st.booleans()):
            datagrams[-1] += packet
        else:
            datagrams.append(packet)
    return [padded(d) for d in datagrams]


@given(st.data(), st.sampled_from([CURL, CHROMIUM_PQ]))
def test_a_captured_hello_spread_over_packets_reads_back(
    data: st.DataObject, message: bytes
) -> None:
    result = outcome(data.draw(spread(message)))
    assert isinstance(result, ClientHello)
    assert result.raw == message


@given(st.data(), client_hellos())
def test_a_structured_hello_spread_over_packets_reads_back(
    data: st.DataObject, hello: GeneratedHello
) -> None:
    result = outcome(data.draw(spread(hello.message)))
    if isinstance(result, ClientHello):
        assert result.raw == hello.message
        assert result.server_name == hello.server_name
        assert result.alpn == hello.alpn
    else:
        assert isinstance(result, ClientHelloError)  # e.g. a generated bad name
