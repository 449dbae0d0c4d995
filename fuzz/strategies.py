"""Hypothesis strategies for the ClientHello reader: structured hellos, framings, names.

Generating *structure* (with every length computed) instead of random bytes is what lets the
fuzzer reach the deep parts of the parser: random bytes almost never get past the record
header. Mutations (truncate, corrupt one length, re-frame) are then applied on purpose by the
tests, so each failure shrinks to a small, readable hello (hypothesis'
``strategies-that-shrink`` advice: build with ``@st.composite``, let the pieces shrink).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Literal

import attrs
from hypothesis import provisional
from hypothesis import strategies as st

from trio_sni.sansio.hostname import is_valid_hostname, normalize_sni
from trio_sni.sansio.proxy_protocol import encode_v1, encode_v2
from trio_sni.sansio.socks5 import Socks5Connected

__all__ = [
    "GeneratedHello",
    "GeneratedProxyHeader",
    "Socks5Transcript",
    "chunkings",
    "client_hellos",
    "proxy_headers",
    "records",
    "sni_names",
    "socks5_server_replies",
]

# Extension types the reader interprets; "other" extensions are drawn from outside this set.
_INTERPRETED = frozenset({0, 16, 43, 0xFE0D})
# Printable ASCII, so that ALPN ids round-trip through the reader's ASCII decoding unchanged.
_ALPN_ALPHABET = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@attrs.frozen
class GeneratedHello:
    """A generated handshake message and what the reader must find in it.

    ``length_fields`` lists every length field in ``message`` as ``(offset, width)``, so a
    test can corrupt exactly one of them.
    """

    message: bytes
    server_name: str
    alpn: tuple[str, ...]
    supported_versions: tuple[int, ...]
    legacy_version: int
    has_ech: bool
    length_fields: tuple[tuple[int, int], ...]


class _Builder:
    """Appends TLS vectors, remembering where each length prefix sits."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lengths: list[tuple[int, int]] = []

    def raw(self, data: bytes) -> None:
        self.data += data

    def vector(self, width: int, body: _Builder) -> None:
        """Append ``body`` with a length prefix; its length fields move with it."""
        self.lengths.append((len(self.data), width))
        self.data += len(body.data).to_bytes(width, "big")
        base = len(self.data)
        self.lengths.extend((base + offset, w) for offset, w in body.lengths)
        self.data += body.data


def _leaf(data: bytes) -> _Builder:
    builder = _Builder()
    builder.raw(data)
    return builder


@st.composite
def sni_names(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid host name as a client might send it, and its normalised form.

    Names come from ``hypothesis.provisional.domains`` (real TLDs, mixed case); sometimes with
    the one trailing dot a client may send.
    """
    name = draw(provisional.domains(max_length=200).filter(is_valid_hostname))
    if draw(st.booleans()):
        name += "."
    return name.encode("ascii"), normalize_sni(name)


@st.composite
def client_hellos(draw: st.DrawFn) -> GeneratedHello:
    """A structurally valid ClientHello handshake message (RFC 8446 4.1.2), with SNI.

    The optional extensions (ALPN, supported_versions, ECH and unknown ones) appear or not,
    in any order, so the fuzzer covers orderings real clients never send.
    """
    legacy_version = draw(st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303]))
    sni_bytes, server_name = draw(sni_names())
    alpn = tuple(draw(st.lists(st.text(_ALPN_ALPHABET, min_size=1, max_size=12), max_size=4)))
    versions = tuple(draw(st.lists(st.integers(0, 0xFFFF), max_size=6)))
    has_ech = draw(st.booleans())

    extensions: list[tuple[int, _Builder]] = []
    names = _Builder()
    names.raw(b"\x00")
    names.vector(2, _leaf(sni_bytes))
    sni = _Builder()
    sni.vector(2, names)
    extensions.append((0, sni))
    if alpn:
        protocols = _Builder()
        for protocol in alpn:
            protocols.vector(1, _leaf(protocol.encode("ascii")))
        alpn_ext = _Builder()
        alpn_ext.vector(2, protocols)
        extensions.append((16, alpn_ext))
    if versions:
        versions_ext = _Builder()
        versions_ext.vector(1, _leaf(b"".join(struct.pack("!H", v) for v in versions)))
        extensions.append((43, versions_ext))
    if has_ech:
        extensions.append((0xFE0D, _leaf(draw(st.binary(max_size=64)))))
    others = draw(
        st.dictionaries(
            st.integers(0, 0xFFFF).filter(lambda t: t not in _INTERPRETED),
            st.binary(max_size=40),
            max_size=5,
        )
    )
    extensions.extend((ext_type, _leaf(data)) for ext_type, data in others.items())
    extensions = draw(st.permutations(extensions))

    block = _Builder()
    for ext_type, ext_body in extensions:
        block.raw(struct.pack("!H", ext_type))
        block.vector(2, ext_body)

    body = _Builder()
    body.raw(struct.pack("!H", legacy_version))
    body.raw(draw(st.binary(min_size=32, max_size=32)))
    body.vector(1, _leaf(draw(st.binary(max_size=32))))
    suites = draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20))
    body.vector(2, _leaf(b"".join(struct.pack("!H", s) for s in suites)))
    body.vector(1, _leaf(draw(st.binary(min_size=1, max_size=3))))
    body.vector(2, block)

    message = _Builder()
    message.raw(b"\x01")
    message.vector(3, body)
    return GeneratedHello(
        message=bytes(message.data),
        server_name=server_name,
        alpn=alpn,
        supported_versions=versions,
        legacy_version=legacy_version,
        has_ech=has_ech,
        length_fields=tuple(message.lengths),
    )


@st.composite
def records(draw: st.DrawFn, message: bytes) -> bytes:
    """``message`` framed into one or more handshake records at random cut points.

    Mostly a few records, sometimes many tiny ones: both are legal (RFC 8446 5.1) and both
    occur, from big PQ hellos and from DPI-evasion tools.
    """
    if len(message) < 2:
        cuts: list[int] = []
    elif draw(st.booleans()):
        size = draw(st.integers(1, 64))
        cuts = list(range(size, len(message), size))
    else:
        cuts = sorted(draw(st.sets(st.integers(1, len(message) - 1), max_size=8)))
    version = draw(st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x00"]))
    out = bytearray()
    for start, end in zip([0, *cuts], [*cuts, len(message)], strict=True):
        piece = message[start:end]
        out += b"\x16" + version + struct.pack("!H", len(piece)) + piece
    return bytes(out)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut into TCP-like chunks at random points (the concatenation is ``data``)."""
    if len(data) < 2:
        return [data]
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=20)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# --- SOCKS5 server replies and PROXY protocol headers ---------------------------------------


@attrs.frozen
class Socks5Transcript:
    """What a well-behaved SOCKS5 server sends to a client asking for bench.test:443.

    ``wire`` is the server's whole side of the handshake, ``after`` the target's first bytes
    that follow it, and ``expected`` the event the client must produce.
    """

    auth: bool
    wire: bytes
    after: bytes
    expected: Socks5Connected


@st.composite
def socks5_server_replies(draw: st.DrawFn) -> Socks5Transcript:
    """Method selection (RFC 1928), optional RFC 1929 status, and a success reply whose
    BND.ADDR is any of the three address types."""
    auth = draw(st.booleans())
    method = 0x02 if auth and draw(st.booleans()) else 0x00
    wire = bytes([5, method])
    if method == 0x02:
        wire += b"\x01\x00"
    atyp = draw(st.sampled_from([1, 3, 4]))
    if atyp in (1, 4):
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = draw(
            st.ip_addresses(v=4 if atyp == 1 else 6)
        )
        encoded, host = address.packed, str(address)
    else:
        name = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40))
        encoded, host = bytes([len(name)]) + name.encode(), name
    port = draw(st.integers(0, 65535))
    wire += bytes([5, 0, 0, atyp]) + encoded + port.to_bytes(2, "big")
    return Socks5Transcript(
        auth=auth,
        wire=wire,
        after=draw(st.binary(max_size=16)),
        expected=Socks5Connected(bound_host=host, bound_port=port),
    )


@attrs.frozen
class GeneratedProxyHeader:
    """A PROXY protocol header and the endpoints a reader must find in it (None: LOCAL /
    UNKNOWN, where the socket's own addresses apply)."""

    data: bytes
    version: int
    source: tuple[Any, int] | None
    destination: tuple[Any, int] | None


@st.composite
def proxy_headers(draw: st.DrawFn) -> GeneratedProxyHeader:
    """v1 or v2 headers for TCP4/TCP6 or without addresses; v2 ones with random TLVs."""
    version = draw(st.sampled_from([1, 2]))
    families: list[Literal[4, 6] | None] = [4, 6, None]
    family = draw(st.sampled_from(families))
    if family is None:
        source = destination = None
    else:
        # IPv4-mapped IPv6 addresses are sent as TCP4 on purpose (encode_v1's docstring);
        # they are tested in tests/sansio/test_proxy_protocol.py, not round-tripped here.
        addresses = st.ip_addresses(v=family).filter(
            lambda a: a.version == 4 or a.ipv4_mapped is None
        )
        source = (draw(addresses), draw(st.integers(0, 65535)))
        destination = (draw(addresses), draw(st.integers(0, 65535)))
    if version == 1:
        data = encode_v1(source, destination)
    else:
        data = encode_v2(source, destination)
        if source is not None:
            tlvs = b"".join(
                bytes([t]) + len(v).to_bytes(2, "big") + v
                for t, v in draw(
                    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)
                )
            )
            length = int.from_bytes(data[14:16], "big") + len(tlvs)
            data = data[:14] + length.to_bytes(2, "big") + data[16:] + tlvs
    return GeneratedProxyHeader(data, version, source, destination)
