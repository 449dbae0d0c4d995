"""PROXY protocol headers: exact bytes out, and the reader on exact bytes in.

The expected bytes are written out by hand from the specification (haproxy's
doc/proxy-protocol.txt, sections 2.1 and 2.2), not produced by the encoder under test. Every
reader input is fed whole and byte by byte, and both must agree (house rule 2).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import pytest

from trio_sni.sansio.proxy_protocol import (
    NEED_DATA,
    V2_SIGNATURE,
    BadProxyHeaderError,
    MissingProxyHeaderError,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    encode_header,
    encode_v1,
    encode_v2,
)

ip = ipaddress.ip_address
SRC4, DST4 = (ip("192.0.2.10"), 56324), (ip("198.51.100.2"), 443)
SRC6, DST6 = (ip("2001:db8::10"), 40000), (ip("2001:db8::2"), 8443)
V2_TCP4 = (
    b"\r\n\r\n\x00\r\nQUIT\n"  # signature
    b"\x21"  # version 2, command PROXY
    b"\x11"  # AF_INET, STREAM
    b"\x00\x0c"  # 12 bytes of addresses
    b"\xc0\x00\x02\x0a"
    b"\xc6\x33\x64\x02"  # 192.0.2.10, 198.51.100.2
    b"\xdc\x04"
    b"\x01\xbb"  # 56324, 443
)
V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def read(chunks: Iterable[bytes], *, eof: bool = False) -> tuple[Any, ...]:
    reader = ProxyHeaderReader()
    event: Any = NEED_DATA
    try:
        for chunk in chunks:
            if not chunk:
                continue  # b"" means EOF to the reader; a socket never returns it otherwise
            reader.receive_data(chunk)
            if event is NEED_DATA:
                event = reader.next_event()
        if eof and event is NEED_DATA:
            reader.receive_data(b"")
            event = reader.next_event()
    except ProxyHeaderError as exc:
        return ("error", type(exc), exc.reason, str(exc))
    if event is NEED_DATA:
        return ("need_data",)
    return ("header", event, reader.trailing_data)


def both_ways(data: bytes, *, eof: bool = False) -> tuple[Any, ...]:
    whole = read([data], eof=eof)
    assert read([data[i : i + 1] for i in range(len(data))], eof=eof) == whole
    return whole


# --- sending: exact bytes ---------------------------------------------------------------------


def test_v1_exact_bytes() -> None:
    assert encode_v1(SRC4, DST4) == b"PROXY TCP4 192.0.2.10 198.51.100.2 56324 443\r\n"
    assert encode_v1(SRC6, DST6) == b"PROXY TCP6 2001:db8::10 2001:db8::2 40000 8443\r\n"
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"


def test_v2_exact_bytes() -> None:
    assert encode_v2(SRC4, DST4) == V2_TCP4
    assert encode_v2(None, None) == V2_LOCAL
    v6 = encode_v2(SRC6, DST6)
    assert v6[:16] == V2_SIGNATURE + b"\x21\x21\x00\x24"
    assert v6[16:] == SRC6[0].packed + DST6[0].packed + b"\x9c\x40\x20\xfb"
    assert encode_header("v1", SRC4, DST4) == encode_v1(SRC4, DST4)
    assert encode_header("v2", SRC4, DST4) == V2_TCP4


def test_mixed_families_travel_as_one() -> None:
    mapped = (ip("::ffff:192.0.2.10"), 56324)
    # A dual-stack listener reports IPv4 clients as mapped IPv6: both sides IPv4 -> TCP4.
    assert encode_v1(mapped, (ip("::ffff:198.51.100.2"), 443)) == encode_v1(SRC4, DST4)
    # A real IPv6 destination with an IPv4 client: the client goes in its mapped form.
    assert encode_v1(SRC4, DST6) == (b"PROXY TCP6 ::ffff:c000:20a 2001:db8::2 56324 8443\r\n")


@pytest.mark.parametrize(
    ("source", "destination"), [(SRC4, DST4), (SRC6, DST6), (SRC4, DST6), (None, None)]
)
@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
def test_reader_reads_what_the_encoders_write(source: Any, destination: Any, encode: Any) -> None:
    header = encode(source, destination)
    kind, event, trailing = both_ways(header + b"\x16\x03\x01")
    assert kind == "header"
    assert trailing == b"\x16\x03\x01"
    assert event.raw == header
    if source is None:
        assert (event.source, event.destination) == (None, None)
    elif source[0].version == destination[0].version:
        assert (event.source, event.destination) == (source, destination)


# --- accepting: exact bytes in ------------------------------------------------------------


def test_v1_header_then_client_bytes() -> None:
    data = b"PROXY TCP4 203.0.113.9 192.0.2.1 51000 443\r\n\x16\x03\x01\x02\x00"
    assert both_ways(data) == (
        "header",
        ProxyHeader(
            version=1,
            command="PROXY",
            source=(ip("203.0.113.9"), 51000),
            destination=(ip("192.0.2.1"), 443),
            raw=data[:44],
        ),
        b"\x16\x03\x01\x02\x00",
    )


def test_v1_unknown_and_v2_local_carry_no_address() -> None:
    for data, version, command in (
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", 1, "PROXY"),
        (b"PROXY UNKNOWN\r\n", 1, "PROXY"),
        (V2_LOCAL, 2, "LOCAL"),
        # LOCAL with an address block: ignored, as the specification says.
        (V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12), 2, "LOCAL"),
    ):
        _kind, event, _ = both_ways(data)
        assert (event.version, event.command, event.source, event.destination) == (
            version,
            command,
            None,
            None,
        )


def test_v2_tlvs_are_walked_and_skipped() -> None:
    tlvs = b"\x04\x00\x00" + b"\x05\x00\x03abc" + b"\xea\x00\x01\x01"  # NOOP, UNIQUE_ID, AWS
    data = V2_SIGNATURE + b"\x21\x11" + (12 + len(tlvs)).to_bytes(2, "big") + V2_TCP4[16:] + tlvs
    _kind, event, trailing = both_ways(data + b"rest")
    assert event.source == SRC4
    assert event.tlv_types == (0x04, 0x05, 0xEA)
    assert trailing == b"rest"


def test_v2_unix_and_unspec_proxy_use_the_socket_peer() -> None:
    unix = V2_SIGNATURE + b"\x21\x31" + (216).to_bytes(2, "big") + bytes(216)
    unspec = V2_SIGNATURE + b"\x21\x00\x00\x00"
    for data in (unix, unspec):
        _kind, event, _ = both_ways(data)
        assert (event.command, event.source) == ("PROXY", None)


@pytest.mark.parametrize(
    ("data", "cls", "message"),
    [
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(8),
            MissingProxyHeaderError,
            "no PROXY protocol header: the connection starts with "
            "b'\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xfc\\x03\\x03\\x00\\x00\\x00\\x00\\x00' "
            "(looks like TLS: is the load balancer sending PROXY headers?); this listener has "
            "accept_proxy_protocol set and needs a v1 or v2 header first",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            MissingProxyHeaderError,
            "no PROXY protocol header: the connection starts with b'GET / HTTP/1.1\\r\\n' (looks "
            "like plain HTTP: is the load balancer sending PROXY headers?); this listener has "
            "accept_proxy_protocol set and needs a v1 or v2 header first",
        ),
        (
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            BadProxyHeaderError,
            "malformed PROXY v1 header b'PROXY TCP5 1.2.3.4 5.6.7.8 1 2\\r\\n'",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            BadProxyHeaderError,
            "malformed PROXY v1 header b'PROXY TCP4 1.2.3.4 5.6.7.8 01 2\\r\\n'",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            BadProxyHeaderError,
            "PROXY v1 header with a port above 65535: b'PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\\r\\n'",
        ),
        (
            b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
            BadProxyHeaderError,
            "PROXY v1 header with an invalid address '1.2.3.256'",
        ),
        (
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            BadProxyHeaderError,
            "PROXY v1 header says TCP4 but carries the IPv6 address ::1",
        ),
        (
            b"PROXY TCP6 " + b"1" * 100,
            BadProxyHeaderError,
            "PROXY v1 header without CRLF in its first 107 bytes (the specification's maximum)",
        ),
        (
            V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
            BadProxyHeaderError,
            "PROXY v2 header with version 1, expected 2",
        ),
        (
            V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
            BadProxyHeaderError,
            "PROXY v2 header with command 0x2, expected 0 (LOCAL) or 1 (PROXY)",
        ),
        (
            V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),
            BadProxyHeaderError,
            "PROXY v2 header for a datagram connection (family 0x12) on a TCP listener",
        ),
        (
            V2_SIGNATURE + b"\x21\x41\x00\x00",
            BadProxyHeaderError,
            "PROXY v2 header with unknown family 0x41",
        ),
        (
            V2_SIGNATURE + b"\x21\x11\x10\x01",
            BadProxyHeaderError,
            "PROXY v2 header announces 4097 bytes of addresses and TLVs, more than the 4096 "
            "accepted",
        ),
        (
            V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),
            BadProxyHeaderError,
            "PROXY v2 header announces 12 bytes, too few for the 36-byte addresses of family 0x21",
        ),
        (
            V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05\x00",
            BadProxyHeaderError,
            "PROXY v2 TLV 0x01 claims 5 bytes, past the end of the header",
        ),
        (
            V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00",
            BadProxyHeaderError,
            "PROXY v2 header has 2 stray bytes after its TLVs (a TLV needs at least 3)",
        ),
    ],
)
def test_bad_headers(data: bytes, cls: type[Exception], message: str) -> None:
    _kind, got_cls, reason, got = both_ways(data, eof=True)
    assert (got_cls, got) == (cls, message)
    assert reason == ("no_proxy_header" if cls is MissingProxyHeaderError else "bad_proxy_header")


@pytest.mark.parametrize(
    "data",
    [b"", b"PRO", b"PROXY TCP4 1.2.3.4", V2_SIGNATURE[:7], V2_TCP4[:-1]],
    ids=["nothing", "v1-prefix", "v1-partial", "v2-signature", "v2-body"],
)
def test_eof_inside_a_header(data: bytes) -> None:
    assert both_ways(data) == ("need_data",)
    assert both_ways(data, eof=True) == (
        "error",
        BadProxyHeaderError,
        "bad_proxy_header",
        f"connection closed after {len(data)} bytes, before the PROXY protocol header was complete",
    )


def test_short_garbage_waits_for_sixteen_bytes_or_eof() -> None:
    assert both_ways(b"SSH-2.0") == ("need_data",)
    assert both_ways(b"SSH-2.0", eof=True)[1] is MissingProxyHeaderError


def test_results_repeat() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(V2_TCP4)
    assert reader.next_event() is reader.next_event()
    bad = ProxyHeaderReader()
    bad.receive_data(b"\x16" * 16)
    with pytest.raises(MissingProxyHeaderError) as first:
        bad.next_event()
    with pytest.raises(MissingProxyHeaderError) as second:
        bad.next_event()
    assert first.value is second.value
    bad.receive_data(b"")
    with pytest.raises(RuntimeError):
        bad.receive_data(b"x")
