"""The ClientHello of a QUIC connection, read from the client's Initial packets (no I/O).

A QUIC client's first flight is one or more Initial packets (RFC 9000 section 17.2.2). Their
payload is protected, but with keys anybody can derive from the packet's Destination
Connection ID (RFC 9001 section 5.2; RFC 9369 section 3.3 for QUIC version 2), so a proxy
can read the ClientHello without terminating anything:

1. parse the long header up to the Length field (the packet number is still masked);
2. derive the client's Initial keys from the DCID (HKDF-SHA256 with the version's salt);
3. remove header protection (AES-128-ECB over a 16-byte sample, RFC 9001 section 5.4);
4. open the payload (AEAD_AES_128_GCM, nonce = IV xor packet number, the header as AAD);
5. walk the frames: CRYPTO frames carry the TLS handshake at an offset (RFC 9000 section
   19.6); PADDING, PING, ACK and CONNECTION_CLOSE may appear beside them, nothing else may;
6. put the CRYPTO bytes together by offset, in any order and across packets and datagrams
   (a post-quantum hello is ~2 KB and spans two Initials; clients also split and shuffle
   their CRYPTO frames on purpose), and parse the ClientHello once its handshake message is
   complete, with the same parser the TCP path uses.

One :class:`QuicInitialReader` per client flow; :meth:`~QuicInitialReader.feed` takes each
datagram as received (packets the reader cannot use, such as 0-RTT ones coalesced behind the
Initial, are skipped). Everything is bounded: the CRYPTO bytes by ``max_size``, the datagrams
by ``max_datagrams``; time is the caller's to bound.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .clienthello import DEFAULT_MAX_SIZE, HARD_MAX_SIZE, ClientHello, parse_client_hello_message
from .errors import HelloTooLargeError, MalformedHelloError, NotQuicInitialError, QuicVersionError

__all__ = [
    "QUIC_V1",
    "QUIC_V2",
    "InitialKeys",
    "LongHeader",
    "QuicInitialReader",
    "initial_keys",
    "peek_long_header",
]

QUIC_V1: Final = 0x00000001
QUIC_V2: Final = 0x6B3343CF


@attrs.frozen
class _Version:
    salt: bytes
    key_label: bytes
    iv_label: bytes
    hp_label: bytes
    #: The long-header packet type (bits 4-5 of the first byte) of an Initial packet.
    initial_type: int


_VERSIONS: Final = {
    # RFC 9001 section 5.2.
    QUIC_V1: _Version(
        bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
        b"quic key",
        b"quic iv",
        b"quic hp",
        0b00,
    ),
    # RFC 9369 sections 3.2 and 3.3.
    QUIC_V2: _Version(
        bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
        b"quicv2 key",
        b"quicv2 iv",
        b"quicv2 hp",
        0b01,
    ),
}

#: RFC 9000 section 17.2: connection IDs in version 1 long headers are at most 20 bytes.
MAX_CID_LEN: Final = 20
#: Datagrams one flow may take before its hello must be complete (a hello of 16 KiB needs
#: about 14 full-size Initials; real ones take one to three).
DEFAULT_MAX_DATAGRAMS: Final = 16
_SAMPLE_LEN: Final = 16

_FRAME_PADDING: Final = 0x00
_FRAME_PING: Final = 0x01
_FRAME_ACK: Final = 0x02
_FRAME_ACK_ECN: Final = 0x03
_FRAME_CRYPTO: Final = 0x06
_FRAME_CONNECTION_CLOSE: Final = 0x1C


def _hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """TLS 1.3's HKDF-Expand-Label with an empty context (RFC 8446 section 7.1), for lengths
    up to one SHA-256 block, which is all QUIC's Initial keys need."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return hmac.new(secret, info + b"\x01", hashlib.sha256).digest()[:length]


@attrs.frozen
class InitialKeys:
    """The client's Initial packet protection keys for one DCID."""

    key: bytes
    iv: bytes
    hp: bytes


def initial_keys(version: int, dcid: bytes) -> InitialKeys:
    """The client's Initial keys for a connection whose first Initial had ``dcid``.

    Raises:
        QuicVersionError: a version this reader does not know.
    """
    spec = _VERSIONS.get(version)
    if spec is None:
        raise QuicVersionError(f"QUIC version 0x{version:08x} is not one this proxy can read")
    initial_secret = hmac.new(spec.salt, dcid, hashlib.sha256).digest()
    client_secret = _hkdf_expand_label(initial_secret, b"client in", 32)
    return InitialKeys(
        key=_hkdf_expand_label(client_secret, spec.key_label, 16),
        iv=_hkdf_expand_label(client_secret, spec.iv_label, 12),
        hp=_hkdf_expand_label(client_secret, spec.hp_label, 16),
    )


class _Reader:
    """Bounds-checked reads from a datagram; errors say what and where."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedHelloError(
                f"QUIC {what} at offset {self.pos} needs {n} bytes, "
                f"{len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str) -> int:
        """RFC 9000 section 16: the two top bits of the first byte give the length."""
        first = self.u8(what)
        length = 1 << (first >> 6)
        value = first & 0x3F
        for byte in self.take(length - 1, what):
            value = (value << 8) | byte
        return value


@attrs.frozen
class LongHeader:
    """A long-header packet's fields up to its Length (RFC 9000 section 17.2), or a Version
    Negotiation packet's (``version`` 0, ``length`` covers the rest of the datagram)."""

    #: Offset of the packet's first byte in the datagram.
    start: int
    first_byte: int
    version: int
    dcid: bytes
    scid: bytes
    #: The packet type bits (4-5); meaningful for a known version only.
    packet_type: int
    token: bytes
    #: Offset of the (masked) packet number in the datagram.
    pn_offset: int
    #: Bytes from ``pn_offset`` to the end of this packet (packet number and payload).
    length: int

    @property
    def end(self) -> int:
        return self.pn_offset + self.length

    @property
    def is_initial(self) -> bool:
        spec = _VERSIONS.get(self.version)
        return spec is not None and self.packet_type == spec.initial_type

    @property
    def is_0rtt(self) -> bool:
        """A 0-RTT packet of a known version (type 0b01 in v1, 0b10 in v2)."""
        spec = _VERSIONS.get(self.version)
        return spec is not None and self.packet_type == (spec.initial_type + 1) & 0b11


def peek_long_header(datagram: bytes, offset: int = 0) -> LongHeader:
    """The long header at ``offset``; for a packet that is not an Initial of a known version,
    only what every version shares is read (RFC 8999) and ``length`` runs to the datagram's end.

    Raises:
        NotQuicInitialError: a short-header packet, or too short to be a long header.
        MalformedHelloError: a field runs past the datagram.
    """
    r = _Reader(datagram, offset)
    if offset >= len(datagram) or not datagram[offset] & 0x80:
        raise NotQuicInitialError(
            "the datagram does not start a QUIC long-header packet (a short header or not QUIC)"
        )
    first = r.u8("first byte")
    version = int.from_bytes(r.take(4, "version"), "big")
    dcid = r.take(r.u8("DCID length"), "DCID")
    scid = r.take(r.u8("SCID length"), "SCID")
    packet_type = (first >> 4) & 0b11
    spec = _VERSIONS.get(version)
    if spec is None:
        return LongHeader(
            offset, first, version, dcid, scid, packet_type, b"", r.pos, len(datagram) - r.pos
        )
    if len(dcid) > MAX_CID_LEN or len(scid) > MAX_CID_LEN:
        raise MalformedHelloError(
            f"QUIC connection ID of {max(len(dcid), len(scid))} bytes (at most {MAX_CID_LEN})"
        )
    token = b""
    if packet_type == spec.initial_type:
        token = r.take(r.varint("token length"), "token")
    retry = (spec.initial_type + 3) & 0b11  # Retry: v1 0b11, v2 0b00
    if packet_type == retry:
        return LongHeader(
            offset, first, version, dcid, scid, packet_type, b"", r.pos, len(datagram) - r.pos
        )
    length = r.varint("Length")
    if r.pos + length > len(datagram):
        raise MalformedHelloError(
            f"QUIC packet Length {length} at offset {offset} runs past the datagram's "
            f"{len(datagram)} bytes"
        )
    return LongHeader(offset, first, version, dcid, scid, packet_type, token, r.pos, length)


def _decode_packet_number(truncated: int, pn_len: int, largest: int) -> int:
    """RFC 9000 appendix A.3."""
    expected = largest + 1
    window = 1 << (pn_len * 8)
    half = window // 2
    candidate = (expected & ~(window - 1)) | truncated
    if candidate <= expected - half and candidate < (1 << 62) - window:
        return candidate + window
    if candidate > expected + half and candidate >= window:
        return candidate - window
    return candidate


class QuicInitialReader:
    """Reads one client flow's ClientHello from its Initial packets (see the module docstring).

    Args:
        max_size: the most CRYPTO-stream bytes the hello may take (like TCP's cap).
        max_datagrams: the most datagrams fed before the hello must be complete.

    :meth:`feed` raises :class:`NotQuicInitialError` (the flow does not start with a client
    Initial), :class:`QuicVersionError` (a version this reader does not know: the client will
    fall back to TCP), :class:`MalformedHelloError` (fields that do not add up, a payload that
    does not decrypt, frames an Initial may not carry, too many datagrams),
    :class:`HelloTooLargeError`, or the ClientHello parser's errors.
    """

    def __init__(
        self, max_size: int = DEFAULT_MAX_SIZE, max_datagrams: int = DEFAULT_MAX_DATAGRAMS
    ) -> None:
        if not 1 <= max_size <= HARD_MAX_SIZE:
            raise ValueError(f"max_size must be between 1 and {HARD_MAX_SIZE} bytes")
        self._max_size = max_size
        self._max_datagrams = max_datagrams
        self.datagrams = 0
        #: The version of the flow's first Initial; later packets must agree.
        self.version: int | None = None
        self._keys: dict[bytes, InitialKeys] = {}
        self._largest_pn = -1
        self._stream = bytearray()
        #: Which bytes of ``_stream`` have arrived, as sorted, disjoint [start, end) ranges.
        self._filled: list[tuple[int, int]] = []
        self.hello: ClientHello | None = None

    def feed(self, datagram: bytes) -> ClientHello | None:
        """Take one datagram from the client; the ClientHello once it is complete, else None
        (feed the next datagram). After the hello, further datagrams are not read."""
        if self.hello is not None:
            return self.hello
        self.datagrams += 1
        if self.datagrams > self._max_datagrams:
            raise MalformedHelloError(
                f"no complete ClientHello in the flow's first {self._max_datagrams} datagrams"
            )
        if self.version is None and not (datagram and datagram[0] & 0x80):
            peek_long_header(datagram)  # raises the error that names it
        offset = 0
        read_any = zero_rtt = False
        while offset < len(datagram):
            if not datagram[offset] & 0x80:
                break  # a short-header packet ends the datagram's long ones (RFC 9000 12.2)
            header = peek_long_header(datagram, offset)
            if header.version == 0:
                raise NotQuicInitialError("a Version Negotiation packet from a client")
            if header.is_initial:
                if self.version is None:
                    self.version = header.version
                elif header.version != self.version:
                    raise MalformedHelloError(
                        f"QUIC version changed from 0x{self.version:08x} to "
                        f"0x{header.version:08x} within a flow"
                    )
                self._read_initial(datagram, header)
                read_any = True
            elif header.is_0rtt:
                zero_rtt = True
            elif header.version not in _VERSIONS and not read_any and self.version is None:
                raise QuicVersionError(
                    f"QUIC version 0x{header.version:08x} is not one this proxy can read"
                )
            offset = header.end
        if not read_any and self.version is None:
            if zero_rtt:
                # A 0-RTT datagram overtook its Initial (a client may send them apart, RFC 9000
                # section 12.2): wait for the Initial, within the flow's datagram bound.
                return None
            raise NotQuicInitialError("the flow's first datagram carries no Initial packet")
        return self._hello_if_complete()

    def _read_initial(self, datagram: bytes, header: LongHeader) -> None:
        keys = self._keys.get(header.dcid)
        if keys is None:
            if len(self._keys) >= 4:  # a Retry changes the DCID once; more is not a client
                raise MalformedHelloError("Initial packets with more than 4 different DCIDs")
            keys = self._keys[header.dcid] = initial_keys(header.version, header.dcid)
        pn_offset = header.pn_offset
        sample_at = pn_offset + 4
        if header.length < 4 + _SAMPLE_LEN:
            raise MalformedHelloError(
                f"QUIC Initial packet of {header.length} bytes after its header is too short "
                f"to sample for header protection"
            )
        sample = datagram[sample_at : sample_at + _SAMPLE_LEN]
        encryptor = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
        mask = encryptor.update(sample) + encryptor.finalize()
        first = header.first_byte ^ (mask[0] & 0x0F)
        pn_len = (first & 0x03) + 1
        truncated_bytes = bytes(
            b ^ m for b, m in zip(datagram[pn_offset : pn_offset + pn_len], mask[1:], strict=False)
        )
        truncated = int.from_bytes(truncated_bytes, "big")
        pn = _decode_packet_number(truncated, pn_len, self._largest_pn)
        header_bytes = bytearray(datagram[header.start : pn_offset + pn_len])
        header_bytes[0] = first
        header_bytes[-pn_len:] = truncated_bytes
        nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
        try:
            payload = AESGCM(keys.key).decrypt(
                nonce, datagram[pn_offset + pn_len : header.end], bytes(header_bytes)
            )
        except InvalidTag:
            raise MalformedHelloError(
                "a QUIC Initial packet does not decrypt with the keys of its DCID (corrupt, or "
                "not from a client)"
            ) from None
        self._largest_pn = max(self._largest_pn, pn)
        self._read_frames(payload)

    def _read_frames(self, payload: bytes) -> None:
        r = _Reader(payload)
        while r.pos < len(payload):
            frame = r.varint("frame type")
            if frame in (_FRAME_PADDING, _FRAME_PING):
                continue
            if frame == _FRAME_CRYPTO:
                at = r.varint("CRYPTO offset")
                data = r.take(r.varint("CRYPTO length"), "CRYPTO data")
                self._add_crypto(at, data)
            elif frame in (_FRAME_ACK, _FRAME_ACK_ECN):
                r.varint("ACK largest")
                r.varint("ACK delay")
                ranges = r.varint("ACK range count")
                r.varint("ACK first range")
                for _ in range(ranges):
                    r.varint("ACK gap")
                    r.varint("ACK range")
                if frame == _FRAME_ACK_ECN:
                    for what in ("ECT0", "ECT1", "ECN-CE"):
                        r.varint(what)
            elif frame == _FRAME_CONNECTION_CLOSE:
                r.varint("error code")
                r.varint("frame type")
                r.take(r.varint("reason length"), "reason")
            else:
                raise MalformedHelloError(
                    f"frame type 0x{frame:x} in a QUIC Initial packet (only CRYPTO, ACK, "
                    f"PADDING, PING and CONNECTION_CLOSE may appear there)"
                )

    def _add_crypto(self, at: int, data: bytes) -> None:
        end = at + len(data)
        if end > self._max_size:
            raise HelloTooLargeError(
                f"ClientHello larger than the {self._max_size}-byte limit: a QUIC CRYPTO frame "
                f"reaches offset {end}"
            )
        if not data:
            return
        if len(self._stream) < end:
            self._stream.extend(bytes(end - len(self._stream)))
        for start, stop in self._filled:  # a retransmission must say the same
            lo, hi = max(start, at), min(stop, end)
            if lo < hi and self._stream[lo:hi] != data[lo - at : hi - at]:
                raise MalformedHelloError(
                    f"QUIC CRYPTO frames disagree about the bytes at offsets {lo}-{hi}"
                )
        self._stream[at:end] = data
        merged: list[tuple[int, int]] = []
        for start, stop in sorted([*self._filled, (at, end)]):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        self._filled = merged

    def _hello_if_complete(self) -> ClientHello | None:
        if not self._filled or self._filled[0][0] != 0:
            return None
        have = self._filled[0][1]
        if have < 4:
            return None
        if self._stream[0] != 1:
            raise MalformedHelloError(
                f"the QUIC CRYPTO stream starts with handshake type {self._stream[0]}, "
                f"not 1 (client_hello)"
            )
        need = 4 + int.from_bytes(self._stream[1:4], "big")
        if need > self._max_size:
            raise HelloTooLargeError(
                f"ClientHello larger than the {self._max_size}-byte limit: its handshake "
                f"header announces {need - 4} bytes of body"
            )
        if have < need:
            return None
        self.hello = parse_client_hello_message(self._stream[:need])
        return self.hello
