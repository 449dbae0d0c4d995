"""The PROXY protocol (HAProxy's, versions 1 and 2): headers to send, and a reader, sans I/O.

Theory of operation
===================

A TCP proxy hides the client's address from the server behind it: the server sees the proxy's
socket. The PROXY protocol fixes that with one header the connecting side sends before any
other byte, naming the original source and destination addresses. trio-sni uses it both ways:

* **sending** (a rule's ``proxy_protocol``: ``"v1"`` or ``"v2"``): :func:`encode_v1` and
  :func:`encode_v2` build the header written to the target right after connecting;
* **accepting** (a listener's ``accept_proxy_protocol``, behind a load balancer):
  :class:`ProxyHeaderReader` reads the header the load balancer sends, and the address in it
  becomes the client address that policy, limits and logs use.

The reader works like :class:`~trio_sni.sansio.clienthello.ClientHelloReader`: the caller
feeds bytes with :meth:`~ProxyHeaderReader.receive_data` (``b""`` is EOF) and polls
:meth:`~ProxyHeaderReader.next_event`, which returns :data:`NEED_DATA`, returns a frozen
:class:`ProxyHeader`, or raises a :class:`ProxyHeaderError`. Bytes after the header (the
client's ClientHello) stay in :attr:`~ProxyHeaderReader.trailing_data`.

The states, and what moves the reader along (this table is the whole machine):

==========  ======================================================================  ==========
state       when                                                                    next state
==========  ======================================================================  ==========
``SNIFF``   the bytes so far are a prefix of ``"PROXY "``, once all 6 are in        ``V1``
``SNIFF``   the bytes so far are a prefix of the 12-byte v2 signature, once all in  ``V2HEAD``
``SNIFF``   a byte differs from both: once 16 bytes, a newline or EOF are in,       ``ERROR``
            raise :class:`MissingProxyHeaderError` quoting them
``V1``      CRLF within the first 107 bytes: parse the line                        ``DONE``
``V1``      107 bytes without CRLF: raise                                           ``ERROR``
``V2HEAD``  16 bytes in: check version, command, family, and the length cap         ``V2BODY``
``V2BODY``  the announced length in: parse the addresses, walk the TLVs             ``DONE``
==========  ======================================================================  ==========

Every decision is taken at a point fixed by the byte stream (a prefix complete, a CRLF, 16 bytes
of v2 header, the announced length), so the outcome does not depend on how the bytes were
chunked; the tests feed each header whole and byte by byte and compare.

Bounds: a v1 line is at most 107 bytes (the specification's own maximum, CRLF included). A v2
header announces its length, at most :data:`MAX_V2_PAYLOAD` bytes, checked when the 16-byte
header is complete, before anything is buffered for it. TLVs (type, 2-byte length, value) are
walked within the payload, so a TLV whose length runs past the end is an error and none can
make the reader read outside the header; their contents are not interpreted.

What the address means: ``PROXY`` (v2 command 1, v1 ``TCP4``/``TCP6``) carries the client's
address. ``LOCAL`` (v2 command 0) is the load balancer's own connection, a health check: it
has no client address, and the socket's peer is the one to use. So are v1 ``UNKNOWN`` and v2
``UNSPEC``/``AF_UNIX`` addresses. v2 over UDP (``DGRAM``) is an error: this is a TCP proxy.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Final, Literal

import attrs

from ._reader import NEED_DATA, BufferedReader, NeedData
from .errors import TrioSniError

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_PAYLOAD",
    "NEED_DATA",
    "V2_SIGNATURE",
    "BadProxyHeaderError",
    "MissingProxyHeaderError",
    "NeedData",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "encode_header",
    "encode_v1",
    "encode_v2",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]

V1_PREFIX: Final = b"PROXY "
#: The v2 signature: chosen by the specification never to be valid HTTP, TLS or v1.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LEN: Final = 16  # signature (12) + version/command (1) + family (1) + length (2)
#: The specification's maximum v1 line: "PROXY TCP6 " + two full IPv6 addresses + two ports,
#: CRLF included.
MAX_V1_LENGTH: Final = 107
#: The largest v2 payload (addresses plus TLVs) accepted. Real load balancers send at most a
#: few hundred bytes (AWS's VPC endpoint id, SSL info, a unique id); the field itself allows
#: 64 KiB, which every pending connection would then have to be able to buffer.
MAX_V2_PAYLOAD: Final = 4096
# How many bytes of a stream without a header are quoted in the error (as the ClientHello
# reader does): enough to recognise TLS or HTTP, short enough for a log line.
SNIFF_LEN: Final = 16

_V2_VERSION: Final = 0x2
_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
_FAM_UNSPEC: Final = 0x00
_FAM_TCP4: Final = 0x11
_FAM_UDP4: Final = 0x12
_FAM_TCP6: Final = 0x21
_FAM_UDP6: Final = 0x22
_FAM_UNIX_STREAM: Final = 0x31
_FAM_UNIX_DGRAM: Final = 0x32
#: Address block lengths per family (section 2.2): two addresses and, for INET, two ports.
_ADDRESS_LEN: Final = {
    _FAM_UNSPEC: 0,
    _FAM_TCP4: 12,
    _FAM_TCP6: 36,
    _FAM_UNIX_STREAM: 216,
}
# "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n": addresses are checked by ipaddress,
# ports are 0-65535 without leading zeros (the specification's wording).
_V1_LINE: Final = re.compile(
    rb"PROXY (TCP4|TCP6) ([0-9a-fA-F.:]+) ([0-9a-fA-F.:]+) (0|[1-9][0-9]{0,4}) "
    rb"(0|[1-9][0-9]{0,4})\r\n"
)


class ProxyHeaderError(TrioSniError):
    """A listener that accepts the PROXY protocol got no valid header first."""

    reason = "bad_proxy_header"


class MissingProxyHeaderError(ProxyHeaderError):
    """The connection does not start with a PROXY protocol header at all."""

    reason = "no_proxy_header"


class BadProxyHeaderError(ProxyHeaderError):
    """A PROXY protocol header that is malformed, truncated or too large."""

    reason = "bad_proxy_header"


@attrs.frozen
class ProxyHeader:
    """A received PROXY protocol header.

    Attributes:
        version: 1 or 2.
        command: ``"PROXY"`` (a relayed client connection) or ``"LOCAL"`` (the sender's own
            connection, such as a health check).
        source: the client's address and port; None when the header carries none (``LOCAL``,
            v1 ``UNKNOWN``, v2 ``UNSPEC`` or a Unix socket): use the socket's peer then.
        destination: the address and port the client connected to, or None likewise.
        tlv_types: the v2 TLV types present, in order (not interpreted; for logs).
        raw: the header's exact bytes.
    """

    version: int
    command: Literal["PROXY", "LOCAL"]
    source: Endpoint | None
    destination: Endpoint | None
    tlv_types: tuple[int, ...] = ()
    raw: bytes = attrs.field(default=b"", repr=False)


class _State(enum.Enum):
    SNIFF = "SNIFF"
    V1 = "V1"
    V2HEAD = "V2HEAD"
    V2BODY = "V2BODY"
    DONE = "DONE"


class ProxyHeaderReader(BufferedReader[ProxyHeader]):
    """Reads the PROXY protocol header (v1 or v2) at the start of an accepted connection.

    One reader per connection; see the module docstring for the theory of operation.
    """

    _errors = ProxyHeaderError

    def __init__(self) -> None:
        super().__init__()
        self._state = _State.SNIFF
        self._length = 0  # whole header length, once known (v2)

    def _advance(self) -> None:
        while self._event is None and self._step():
            pass

    def _truncated(self) -> ProxyHeaderError:
        return BadProxyHeaderError(
            f"connection closed after {len(self._buf)} bytes, before the PROXY "
            "protocol header was complete"
        )

    def _step(self) -> bool:
        if self._state is _State.SNIFF:
            return self._step_sniff()
        if self._state is _State.V1:
            return self._step_v1()
        if self._state is _State.V2HEAD:
            return self._step_v2_head()
        if self._state is _State.V2BODY:
            return self._step_v2_body()
        raise AssertionError(f"no step for state {self._state}")  # DONE returns earlier

    def _step_sniff(self) -> bool:
        if not self._buf:
            return False
        for prefix, state in ((V1_PREFIX, _State.V1), (V2_SIGNATURE, _State.V2HEAD)):
            n = min(len(self._buf), len(prefix))
            if self._buf[:n] == prefix[:n]:
                if n < len(prefix):
                    return False  # still a possible header: wait for more
                self._state = state
                return True
        # Neither: quote a prefix that depends only on the stream, not on the chunking.
        quoted = bytes(self._buf[:SNIFF_LEN])
        newline = quoted.find(b"\n")
        if newline >= 0:
            quoted = quoted[: newline + 1]
        elif len(quoted) < SNIFF_LEN and not self._eof:
            return False
        if quoted[0] == 0x16:
            hint = " (looks like TLS: is the load balancer sending PROXY headers?)"
        elif re.match(rb"[A-Z]+ ", quoted):
            hint = " (looks like plain HTTP: is the load balancer sending PROXY headers?)"
        else:
            hint = ""
        raise MissingProxyHeaderError(
            f"no PROXY protocol header: the connection starts with {quoted!r}{hint}; this "
            "listener has accept_proxy_protocol set and needs a v1 or v2 header first"
        )

    def _step_v1(self) -> bool:
        end = self._buf.find(b"\r\n", 0, MAX_V1_LENGTH)
        if end < 0:
            if len(self._buf) >= MAX_V1_LENGTH:
                raise BadProxyHeaderError(
                    f"PROXY v1 header without CRLF in its first {MAX_V1_LENGTH} bytes (the "
                    "specification's maximum)"
                )
            return False
        raw = bytes(self._buf[: end + 2])
        self._event = _parse_v1(raw)
        self._state = _State.DONE
        return True

    def _step_v2_head(self) -> bool:
        if len(self._buf) < V2_HEADER_LEN:
            return False
        version, command = self._buf[12] >> 4, self._buf[12] & 0x0F
        family = self._buf[13]
        length = int.from_bytes(self._buf[14:16], "big")
        if version != _V2_VERSION:
            raise BadProxyHeaderError(f"PROXY v2 header with version {version}, expected 2")
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise BadProxyHeaderError(
                f"PROXY v2 header with command 0x{command:x}, expected 0 (LOCAL) or 1 (PROXY)"
            )
        if family in (_FAM_UDP4, _FAM_UDP6, _FAM_UNIX_DGRAM):
            raise BadProxyHeaderError(
                f"PROXY v2 header for a datagram connection (family 0x{family:02x}) on a TCP "
                "listener"
            )
        if family not in _ADDRESS_LEN:
            raise BadProxyHeaderError(f"PROXY v2 header with unknown family 0x{family:02x}")
        if length > MAX_V2_PAYLOAD:
            raise BadProxyHeaderError(
                f"PROXY v2 header announces {length} bytes of addresses and TLVs, more than "
                f"the {MAX_V2_PAYLOAD} accepted"
            )
        if command == _CMD_PROXY and length < _ADDRESS_LEN[family]:
            raise BadProxyHeaderError(
                f"PROXY v2 header announces {length} bytes, too few for the "
                f"{_ADDRESS_LEN[family]}-byte addresses of family 0x{family:02x}"
            )
        self._length = V2_HEADER_LEN + length
        self._state = _State.V2BODY
        return True

    def _step_v2_body(self) -> bool:
        if len(self._buf) < self._length:
            return False
        self._event = _parse_v2(bytes(self._buf[: self._length]))
        self._state = _State.DONE
        return True


def _parse_v1(raw: bytes) -> ProxyHeader:
    if raw.startswith(b"PROXY UNKNOWN"):
        # Section 2.1: the receiver must ignore anything after UNKNOWN up to the CRLF.
        return ProxyHeader(version=1, command="PROXY", source=None, destination=None, raw=raw)
    match = _V1_LINE.fullmatch(raw)
    if match is None:
        raise BadProxyHeaderError(f"malformed PROXY v1 header {raw!r}")
    proto, src, dst, sport, dport = match.groups()
    want = 4 if proto == b"TCP4" else 6
    addresses = []
    for text in (src, dst):
        try:
            address = ipaddress.ip_address(text.decode("ascii"))
        except ValueError:
            raise BadProxyHeaderError(
                f"PROXY v1 header with an invalid address {text.decode('ascii')!r}"
            ) from None
        if address.version != want:
            raise BadProxyHeaderError(
                f"PROXY v1 header says {proto.decode()} but carries the IPv{address.version} "
                f"address {address}"
            )
        addresses.append(address)
    ports = [int(sport), int(dport)]
    if max(ports) > 65535:
        raise BadProxyHeaderError(f"PROXY v1 header with a port above 65535: {raw!r}")
    return ProxyHeader(
        version=1,
        command="PROXY",
        source=(addresses[0], ports[0]),
        destination=(addresses[1], ports[1]),
        raw=raw,
    )


def _parse_v2(raw: bytes) -> ProxyHeader:
    command = raw[12] & 0x0F
    family = raw[13]
    body = raw[V2_HEADER_LEN:]
    if command == _CMD_LOCAL:
        # Section 2.2: for LOCAL the receiver must ignore the address block; TLVs may follow
        # an address block we cannot delimit, so they are not walked either.
        return ProxyHeader(version=2, command="LOCAL", source=None, destination=None, raw=raw)
    address_len = _ADDRESS_LEN[family]
    source: Endpoint | None = None
    destination: Endpoint | None = None
    if family == _FAM_TCP4:
        source = (ipaddress.IPv4Address(body[0:4]), int.from_bytes(body[8:10], "big"))
        destination = (ipaddress.IPv4Address(body[4:8]), int.from_bytes(body[10:12], "big"))
    elif family == _FAM_TCP6:
        source = (ipaddress.IPv6Address(body[0:16]), int.from_bytes(body[32:34], "big"))
        destination = (ipaddress.IPv6Address(body[16:32]), int.from_bytes(body[34:36], "big"))
    return ProxyHeader(
        version=2,
        command="PROXY",
        source=source,
        destination=destination,
        tlv_types=_walk_tlvs(body, address_len),
        raw=raw,
    )


def _walk_tlvs(body: bytes, offset: int) -> tuple[int, ...]:
    """The types of the TLVs after the addresses; each must fit inside the header."""
    types = []
    while offset < len(body):
        if len(body) - offset < 3:
            raise BadProxyHeaderError(
                f"PROXY v2 header has {len(body) - offset} stray bytes after its TLVs (a TLV "
                "needs at least 3)"
            )
        tlv_type = body[offset]
        length = int.from_bytes(body[offset + 1 : offset + 3], "big")
        if offset + 3 + length > len(body):
            raise BadProxyHeaderError(
                f"PROXY v2 TLV 0x{tlv_type:02x} claims {length} bytes, past the end of the header"
            )
        types.append(tlv_type)
        offset += 3 + length
    return tuple(types)


# --- sending --------------------------------------------------------------------------------


def _same_family(source: Endpoint, destination: Endpoint) -> tuple[Endpoint, Endpoint]:
    """Give both endpoints one family, as both header versions require.

    IPv4-mapped IPv6 addresses (a dual-stack socket) become IPv4 when both can; if only one
    side is IPv4, it is written in its IPv4-mapped IPv6 form so the pair can travel as TCP6.
    """
    (src, sport), (dst, dport) = source, destination
    src4 = src.ipv4_mapped if isinstance(src, ipaddress.IPv6Address) else src
    dst4 = dst.ipv4_mapped if isinstance(dst, ipaddress.IPv6Address) else dst
    if src4 is not None and dst4 is not None:
        return (src4, sport), (dst4, dport)

    def as_v6(address: IPAddress) -> ipaddress.IPv6Address:
        if isinstance(address, ipaddress.IPv4Address):
            return ipaddress.IPv6Address(f"::ffff:{address}")
        return address

    return (as_v6(src), sport), (as_v6(dst), dport)


def encode_v1(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """A PROXY v1 header: ``PROXY TCP4 src dst sport dport\\r\\n``.

    Args:
        source: the client's address and port; None (with ``destination`` None) gives
            ``PROXY UNKNOWN\\r\\n``, the v1 form of "no client address".
        destination: the address and port the client connected to.
    """
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    (src, sport), (dst, dport) = _same_family(source, destination)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def encode_v2(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """A PROXY v2 header (binary, no TLVs): command PROXY over TCP4/TCP6, or LOCAL.

    Args:
        source: the client's address and port; None (with ``destination`` None) gives a
            ``LOCAL`` header, which tells the receiver to use the connection's own addresses.
        destination: the address and port the client connected to.
    """
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([(_V2_VERSION << 4) | _CMD_LOCAL, _FAM_UNSPEC, 0, 0])
    (src, sport), (dst, dport) = _same_family(source, destination)
    family = _FAM_TCP4 if src.version == 4 else _FAM_TCP6
    body = src.packed + dst.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return (
        V2_SIGNATURE
        + bytes([(_V2_VERSION << 4) | _CMD_PROXY, family])
        + len(body).to_bytes(2, "big")
        + body
    )


def encode_header(
    version: Literal["v1", "v2"], source: Endpoint | None, destination: Endpoint | None
) -> bytes:
    """:func:`encode_v1` or :func:`encode_v2`, by a rule's ``proxy_protocol`` setting."""
    return encode_v1(source, destination) if version == "v1" else encode_v2(source, destination)
