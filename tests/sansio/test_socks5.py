"""The SOCKS5 client machine, on exact transcripts: what it sends, what it makes of each reply.

Every transcript is fed whole and byte by byte (house rule 2), and both must give the same
bytes sent and the same outcome, including the error message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

import pytest

from trio_sni.sansio.socks5 import (
    NEED_DATA,
    REPLY_MESSAGES,
    Socks5AuthError,
    Socks5Client,
    Socks5Connected,
    Socks5ConnectError,
    Socks5Error,
    Socks5ProtocolError,
    Socks5RefusedError,
)

GREETING = b"\x05\x01\x00"
GREETING_AUTH = b"\x05\x02\x00\x02"
CONNECT_NAME = b"\x05\x01\x00\x03\x0abench.test\x01\xbb"  # bench.test:443
OK_V4 = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40"  # bound to 127.0.0.1:40000


def drive(client: Socks5Client, chunks: Iterable[bytes], *, eof: bool = False) -> tuple[Any, ...]:
    """Feed the server's bytes as a real driver would; return (bytes sent, outcome)."""
    sent = client.data_to_send()
    try:
        event = client.next_event()
        for chunk in chunks:
            client.receive_data(chunk)  # after the reply, bytes go to trailing_data
            if event is NEED_DATA:
                event = client.next_event()
                sent += client.data_to_send()
        if eof and event is NEED_DATA:
            client.receive_data(b"")
            event = client.next_event()
    except Socks5Error as exc:
        # Whatever was queued before the error is part of the transcript too (a driver
        # would not send it, but it must not depend on the chunking either).
        sent += client.data_to_send()
        return sent, ("error", type(exc), exc.reason, str(exc))
    if event is NEED_DATA:
        return sent, ("need_data",)
    return sent, ("connected", event, client.trailing_data)


def both_ways(make: Any, server: bytes, *, eof: bool = False) -> tuple[Any, ...]:
    whole = drive(make(), [server], eof=eof)
    trickle = drive(make(), [server[i : i + 1] for i in range(len(server))], eof=eof)
    assert trickle == whole
    return whole


def name_client() -> Socks5Client:
    return Socks5Client("bench.test", 443)


def auth_client() -> Socks5Client:
    return Socks5Client("bench.test", 443, username="alice", password="s3cret")


def test_no_auth_connect_by_name() -> None:
    sent, outcome = both_ways(name_client, b"\x05\x00" + OK_V4)
    assert sent == GREETING + CONNECT_NAME
    assert outcome == ("connected", Socks5Connected("127.0.0.1", 40000), b"")


def test_username_password_then_connect() -> None:
    sent, outcome = both_ways(auth_client, b"\x05\x02" + b"\x01\x00" + OK_V4)
    assert sent == GREETING_AUTH + b"\x01\x05alice\x06s3cret" + CONNECT_NAME
    assert outcome[0] == "connected"


def test_server_may_skip_auth_when_credentials_are_offered() -> None:
    sent, outcome = both_ways(auth_client, b"\x05\x00" + OK_V4)
    assert sent == GREETING_AUTH + CONNECT_NAME
    assert outcome[0] == "connected"


@pytest.mark.parametrize(
    ("host", "encoded"),
    [
        ("192.0.2.7", b"\x01\xc0\x00\x02\x07"),
        (ipaddress.ip_address("2001:db8::1"), b"\x04" + ipaddress.ip_address("2001:db8::1").packed),
        ("2001:db8::1", b"\x04" + ipaddress.ip_address("2001:db8::1").packed),
    ],
)
def test_connect_by_address(host: Any, encoded: bytes) -> None:
    sent, outcome = both_ways(lambda: Socks5Client(host, 80), b"\x05\x00" + OK_V4)
    assert sent == GREETING + b"\x05\x01\x00" + encoded + b"\x00\x50"
    assert outcome[0] == "connected"


def test_bound_address_forms_and_trailing_bytes() -> None:
    v6 = b"\x05\x00\x00\x04" + bytes(15) + b"\x01" + b"\x01\xbb"
    _, outcome = both_ways(name_client, b"\x05\x00" + v6 + b"early")
    assert outcome == ("connected", Socks5Connected("::1", 443), b"early")
    domain = b"\x05\x00\x00\x03\x05proxy\x04\x38"
    _, outcome = both_ways(name_client, b"\x05\x00" + domain)
    assert outcome == ("connected", Socks5Connected("proxy", 1080), b"")


@pytest.mark.parametrize("code", [*sorted(REPLY_MESSAGES), 0x09, 0xFF])
def test_every_reply_code_is_a_clear_error(code: int) -> None:
    # Only VER and REP are sent: the error must not wait for the rest (some servers close).
    _, outcome = both_ways(name_client, b"\x05\x00" + bytes([5, code]), eof=True)
    _kind, cls, reason, message = outcome
    meaning = REPLY_MESSAGES.get(code, "unassigned reply code")
    assert message == (
        f"SOCKS5 server could not connect to bench.test:443: {meaning} (REP 0x{code:02x})"
    )
    expected = {2: (Socks5RefusedError, "socks5_refused")}
    for unreachable in (3, 4, 5, 6):
        expected[unreachable] = (Socks5ConnectError, "connect_failed")
    assert (cls, reason) == expected.get(code, (cls, "socks5_error"))
    if code not in expected:
        assert cls.__name__ == "Socks5ReplyError"


def test_no_acceptable_method_says_to_configure_credentials() -> None:
    _, outcome = both_ways(name_client, b"\x05\xff")
    assert outcome == (
        "error",
        Socks5AuthError,
        "socks5_auth_failed",
        "SOCKS5 server accepts none of the offered methods (no authentication); set "
        "socks5.username and socks5.password if it requires a login",
    )
    _, outcome = both_ways(auth_client, b"\x05\xff")
    assert outcome[3] == (
        "SOCKS5 server accepts none of the offered methods (no authentication and "
        "username/password)"
    )


def test_wrong_password() -> None:
    sent, outcome = both_ways(auth_client, b"\x05\x02\x01\x01")
    assert sent == GREETING_AUTH + b"\x01\x05alice\x06s3cret"  # no CONNECT after a refusal
    assert outcome == (
        "error",
        Socks5AuthError,
        "socks5_auth_failed",
        "SOCKS5 server rejected the username/password (status 0x01); check socks5.username "
        "and socks5.password",
    )


@pytest.mark.parametrize(
    ("make", "server", "message"),
    [
        (
            name_client,
            b"HTTP/1.1 400",
            "not a SOCKS5 server: its first reply starts with b'HT' (version 72, expected 5)",
        ),
        (
            name_client,
            b"\x05\x02",
            "SOCKS5 server chose method username/password (0x02), which we did not offer",
        ),
        (
            name_client,
            b"\x05\x01",
            "SOCKS5 server chose method GSSAPI (0x01), which we did not offer",
        ),
        (
            auth_client,
            b"\x05\x02\x05\x00",
            "SOCKS5 server answered the username/password "
            "request with version 5, expected 1 (RFC 1929)",
        ),
        (
            name_client,
            b"\x05\x00\x04\x00",
            "SOCKS5 server's CONNECT reply has version 4, expected 5",
        ),
        (
            name_client,
            b"\x05\x00\x05\x00\x01\x01",
            "SOCKS5 server's CONNECT reply has reserved byte 0x01, expected 0",
        ),
        (
            name_client,
            b"\x05\x00\x05\x00\x00\x02",
            "SOCKS5 server's CONNECT reply has unknown address type 0x02",
        ),
    ],
)
def test_protocol_violations(make: Any, server: bytes, message: str) -> None:
    _, outcome = both_ways(make, server)
    assert outcome == ("error", Socks5ProtocolError, "socks5_error", message)


@pytest.mark.parametrize(
    ("server", "waiting"),
    [
        (b"", "the method selection (0 bytes of it received)"),
        (b"\x05", "the method selection (1 bytes of it received)"),
        (b"\x05\x00\x05\x00\x00", "the CONNECT reply (3 bytes of it received)"),
        (b"\x05\x00" + OK_V4[:-1], "the rest of the CONNECT reply (9 bytes of it received)"),
    ],
)
def test_eof_before_the_reply_is_complete(server: bytes, waiting: str) -> None:
    _, outcome = both_ways(name_client, server, eof=True)
    assert outcome == (
        "error",
        Socks5ProtocolError,
        "socks5_error",
        f"SOCKS5 server closed the connection while we waited for {waiting}",
    )


def test_need_data_until_complete_and_results_repeat() -> None:
    client = name_client()
    assert client.data_to_send() == GREETING
    assert client.data_to_send() == b""
    assert client.next_event() is NEED_DATA
    client.receive_data(b"\x05\x00")
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == CONNECT_NAME
    client.receive_data(OK_V4)
    event = client.next_event()
    assert client.next_event() is event
    failing = name_client()
    failing.receive_data(b"\x05\xff")
    with pytest.raises(Socks5AuthError) as first:
        failing.next_event()
    with pytest.raises(Socks5AuthError) as second:
        failing.next_event()
    assert first.value is second.value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "a" * 256, "port": 443}, "SOCKS5 cannot carry a 256-byte host name (1 to 255)"),
        ({"host": "x.test", "port": 0}, "port must be from 1 to 65535, not 0"),
        ({"host": "x.test", "port": 1, "username": "u"}, "give both username and password"),
        (
            {"host": "x.test", "port": 1, "username": "", "password": "p"},
            "the SOCKS5 username must be 1 to 255 bytes of UTF-8",
        ),
        (
            {"host": "x.test", "port": 1, "username": "u", "password": "é" * 128},
            "the SOCKS5 password must be 1 to 255 bytes of UTF-8",
        ),
    ],
)
def test_requests_socks5_cannot_carry(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Socks5Client(**kwargs)


def test_data_after_eof_is_a_caller_bug() -> None:
    client = name_client()
    client.receive_data(b"")
    with pytest.raises(RuntimeError):
        client.receive_data(b"\x05")
