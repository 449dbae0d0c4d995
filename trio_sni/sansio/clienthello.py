"""Read the ClientHello a TLS client sends first, without terminating TLS.

Theory of operation
===================

An SNI proxy needs exactly one thing from a TLS connection before it can route it: the
ClientHello, the first handshake message. It must read that message, take the server name (and
a few other fields) from it, and then forward *every byte it read*, unchanged, to the server it
picked. :class:`ClientHelloReader` does that reading and nothing else, in the style of h11: the
caller owns the socket and the clock, feeds bytes with :meth:`~ClientHelloReader.receive_data`
(``b""`` means end of file), and calls :meth:`~ClientHelloReader.next_event`, which returns
:data:`NEED_DATA`, returns a frozen :class:`ClientHello`, or raises a
:class:`~trio_sni.sansio.errors.ClientHelloError`. Any other exception is a bug.

What arrives on the wire (RFC 8446 section 5.1) is a sequence of TLS records, each with a 5-byte
header (content type, version, length) and up to 2^14 bytes of payload. The ClientHello is a
handshake message (1-byte type, 3-byte length, body) carried in the payloads of one *or more*
handshake records: a client may fragment it across records (old stacks do it for large hellos,
DPI-evasion tools do it on purpose), and TCP may split the bytes anywhere, so post-quantum hellos
of ~1.8-2 KB routinely arrive in two segments. The reader therefore reassembles at two levels:
it buffers bytes until a record header is complete, then appends each record's payload, as it
arrives, to the handshake message, until that message is complete.

The states, and what moves the reader from one to the next. This table is the whole machine:
:meth:`ClientHelloReader.next_event` runs the step for the current state until no step makes
progress, and then raises the EOF error if the client has closed, or returns NEED_DATA.

==========  =================================================================  ==========
state       when                                                               next state
==========  =================================================================  ==========
``SNIFF``   the first byte is a TLS content type (20 to 24: a TLS record)      ``HEADER``
``SNIFF``   otherwise, once 16 bytes, a newline or EOF are in: raise           ``ERROR``
            ``SSLv2HelloError`` or ``NotTLSError``, quoting those bytes
``HEADER``  each byte as it comes: type 22, version 0x03xx; then the length    ``BODY``
            and the cap, once all 5 are in
``BODY``    payload bytes in: move them into the handshake message; check      ``BODY``
            type 1 once its first byte is in, the announced size once its
            4-byte header is
``BODY``    the record is used up, the message is not complete                 ``HEADER``
``BODY``    the message is complete: raise if its record has bytes left,       ``DONE``
            else parse the body and build the :class:`ClientHello`
``DONE``    every later call returns the same :class:`ClientHello`             ``DONE``
``ERROR``   every later call raises the same error                             ``ERROR``
==========  =================================================================  ==========

Each check runs at a point fixed by the byte stream itself (the last byte it looks at, a
message complete, 16 bytes sniffed), never by how much happens to be buffered, and looks only at
bytes before that point. That makes the outcome, including the exact error message, independent
of how the input was chunked: the tests and the fuzzers feed every input whole, byte by byte and
in random chunks, and assert the same result. And each check runs as soon as its bytes are in,
never later: a client whose first packet is a short record of another kind (an alert, a few
bytes of application data) and which then waits for an answer is refused at once, not at the
hello deadline. Only bytes that are not TLS at all are given up to 16 bytes, to be quoted.

Bounds, and why: the bytes of all records that make up the hello (headers included) may not
exceed ``max_size`` (default 16 KiB, like nginx's ``preread_buffer_size``; hard maximum 64 KiB),
because every pending connection holds that much memory. The check fires as soon as a record
header or the handshake header announces a size beyond the cap, not after buffering it.
A record may not claim more than 2^14 + 256 bytes (the largest record RFC 8446 allows at all),
nor zero bytes (RFC 8446 5.1 forbids empty handshake records).

Bytes that follow the last hello record (a ChangeCipherSpec, TLS 1.3 early data) are not part
of the hello; they stay in :attr:`ClientHelloReader.trailing_data` for the proxy to forward
right after :attr:`ClientHello.raw`, so nothing the client sent is lost. Handshake bytes after
the ClientHello *inside* its last record are an error: a client sends nothing else until the
server answers.

The message body is walked with :class:`~trio_sni.sansio._wire.Cursor`, which bounds every read
by its innermost length-prefixed vector. Its ``DecodeError`` is turned into
``MalformedHelloError`` here, at the one place where client bytes enter.
"""

from __future__ import annotations

import enum
import re
from typing import Final

import attrs

from ._reader import NEED_DATA, BufferedReader, NeedData
from ._wire import Cursor, DecodeError
from .errors import (
    ClientHelloError,
    HelloTooLargeError,
    MalformedHelloError,
    NoSNIError,
    NotTLSError,
    SSLv2HelloError,
)
from .hostname import normalize_sni

__all__ = [
    "DEFAULT_MAX_SIZE",
    "HARD_MAX_SIZE",
    "NEED_DATA",
    "ClientHello",
    "ClientHelloReader",
    "NeedData",
    "parse_client_hello_message",
]

# nginx's preread_buffer_size default; fits every real hello seen, including PQ and ECH ones.
DEFAULT_MAX_SIZE: Final = 16 * 1024
# The largest cap an operator may set: a handshake record carries at most 2^14 bytes, and no
# real client sends a hello over 64 KiB; more would only make each pending connection costlier.
HARD_MAX_SIZE: Final = 64 * 1024

RECORD_HEADER_LEN: Final = 5  # content type (1) + legacy_record_version (2) + length (2)
HANDSHAKE_HEADER_LEN: Final = 4  # msg_type (1) + length (3)
# RFC 8446 5.2: no record, even a protected one, may exceed 2^14 + 256 bytes. A ClientHello
# record is plaintext (limit 2^14), but the looser bound costs nothing and keeps the decision
# "this client is broken" for the server, which can send a proper alert.
MAX_RECORD_LENGTH: Final = 2**14 + 256
# How many bytes of a non-TLS stream are quoted in the error: enough for "GET / HTTP/1.1\r\n"
# or an SSH banner's start, short enough for a log line.
SNIFF_LEN: Final = 16

CONTENT_TYPE_HANDSHAKE: Final = 22
HANDSHAKE_CLIENT_HELLO: Final = 1

EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
EXT_SUPPORTED_VERSIONS: Final = 43
EXT_ENCRYPTED_CLIENT_HELLO: Final = 0xFE0D
NAME_TYPE_HOST_NAME: Final = 0

_CONTENT_TYPE_NAMES: Final = {
    20: "change_cipher_spec",
    21: "alert",
    22: "handshake",
    23: "application_data",
    24: "heartbeat",
}
_HANDSHAKE_TYPE_NAMES: Final = {
    0: "hello_request",
    1: "client_hello",
    2: "server_hello",
    4: "new_session_ticket",
    8: "encrypted_extensions",
    11: "certificate",
    12: "server_key_exchange",
    13: "certificate_request",
    14: "server_hello_done",
    15: "certificate_verify",
    16: "client_key_exchange",
    20: "finished",
}
_EXTENSION_NAMES: Final = {
    EXT_SERVER_NAME: "server_name",
    EXT_ALPN: "application_layer_protocol_negotiation",
    EXT_SUPPORTED_VERSIONS: "supported_versions",
    EXT_ENCRYPTED_CLIENT_HELLO: "encrypted_client_hello",
}
_HTTP_REQUEST: Final = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|CONNECT|PATCH|TRACE|PRI) ")


@attrs.frozen
class ClientHello:
    """The fields of a client's ClientHello that the proxy routes, filters and logs on.

    Built only by :class:`ClientHelloReader`; the reader has validated every field, so nothing
    here needs re-checking.

    Attributes:
        server_name: the SNI host_name, normalised by
            :func:`~trio_sni.sansio.hostname.normalize_sni` (lower case, no trailing dot).
        alpn: the offered ALPN protocol ids in the client's order, decoded as ASCII with
            non-ASCII bytes shown as ``\\xNN`` escapes; empty if the client sent no ALPN.
        supported_versions: the ``supported_versions`` extension as sent (GREASE values
            included), e.g. ``(0x0304, 0x0303)``; empty if absent (a TLS 1.2-only client).
        legacy_version: the ``legacy_version`` field (0x0303 for TLS 1.2 and 1.3 clients).
        has_ech: whether the encrypted_client_hello extension (0xfe0d) is present. If so, the
            server name may be an ECH front's ``public_name``, not the real destination.
        raw: exactly the bytes of the TLS records that carried the hello, headers included;
            forward these to the server unchanged.
        record_count: how many TLS records carried the hello (more than one is rare, and
            worth a metric).
    """

    server_name: str
    alpn: tuple[str, ...]
    supported_versions: tuple[int, ...]
    legacy_version: int
    has_ech: bool
    raw: bytes = attrs.field(repr=False)
    record_count: int

    @property
    def size(self) -> int:
        """Length of :attr:`raw` in bytes (what the cap is compared against)."""
        return len(self.raw)


class _State(enum.Enum):
    SNIFF = "SNIFF"
    HEADER = "HEADER"
    BODY = "BODY"
    DONE = "DONE"


def _type_name(names: dict[int, str], value: int) -> str:
    name = names.get(value)
    return f"{value} ({name})" if name else str(value)


def _extension_name(ext_type: int) -> str:
    return _EXTENSION_NAMES.get(ext_type, f"0x{ext_type:04x}")


class ClientHelloReader(BufferedReader[ClientHello]):
    """Incrementally reads one ClientHello from the bytes a client sends first.

    One reader per connection. Feed it with :meth:`receive_data` and poll :meth:`next_event`;
    see the module docstring for the theory of operation.

    Args:
        max_size: the most bytes (TLS records, headers included) the hello may take. A bigger
            hello raises :class:`~trio_sni.sansio.errors.HelloTooLargeError` as soon as its size
            is announced.

    Raises:
        ValueError: ``max_size`` is not between 1 and :data:`HARD_MAX_SIZE`.

    :meth:`next_event` raises :class:`NotTLSError` (the client does not speak TLS),
    :class:`SSLv2HelloError`, :class:`MalformedHelloError` (lengths or fields that do not add
    up, or EOF too early), :class:`NoSNIError`, :class:`InvalidSNIError` or
    :class:`HelloTooLargeError`.
    """

    _errors = ClientHelloError

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if not 1 <= max_size <= HARD_MAX_SIZE:
            raise ValueError(
                f"max_size must be between 1 and {HARD_MAX_SIZE} bytes, not {max_size}"
            )
        super().__init__()
        self._max_size = max_size
        self._pos = 0  # bytes of _buf consumed as record headers or payload
        self._state = _State.SNIFF
        self._records = 0  # record headers read so far
        self._record_left = 0  # payload bytes of the current record not yet consumed
        self._handshake = bytearray()  # the reassembled handshake message, header included
        self._body_length: int | None = None  # from the handshake header, once known

    @property
    def max_size(self) -> int:
        """The cap this reader enforces, in bytes."""
        return self._max_size

    def _advance(self) -> None:
        while self._event is None and self._step():
            pass

    def _truncated(self) -> ClientHelloError:
        return MalformedHelloError(
            f"connection closed after {len(self._buf)} bytes, before the ClientHello was complete"
        )

    # --- the steps; each returns True if it made progress -------------------------------------

    def _step(self) -> bool:
        if self._state is _State.SNIFF:
            return self._step_sniff()
        if self._state is _State.HEADER:
            return self._step_header()
        if self._state is _State.BODY:
            return self._step_body()
        raise AssertionError(f"no step for state {self._state}")  # DONE returns earlier

    def _step_sniff(self) -> bool:
        if not self._buf:
            return False
        if self._buf[0] in _CONTENT_TYPE_NAMES:
            # A TLS record of some type: HEADER refuses all but handshake (22) at once, where
            # waiting for 16 bytes to quote would hold a short alert until the deadline.
            self._state = _State.HEADER
            return True
        # Not a TLS record. Decide on a prefix that depends only on the stream, not on how it
        # was chunked: the first SNIFF_LEN bytes, cut after the first newline.
        prefix = bytes(self._buf[:SNIFF_LEN])
        newline = prefix.find(b"\n")
        if newline >= 0:
            prefix = prefix[: newline + 1]
        elif len(prefix) < SNIFF_LEN and not self._eof:
            return False
        if prefix[0] & 0x80 and len(prefix) >= 3 and prefix[2] == 1:
            # SSLv2 record: 2-byte header with the high bit set, then msg_type 1 (CLIENT-HELLO).
            version = f" (client version 0x{prefix[3:5].hex()})" if len(prefix) >= 5 else ""
            raise SSLv2HelloError(
                f"SSLv2-style ClientHello{version}: this obsolete format cannot carry a server "
                "name; the client must send a TLS ClientHello"
            )
        if _HTTP_REQUEST.match(prefix):
            hint = " (looks like plain HTTP)"
        elif prefix.startswith(b"SSH-"):
            hint = " (looks like SSH)"
        elif prefix.startswith(b"PROXY "):
            hint = " (looks like a PROXY protocol header)"
        else:
            hint = ""
        raise NotTLSError(
            f"not TLS: the connection starts with {prefix!r}{hint}; a TLS client starts with "
            "a handshake record (byte 0x16)"
        )

    def _step_header(self) -> bool:
        # The type and version bytes are judged as soon as each is in, so a short record of
        # the wrong kind is refused at once; until all 5 are in, they are judged again on
        # each call (cheap, and always with the same verdict).
        header = self._buf[self._pos : self._pos + RECORD_HEADER_LEN]
        number = self._records + 1
        if header and header[0] != CONTENT_TYPE_HANDSHAKE:
            raise MalformedHelloError(
                f"TLS record {number} has content type "
                f"{_type_name(_CONTENT_TYPE_NAMES, header[0])} before the ClientHello was "
                "complete; the ClientHello must come first, in handshake records (22)"
            )
        if len(header) >= 2 and header[1] != 3:
            if number == 1:
                raise NotTLSError(
                    "not TLS: the connection starts with a handshake byte (0x16) but the record "
                    f"version is 0x{header[1]:02x}xx, not 0x03xx"
                )
            raise MalformedHelloError(
                f"TLS record {number} has version 0x{header[1]:02x}xx, not 0x03xx"
            )
        if len(header) < RECORD_HEADER_LEN:
            return False
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            raise MalformedHelloError(
                f"TLS record {number} is empty; RFC 8446 forbids empty handshake records"
            )
        if length > MAX_RECORD_LENGTH:
            raise MalformedHelloError(
                f"TLS record {number} claims {length} bytes, more than the "
                f"{MAX_RECORD_LENGTH} a TLS record may hold"
            )
        end = self._pos + RECORD_HEADER_LEN + length
        if end > self._max_size:
            raise HelloTooLargeError(
                f"ClientHello larger than the {self._max_size}-byte limit: TLS record {number} "
                f"would end at byte {end}"
            )
        self._records = number
        self._record_left = length
        self._pos += RECORD_HEADER_LEN
        self._state = _State.BODY
        return True

    def _step_body(self) -> bool:
        available = min(len(self._buf) - self._pos, self._record_left)
        if available == 0:
            return False
        # Take no more than the handshake header first, so that it is checked (type, size) at
        # the same point in the stream however the bytes were chunked; then no more than the
        # message, so that bytes after it in the record are not mistaken for part of it.
        if self._body_length is None:
            available = min(available, HANDSHAKE_HEADER_LEN - len(self._handshake))
        else:
            wanted = HANDSHAKE_HEADER_LEN + self._body_length - len(self._handshake)
            available = min(available, wanted)
        self._handshake += self._buf[self._pos : self._pos + available]
        self._pos += available
        self._record_left -= available
        if self._body_length is None:
            self._check_handshake_type()  # its first byte is in: no need to wait for the length
            if len(self._handshake) < HANDSHAKE_HEADER_LEN:
                return self._end_of_record()
            self._body_length = self._check_handshake_length()
        if len(self._handshake) < HANDSHAKE_HEADER_LEN + self._body_length:
            return self._end_of_record()
        if self._record_left:
            raise MalformedHelloError(
                f"{self._record_left} bytes of handshake data follow the ClientHello in TLS "
                f"record {self._records}; a client must wait for the server's reply"
            )
        self._event = self._parse()
        self._state = _State.DONE
        return True

    def _end_of_record(self) -> bool:
        if self._record_left == 0:
            self._state = _State.HEADER
        return True

    def _check_handshake_type(self) -> None:
        msg_type = self._handshake[0]
        if msg_type != HANDSHAKE_CLIENT_HELLO:
            raise MalformedHelloError(
                f"the first handshake message has type "
                f"{_type_name(_HANDSHAKE_TYPE_NAMES, msg_type)}, expected 1 (client_hello)"
            )

    def _check_handshake_length(self) -> int:
        body_length = int.from_bytes(self._handshake[1:4], "big")
        # The fewest bytes the hello can take: one record header plus the whole message.
        least = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + body_length
        if least > self._max_size:
            raise HelloTooLargeError(
                f"ClientHello larger than the {self._max_size}-byte limit: its handshake header "
                f"announces a {body_length}-byte body"
            )
        return body_length

    def _parse(self) -> ClientHello:
        try:
            return _parse_client_hello(
                bytes(self._handshake[HANDSHAKE_HEADER_LEN:]),
                raw=bytes(self._buf[: self._pos]),
                record_count=self._records,
            )
        except DecodeError as exc:
            raise MalformedHelloError(f"malformed ClientHello: {exc}") from None


def parse_client_hello_message(message: bytes | bytearray) -> ClientHello:
    """Parse one complete handshake message (type, 3-byte length, body) that should be a
    ClientHello, for transports with no TLS record layer (QUIC carries the message in CRYPTO
    frames, RFC 9001 section 4.1). ``raw`` is the message and ``record_count`` is 0.

    Raises:
        MalformedHelloError: not a ClientHello, its length does not match, or a field is bad.
        NoSNIError, InvalidSNIError: as :class:`ClientHelloReader`.
    """
    message = bytes(message)
    if len(message) < HANDSHAKE_HEADER_LEN or message[0] != HANDSHAKE_CLIENT_HELLO:
        kind = _type_name(_HANDSHAKE_TYPE_NAMES, message[0]) if message else "nothing"
        raise MalformedHelloError(f"the handshake message is {kind}, not a client_hello")
    body_length = int.from_bytes(message[1:HANDSHAKE_HEADER_LEN], "big")
    if body_length != len(message) - HANDSHAKE_HEADER_LEN:
        raise MalformedHelloError(
            f"the client_hello announces {body_length} bytes of body but carries "
            f"{len(message) - HANDSHAKE_HEADER_LEN}"
        )
    try:
        return _parse_client_hello(message[HANDSHAKE_HEADER_LEN:], raw=message, record_count=0)
    except DecodeError as exc:
        raise MalformedHelloError(f"malformed ClientHello: {exc}") from None


_NO_SNI_EXTENSION: Final = (
    "the ClientHello has no server_name (SNI) extension; this proxy routes by server name, so "
    "the client must send one (clients leave it out when they connect to an IP address)"
)


#: The extensions whose bodies the parser reads; the others are only framed.
_READ_EXTENSIONS: Final = frozenset({EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS})


def _parse_client_hello(body: bytes, *, raw: bytes, record_count: int) -> ClientHello:
    """Walk a ClientHello body (RFC 8446 4.1.2) and build the event.

    Framing is checked completely before the server name is judged, so a hello with both a bad
    extension and a bad name is reported as malformed, whatever order its extensions are in.
    Offsets in errors count from the start of the handshake message (its type byte).
    """
    cursor = Cursor(body, base=HANDSHAKE_HEADER_LEN)
    start = cursor.offset
    legacy_version = cursor.u16("legacy_version")
    if legacy_version >> 8 != 3:
        raise DecodeError(f"legacy_version 0x{legacy_version:04x} is not 0x03xx", start)
    cursor.raw(32, "random")
    cursor.vector(1, "legacy_session_id", max_len=32)
    start = cursor.offset
    suites = cursor.vector(2, "cipher_suites", min_len=2, max_len=0xFFFE)
    if suites.remaining % 2:
        raise DecodeError(f"cipher_suites length {suites.remaining} is odd", start)
    cursor.vector(1, "legacy_compression_methods", min_len=1)
    if cursor.at_end():
        # A TLS 1.2-era hello may omit the extensions block entirely: valid, but no SNI.
        raise NoSNIError(_NO_SNI_EXTENSION)
    extensions = cursor.vector(2, "extensions")
    cursor.expect_end("the ClientHello")

    seen: set[int] = set()
    host_name: bytes | None = None
    has_sni_extension = False
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    while not extensions.at_end():
        start = extensions.offset
        ext_type, data = extensions.extension(_extension_name, _READ_EXTENSIONS)
        if ext_type in seen:
            raise DecodeError(f"extension {_extension_name(ext_type)} appears twice", start)
        seen.add(ext_type)
        if data is None:
            continue
        if ext_type == EXT_SERVER_NAME:
            has_sni_extension = True
            host_name = _parse_server_name(data)
        elif ext_type == EXT_ALPN:
            alpn = _parse_alpn(data)
        else:
            versions = _parse_supported_versions(data)

    if not has_sni_extension:
        raise NoSNIError(_NO_SNI_EXTENSION)
    if host_name is None:
        raise NoSNIError(
            "the ClientHello's server_name extension has no host_name entry; this proxy routes "
            "by host name"
        )
    return ClientHello(
        server_name=normalize_sni(host_name),
        alpn=alpn,
        supported_versions=versions,
        legacy_version=legacy_version,
        has_ech=EXT_ENCRYPTED_CLIENT_HELLO in seen,
        raw=raw,
        record_count=record_count,
    )


def _parse_server_name(data: Cursor) -> bytes | None:
    """RFC 6066 section 3: a list of (name_type, name); at most one host_name."""
    names = data.vector(2, "server_name_list", min_len=1)
    data.expect_end("the server_name extension")
    host_name: bytes | None = None
    while not names.at_end():
        start = names.offset
        name_type = names.u8("server name type")
        # Only host_name (0) is defined; like other stacks, read any type as a 2-byte vector.
        name = names.vector(2, "server name")
        if name_type == NAME_TYPE_HOST_NAME:
            if host_name is not None:
                raise DecodeError("server_name_list has more than one host_name", start)
            host_name = bytes(name.raw(name.remaining, "server name"))
    return host_name


def _parse_alpn(data: Cursor) -> tuple[str, ...]:
    """RFC 7301 section 3.1: a non-empty list of non-empty protocol ids."""
    names = data.vector(2, "ALPN protocol_name_list", min_len=2)
    data.expect_end("the application_layer_protocol_negotiation extension")
    protocols = []
    while not names.at_end():
        protocol = names.vector(1, "ALPN protocol name", min_len=1)
        name = bytes(protocol.raw(protocol.remaining, "ALPN protocol name")).decode(
            "ascii", "backslashreplace"
        )
        protocols.append(_COMMON_ALPN.get(name, name))
    return tuple(protocols)


#: The ALPN names nearly every client sends, as one shared string each: a connection keeps its
#: ALPN list as long as it lives (the access log's ``alpn``).
_COMMON_ALPN = {name: name for name in ("h2", "http/1.1", "http/1.0", "h3", "acme-tls/1")}


def _parse_supported_versions(data: Cursor) -> tuple[int, ...]:
    """RFC 8446 section 4.2.1, ClientHello form: a list of 2-byte versions."""
    start = data.offset
    versions = data.vector(1, "supported_versions list", min_len=2, max_len=254)
    if versions.remaining % 2:
        raise DecodeError(f"supported_versions list length {versions.remaining} is odd", start)
    data.expect_end("the supported_versions extension")
    return tuple(versions.u16("version") for _ in range(versions.remaining // 2))
