"""ClientHelloReader against real captures and hand-built malformed input.

Every capture in ``tests/data/hellos/`` is parsed whole, byte by byte, split at every byte and
every record boundary, and re-framed into many small records; all must give the same result as
the capture's sidecar (written by ``capture.py`` with its own decoder). Error messages are
asserted exactly, because operators read them in the access log.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from trio_sni.sansio.clienthello import (
    DEFAULT_MAX_SIZE,
    HARD_MAX_SIZE,
    NEED_DATA,
    ClientHello,
    ClientHelloReader,
)
from trio_sni.sansio.errors import (
    ClientHelloError,
    HelloTooLargeError,
    InvalidSNIError,
    MalformedHelloError,
    NoSNIError,
    NotTLSError,
    SSLv2HelloError,
)

HELLOS = Path(__file__).resolve().parent.parent / "data" / "hellos"
SIDECARS = sorted(HELLOS.glob("*.json"))
CAPTURES = [p.stem for p in SIDECARS]
GOOD = [p.stem for p in SIDECARS if json.loads(p.read_text())["expected_error"] is None]

# The outcome of feeding a reader, comparable with ==: the event and trailing bytes, the error
# type and message, or NEED_DATA.
Outcome = tuple[Any, ...]


def feed(
    chunks: Iterable[bytes], *, eof: bool = False, max_size: int = DEFAULT_MAX_SIZE
) -> Outcome:
    """Feed chunks the way the proxy does (next_event after each) and report the outcome."""
    reader = ClientHelloReader(max_size)
    event: ClientHello | None = None
    try:
        for chunk in chunks:
            if not chunk:
                continue  # b"" means EOF to the reader; a socket never returns it otherwise
            reader.receive_data(chunk)
            if event is None:
                result = reader.next_event()
                if result is not NEED_DATA:
                    event = result
        if eof:
            reader.receive_data(b"")
        if event is None:
            result = reader.next_event()
            if result is NEED_DATA:
                return ("need_data",)
            event = result
    except ClientHelloError as exc:
        return ("error", type(exc), str(exc))
    return ("hello", event, reader.trailing_data)


def whole(data: bytes, **kwargs: Any) -> Outcome:
    return feed([data], **kwargs)


def bytewise(data: bytes, **kwargs: Any) -> Outcome:
    return feed([data[i : i + 1] for i in range(len(data))], **kwargs)


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    return (HELLOS / f"{name}.bin").read_bytes(), json.loads((HELLOS / f"{name}.json").read_text())


def handshake_and_boundaries(raw: bytes) -> tuple[bytes, list[int]]:
    """The handshake message in ``raw``'s records, and the offsets where records end."""
    pos = 0
    message = b""
    ends = []
    while pos < len(raw):
        (length,) = struct.unpack("!H", raw[pos + 3 : pos + 5])
        message += raw[pos + 5 : pos + 5 + length]
        pos += 5 + length
        ends.append(pos)
    return message, ends


def frame(message: bytes, size: int, *, version: bytes = b"\x03\x01") -> bytes:
    """Re-frame a handshake message into records of ``size`` payload bytes."""
    return b"".join(
        b"\x16" + version + struct.pack("!H", len(message[i : i + size])) + message[i : i + size]
        for i in range(0, len(message), size)
    )


def fields(event: ClientHello) -> tuple[Any, ...]:
    """Everything but the framing, which re-framing changes."""
    return (
        event.server_name,
        event.alpn,
        event.supported_versions,
        event.legacy_version,
        event.has_ech,
    )


# --- a builder for hand-made hellos -------------------------------------------------------------
#
# Layout of build_hello() with the defaults, as offsets in the handshake message (which error
# messages use): 0 type, 1-3 length, 4-5 legacy_version, 6-37 random, 38 session id length (0),
# 39-40 cipher suites length, 41-42 one suite, 43 compression length, 44 null method,
# 45-46 extensions length, 47 first extension type, 49 its length, 51 its data.

FIRST_EXT = 47


def vec(width: int, data: bytes) -> bytes:
    return len(data).to_bytes(width, "big") + data


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!H", ext_type) + vec(2, data)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


def alpn_ext(*protocols: bytes) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, p) for p in protocols)))


def build_hello(
    *extensions: bytes,
    legacy_version: int = 0x0303,
    suites: bytes = b"\x13\x01",
    with_extensions: bool = True,
) -> bytes:
    """A handshake message (header included) with the given raw extensions."""
    body = (
        struct.pack("!H", legacy_version)
        + bytes(range(32))
        + vec(1, b"")
        + vec(2, suites)
        + vec(1, b"\x00")
    )
    if with_extensions:
        body += vec(2, b"".join(extensions))
    return b"\x01" + vec(3, body)


def record(message: bytes, content_type: int = 22, version: int = 0x0301) -> bytes:
    return struct.pack("!BHH", content_type, version, len(message)) + message


def hello_record(*extensions: bytes, **kwargs: Any) -> bytes:
    return record(build_hello(*extensions, **kwargs))


def expect_error(data: bytes, error: type[ClientHelloError], message: str, **kwargs: Any) -> None:
    """Assert the error, whole and byte by byte."""
    assert whole(data, **kwargs) == ("error", error, message)
    assert bytewise(data, **kwargs) == ("error", error, message)


# --- real captures ------------------------------------------------------------------------------


def test_fixtures_are_present() -> None:
    # The captures the issue asks for; a rerun of capture.py that lost one must fail here.
    assert set(CAPTURES) >= {
        "curl",
        "curl-fragmented",
        "gnutls",
        "openssl-ffdhe8192-large",
        "openssl-nosni",
        "openssl-tls12",
        "openssl-tls13",
        "python-ssl",
        "synthetic-pq-ech",
    }


@pytest.mark.parametrize("name", GOOD)
def test_capture_matches_sidecar(name: str) -> None:
    raw, meta = load(name)
    kind, event, trailing = whole(raw)
    assert kind == "hello"
    assert event.server_name == meta["server_name"]
    assert event.alpn == tuple(meta["alpn"])
    assert event.supported_versions == tuple(meta["supported_versions"])
    assert event.legacy_version == meta["legacy_version"]
    assert event.has_ech == meta["has_ech"]
    assert event.raw == raw
    assert event.size == meta["size"] == len(raw)
    assert event.record_count == meta["record_count"]
    assert trailing == b""


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_byte_by_byte_equals_whole(name: str) -> None:
    raw, _ = load(name)
    assert bytewise(raw) == whole(raw)
    assert bytewise(raw, eof=True) == whole(raw, eof=True) == whole(raw)


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_split_anywhere_equals_whole(name: str) -> None:
    raw, _ = load(name)
    expected = whole(raw)
    for cut in range(1, len(raw)):
        assert feed([raw[:cut], raw[cut:]]) == expected, cut


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_split_at_record_boundaries(name: str) -> None:
    raw, _ = load(name)
    expected = whole(raw)
    _, ends = handshake_and_boundaries(raw)
    starts = [0, *ends[:-1]]
    assert feed([raw[a:b] for a, b in zip(starts, ends, strict=True)]) == expected
    for end in ends:
        assert feed([raw[:end], raw[end:]]) == expected


@pytest.mark.parametrize("name", CAPTURES)
@pytest.mark.parametrize("size", range(1, 65))
def test_capture_reframed_into_small_records(name: str, size: int) -> None:
    raw, meta = load(name)
    message, _ = handshake_and_boundaries(raw)
    reframed = frame(message, size, version=raw[1:3])
    outcome = whole(reframed)
    assert bytewise(reframed) == outcome
    if meta["expected_error"] is not None:
        assert outcome[:2] == ("error", NoSNIError)
        return
    kind, event, trailing = outcome
    assert kind == "hello"
    assert fields(event) == fields(whole(raw)[1])
    assert event.raw == reframed
    assert event.record_count == -(-len(message) // size)
    assert trailing == b""


def test_curl_fragmented_is_curl_in_four_records() -> None:
    curl = whole(load("curl")[0])[1]
    fragmented = whole(load("curl-fragmented")[0])[1]
    assert fields(fragmented) == fields(curl)
    assert (fragmented.record_count, curl.record_count) == (4, 1)


def test_large_hello_is_pq_sized() -> None:
    # Browsers' post-quantum hellos are ~1.8-2 KB; ours must exercise that size.
    for name in ("openssl-ffdhe8192-large", "synthetic-pq-ech"):
        assert 1700 <= load(name)[1]["size"] <= 2100


def test_synthetic_hello_has_ech() -> None:
    event = whole(load("synthetic-pq-ech")[0])[1]
    assert event.has_ech
    assert event.server_name == "pq-ech.example.test"


@pytest.mark.parametrize("name", GOOD)
def test_trailing_data_is_kept(name: str) -> None:
    raw, _ = load(name)
    change_cipher_spec = record(b"\x01", content_type=20, version=0x0303)
    early_data = record(b"0-RTT application data", content_type=23, version=0x0303)
    trailer = change_cipher_spec + early_data
    for outcome in (whole(raw + trailer), bytewise(raw + trailer), whole(raw + trailer, eof=True)):
        kind, event, trailing = outcome
        assert kind == "hello"
        assert event.raw == raw
        assert trailing == trailer


def test_data_fed_after_the_hello_is_trailing() -> None:
    raw, _ = load("curl")
    assert feed([raw[:-1], raw[-1:] + b"ab", b"cd", b"ef"])[2] == b"abcdef"


def test_capture_without_sni() -> None:
    expect_error(
        load("openssl-nosni")[0],
        NoSNIError,
        "the ClientHello has no server_name (SNI) extension; this proxy routes by server name, "
        "so the client must send one (clients leave it out when they connect to an IP address)",
    )


# --- the reader's API ---------------------------------------------------------------------------


def test_need_data_until_complete() -> None:
    raw, _ = load("curl")
    reader = ClientHelloReader()
    assert reader.next_event() is NEED_DATA
    reader.receive_data(raw[:-1])
    assert reader.next_event() is NEED_DATA
    assert reader.trailing_data == b""
    reader.receive_data(raw[-1:])
    event = reader.next_event()
    assert isinstance(event, ClientHello)
    assert reader.next_event() is event  # idempotent once done
    assert reader.bytes_received == len(raw)


def test_error_is_raised_again() -> None:
    reader = ClientHelloReader()
    reader.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(NotTLSError) as first:
        reader.next_event()
    with pytest.raises(NotTLSError) as second:
        reader.next_event()
    assert second.value is first.value


def test_data_after_eof_is_a_caller_bug() -> None:
    reader = ClientHelloReader()
    reader.receive_data(b"")
    with pytest.raises(RuntimeError, match="received data after EOF"):
        reader.receive_data(b"\x16")


@pytest.mark.parametrize("max_size", [0, -1, HARD_MAX_SIZE + 1])
def test_max_size_bounds(max_size: int) -> None:
    with pytest.raises(
        ValueError, match=f"^max_size must be between 1 and 65536 bytes, not {max_size}$"
    ):
        ClientHelloReader(max_size)


def test_max_size_defaults() -> None:
    assert ClientHelloReader().max_size == DEFAULT_MAX_SIZE == 16384
    assert ClientHelloReader(HARD_MAX_SIZE).max_size == 65536


def test_event_repr_leaves_out_raw_bytes() -> None:
    event = whole(load("curl")[0])[1]
    assert "raw" not in repr(event)
    assert "x.test" in repr(event)


# --- not TLS at all -----------------------------------------------------------------------------

NOT_TLS_TAIL = "; a TLS client starts with a handshake record (byte 0x16)"


def test_http_request() -> None:
    expect_error(
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        NotTLSError,
        "not TLS: the connection starts with b'GET / HTTP/1.1\\r\\n' (looks like plain HTTP)"
        + NOT_TLS_TAIL,
    )


def test_short_http_request_is_judged_at_its_newline() -> None:
    # No need to wait for 16 bytes (or the deadline) once a line has arrived.
    assert feed([b"GET /\r\n"]) == (
        "error",
        NotTLSError,
        "not TLS: the connection starts with b'GET /\\r\\n' (looks like plain HTTP)" + NOT_TLS_TAIL,
    )


def test_ssh_banner() -> None:
    expect_error(
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n",
        NotTLSError,
        "not TLS: the connection starts with b'SSH-2.0-OpenSSH_' (looks like SSH)" + NOT_TLS_TAIL,
    )


def test_proxy_protocol_header() -> None:
    expect_error(
        b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 443\r\n",
        NotTLSError,
        "not TLS: the connection starts with b'PROXY TCP4 192.0' (looks like a PROXY protocol "
        "header)" + NOT_TLS_TAIL,
    )


def test_random_bytes() -> None:
    data = bytes.fromhex("5a8e3c1fd20b7744a9e6015bc3f08d62e1")
    expect_error(
        data,
        NotTLSError,
        "not TLS: the connection starts with b'Z\\x8e<\\x1f\\xd2\\x0bwD\\xa9\\xe6\\x01[\\xc3\\xf0"
        "\\x8db'" + NOT_TLS_TAIL,
    )


def test_short_garbage_waits_for_more_then_fails_at_eof() -> None:
    assert whole(b"hi") == ("need_data",)
    expect_error(
        b"hi", NotTLSError, "not TLS: the connection starts with b'hi'" + NOT_TLS_TAIL, eof=True
    )


def test_handshake_byte_with_wrong_version() -> None:
    error = (
        "not TLS: the connection starts with a handshake byte (0x16) but the record version is "
        "0x01xx, not 0x03xx"
    )
    expect_error(b"\x16\x01\x00\x00\x10", NotTLSError, error)
    assert feed([b"\x16\x01"]) == ("error", NotTLSError, error)  # its second byte decides


def test_sslv2_hello() -> None:
    # An SSLv2-compatible ClientHello as old clients sent it: 2-byte header 0x802e, type 1,
    # version 3.1, cipher spec/session id/challenge lengths, 3-byte cipher specs, challenge.
    ciphers = bytes.fromhex("00002f000035000005")
    challenge = bytes(range(16))
    body = b"\x01\x03\x01" + struct.pack("!HHH", len(ciphers), 0, len(challenge))
    body += ciphers + challenge
    data = struct.pack("!H", 0x8000 | len(body)) + body
    expect_error(
        data,
        SSLv2HelloError,
        "SSLv2-style ClientHello (client version 0x0301): this obsolete format cannot carry a "
        "server name; the client must send a TLS ClientHello",
    )


# --- record layer -------------------------------------------------------------------------------


def test_empty_record() -> None:
    expect_error(
        b"\x16\x03\x01\x00\x00",
        MalformedHelloError,
        "TLS record 1 is empty; RFC 8446 forbids empty handshake records",
    )


def test_oversized_record() -> None:
    expect_error(
        b"\x16\x03\x01\x41\x01",
        MalformedHelloError,
        "TLS record 1 claims 16641 bytes, more than the 16640 a TLS record may hold",
    )


def test_non_handshake_record_before_hello_is_complete() -> None:
    message = build_hello(sni_ext(b"a.test"))
    data = record(message[:10]) + record(message[10:], content_type=23)
    error = (
        "TLS record 2 has content type 23 (application_data) before the ClientHello was "
        "complete; the ClientHello must come first, in handshake records (22)"
    )
    expect_error(data, MalformedHelloError, error)
    assert feed([data[:16]]) == ("error", MalformedHelloError, error)  # its type byte decides


#: What a peer may send first and then wait for an answer: a fatal handshake_failure alert
#: (7 bytes) and an application-data record of 5 bytes (10).
SHORT_RECORDS = {
    "alert": (b"\x15\x03\x03\x00\x02\x02\x28", "21 (alert)"),
    "application_data": (b"\x17\x03\x03\x00\x05hello", "23 (application_data)"),
}


@pytest.mark.parametrize("kind", SHORT_RECORDS)
def test_short_non_handshake_first_record_is_refused_at_once(kind: str) -> None:
    # Not at 16 bytes or EOF: a peer that sent only this waits, and would hold the connection
    # until the hello deadline.
    data, content_type = SHORT_RECORDS[kind]
    error = (
        "error",
        MalformedHelloError,
        f"TLS record 1 has content type {content_type} before the ClientHello was complete; "
        "the ClientHello must come first, in handshake records (22)",
    )
    assert whole(data) == error
    assert bytewise(data) == error
    assert feed([data[:1]]) == error  # its first byte decides


def test_later_record_with_wrong_version() -> None:
    message = build_hello(sni_ext(b"a.test"))
    data = record(message[:10]) + record(message[10:], version=0x0203)
    error = "TLS record 2 has version 0x02xx, not 0x03xx"
    expect_error(data, MalformedHelloError, error)
    assert feed([data[:17]]) == ("error", MalformedHelloError, error)  # its second byte decides


def test_handshake_message_is_not_a_client_hello() -> None:
    expect_error(
        record(b"\x02\x00\x00\x04\x03\x03\x00\x00"),
        MalformedHelloError,
        "the first handshake message has type 2 (server_hello), expected 1 (client_hello)",
    )


def test_handshake_type_is_checked_as_soon_as_its_byte_is_in() -> None:
    # Type 99 is unknown; the error comes with that byte, not with the length or at EOF.
    assert feed([b"\x16\x03\x01\x01\x00\x63"]) == (
        "error",
        MalformedHelloError,
        "the first handshake message has type 99, expected 1 (client_hello)",
    )


def test_handshake_data_after_the_hello_in_the_same_record() -> None:
    message = build_hello(sni_ext(b"a.test"))
    expect_error(
        record(message + b"\x14\x00\x00\x00"),
        MalformedHelloError,
        "4 bytes of handshake data follow the ClientHello in TLS record 1; a client must wait "
        "for the server's reply",
    )


def test_handshake_length_longer_than_its_records_then_eof() -> None:
    # A lying handshake length: the records end, the client closes.
    message = build_hello(sni_ext(b"a.test"))
    lying = message[:1] + (len(message) + 96).to_bytes(3, "big") + message[4:]
    data = record(lying)
    expect_error(
        data,
        MalformedHelloError,
        f"connection closed after {len(data)} bytes, before the ClientHello was complete",
        eof=True,
    )


def test_eof_mid_hello() -> None:
    raw, _ = load("curl")
    expect_error(
        raw[:100],
        MalformedHelloError,
        "connection closed after 100 bytes, before the ClientHello was complete",
        eof=True,
    )


def test_eof_before_anything() -> None:
    expect_error(
        b"",
        MalformedHelloError,
        "connection closed after 0 bytes, before the ClientHello was complete",
        eof=True,
    )


# --- size cap -----------------------------------------------------------------------------------


def test_record_past_the_cap() -> None:
    expect_error(
        b"\x16\x03\x01\x40\x00",
        HelloTooLargeError,
        "ClientHello larger than the 16384-byte limit: TLS record 1 would end at byte 16389",
    )


def test_cap_counts_record_headers() -> None:
    raw, _ = load("curl")
    message, _ = handshake_and_boundaries(raw)
    reframed = frame(message, 64)  # 8 records of 69 bytes: 552 bytes in all
    assert len(reframed) == 552
    assert whole(reframed, max_size=552)[0] == "hello"
    expect_error(
        reframed,
        HelloTooLargeError,
        "ClientHello larger than the 551-byte limit: TLS record 8 would end at byte 552",
        max_size=551,
    )


def test_cap_by_announced_handshake_length() -> None:
    raw, _ = load("curl-fragmented")
    message, _ = handshake_and_boundaries(raw)
    body_length = len(message) - 4
    expect_error(
        raw,
        HelloTooLargeError,
        f"ClientHello larger than the {len(message) + 4}-byte limit: its handshake header "
        f"announces a {body_length}-byte body",
        max_size=len(message) + 4,
    )


def test_many_tiny_records_hit_the_cap() -> None:
    # 1-byte fragments cost 6 bytes each: a 16 KiB cap stops such a client at the 2731st record.
    message = build_hello(sni_ext(b"a.test"), ext(0x1234, bytes(4000)))
    expect_error(
        frame(message, 1),
        HelloTooLargeError,
        "ClientHello larger than the 16384-byte limit: TLS record 2731 would end at byte 16386",
    )


# --- ClientHello body ---------------------------------------------------------------------------


def test_built_hello_parses() -> None:
    data = hello_record(
        sni_ext(b"WWW.Example.COM."),
        alpn_ext(b"h2", b"http/1.1"),
        ext(43, vec(1, b"\x03\x04\x03\x03")),
        ext(0xFE0D, b"\x00"),
    )
    kind, event, _ = whole(data)
    assert kind == "hello"
    assert event.server_name == "www.example.com"
    assert event.alpn == ("h2", "http/1.1")
    assert event.supported_versions == (0x0304, 0x0303)
    assert event.has_ech
    assert event.record_count == 1


def test_non_ascii_alpn_is_escaped() -> None:
    _, event, _ = whole(hello_record(sni_ext(b"a.test"), alpn_ext(b"h\xff")))
    assert event.alpn == ("h\\xff",)


def test_extension_length_overruns() -> None:
    data = hello_record(struct.pack("!HH", 0, 500) + b"\x00\x03")
    expect_error(
        data,
        MalformedHelloError,
        "malformed ClientHello: extension server_name length 500 overruns its container "
        f"(2 bytes left) (at offset {FIRST_EXT + 2})",
    )


def test_extensions_block_length_overruns() -> None:
    message = bytearray(build_hello(sni_ext(b"a.test")))
    message[45:47] = (len(message) - 47 + 1).to_bytes(2, "big")
    expect_error(
        record(bytes(message)),
        MalformedHelloError,
        "malformed ClientHello: extensions length 16 overruns its container (15 bytes left) "
        "(at offset 45)",
    )


def test_duplicate_server_name() -> None:
    first = sni_ext(b"a.test")
    expect_error(
        hello_record(first, sni_ext(b"b.test")),
        MalformedHelloError,
        "malformed ClientHello: extension server_name appears twice "
        f"(at offset {FIRST_EXT + len(first)})",
    )


def test_duplicate_unknown_extension() -> None:
    expect_error(
        hello_record(sni_ext(b"a.test"), ext(0x1234, b""), ext(0x1234, b"")),
        MalformedHelloError,
        "malformed ClientHello: extension 0x1234 appears twice (at offset 66)",
    )


def test_two_host_names() -> None:
    expect_error(
        hello_record(sni_ext(b"a.test", b"b.test")),
        MalformedHelloError,
        "malformed ClientHello: server_name_list has more than one host_name (at offset 62)",
    )


def test_server_name_list_without_host_name() -> None:
    expect_error(
        hello_record(sni_ext(b"a.test", name_type=7)),
        NoSNIError,
        "the ClientHello's server_name extension has no host_name entry; this proxy routes by "
        "host name",
    )


def test_empty_server_name_extension() -> None:
    expect_error(
        hello_record(ext(0, b"")),
        MalformedHelloError,
        "malformed ClientHello: server_name_list length is truncated: needs 2 bytes, 0 left "
        "(at offset 51)",
    )


def test_empty_server_name_list() -> None:
    expect_error(
        hello_record(ext(0, b"\x00\x00")),
        MalformedHelloError,
        "malformed ClientHello: server_name_list length 0 is outside 1..65535 (at offset 51)",
    )


def test_junk_after_server_name_list() -> None:
    expect_error(
        hello_record(ext(0, vec(2, b"\x00" + vec(2, b"a.test")) + b"xyz")),
        MalformedHelloError,
        "malformed ClientHello: 3 unexpected bytes at the end of the server_name extension "
        "(at offset 62)",
    )


def test_empty_alpn_list() -> None:
    expect_error(
        hello_record(sni_ext(b"a.test"), ext(16, b"\x00\x00")),
        MalformedHelloError,
        "malformed ClientHello: ALPN protocol_name_list length 0 is outside 2..65535 "
        "(at offset 66)",
    )


def test_empty_alpn_protocol() -> None:
    expect_error(
        hello_record(sni_ext(b"a.test"), ext(16, vec(2, b"\x00\x02h2"))),
        MalformedHelloError,
        "malformed ClientHello: ALPN protocol name length 0 is outside 1..255 (at offset 68)",
    )


def test_odd_supported_versions() -> None:
    expect_error(
        hello_record(sni_ext(b"a.test"), ext(43, vec(1, b"\x03\x04\x03"))),
        MalformedHelloError,
        "malformed ClientHello: supported_versions list length 3 is odd (at offset 66)",
    )


def test_odd_cipher_suites() -> None:
    expect_error(
        hello_record(sni_ext(b"a.test"), suites=b"\x13\x01\x13"),
        MalformedHelloError,
        "malformed ClientHello: cipher_suites length 3 is odd (at offset 39)",
    )


def test_bad_legacy_version() -> None:
    expect_error(
        hello_record(sni_ext(b"a.test"), legacy_version=0x0200),
        MalformedHelloError,
        "malformed ClientHello: legacy_version 0x0200 is not 0x03xx (at offset 4)",
    )


def test_empty_handshake_body() -> None:
    expect_error(
        record(b"\x01\x00\x00\x00"),
        MalformedHelloError,
        "malformed ClientHello: legacy_version is truncated: needs 2 bytes, 0 left (at offset 4)",
    )


def test_junk_after_extensions() -> None:
    message = build_hello(sni_ext(b"a.test"))
    message = message[:1] + (len(message) - 4 + 2).to_bytes(3, "big") + message[4:] + b"zz"
    expect_error(
        record(message),
        MalformedHelloError,
        "malformed ClientHello: 2 unexpected bytes at the end of the ClientHello (at offset 62)",
    )


def test_hello_without_extensions() -> None:
    expect_error(
        hello_record(with_extensions=False),
        NoSNIError,
        "the ClientHello has no server_name (SNI) extension; this proxy routes by server name, "
        "so the client must send one (clients leave it out when they connect to an IP address)",
    )


def test_framing_errors_win_over_name_errors() -> None:
    # A bad name first, a broken extension after it: the hello is malformed, whatever the order.
    expect_error(
        hello_record(sni_ext(b"1.2.3.4"), ext(43, vec(1, b"\x03"))),
        MalformedHelloError,
        "malformed ClientHello: supported_versions list length 1 is outside 2..254 (at offset 67)",
    )


# --- the server name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (b"example.com", "example.com"),
        (b"Example.COM", "example.com"),
        (b"example.com.", "example.com"),
        (b"WWW.EXAMPLE.COM.", "www.example.com"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_server_name_is_normalised(sent: bytes, expected: str) -> None:
    kind, event, _ = whole(hello_record(sni_ext(sent)))
    assert (kind, event.server_name) == ("hello", expected)


IP_LITERAL = "IP address literals are not allowed as server names (RFC 6066)"
NOT_LDH = "only letters, digits and hyphens are allowed"


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (b"127.0.0.1", "'127.0.0.1': " + IP_LITERAL),
        (b"[::1]", "'[::1]': " + IP_LITERAL),
        (b"::ffff:10.0.0.1", "'::ffff:10.0.0.1': " + IP_LITERAL),
        (b"127.1", "'127.1': " + IP_LITERAL),
        (b"a_b.example", "'a_b.example': label 'a_b' contains '_'; " + NOT_LDH),
        (b"example.com..", "'example.com..': label 3 is empty"),
        (b"", "'': the name is empty"),
        (b"-bad.example", "'-bad.example': label '-bad' starts or ends with a hyphen"),
        (
            b"xn--zz.example",
            "'xn--zz.example': label 'xn--zz' is not a valid IDNA A-label: its Punycode does "
            "not decode",
        ),
        (
            b"b\xc3\xbccher.example",
            "b'b\\xc3\\xbccher.example': it contains non-ASCII bytes; clients must send IDNA "
            "A-labels (xn--...)",
        ),
        (b"a\x00.example", "'a\\x00.example': label 'a\\x00' contains '\\x00'; " + NOT_LDH),
    ],
)
def test_invalid_server_name(sent: bytes, message: str) -> None:
    expect_error(hello_record(sni_ext(sent)), InvalidSNIError, "invalid server name " + message)
