"""The one pump for a connection's first bytes, on real loopback TCP connections.

Every reader (PROXY header, HTTP request head, ClientHello) goes through the same pump, so
each case runs for all three: what arrives in pieces is reassembled, bytes behind the event are
handed on, a reset names the client's fault only once a byte of it arrived, and the deadline
is one for all. Each case runs with the fast path (bytes already queued are read without
awaiting) and without it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from proxytest import client_hello

from trio_sni import connection
from trio_sni.connection import (
    CLIENT_HELLO,
    PROXY_HEADER,
    REQUEST_HEAD,
    FirstBytes,
    read_first_bytes,
)
from trio_sni.errors import ClientReset, HelloTimeout, ProxyHeaderTimeout, RequestTimeout
from trio_sni.sansio._reader import BufferedReader
from trio_sni.sansio.clienthello import ClientHelloReader
from trio_sni.sansio.errors import MalformedHelloError
from trio_sni.sansio.http_request import HttpRequestReader, MalformedRequestError
from trio_sni.sansio.proxy_protocol import BadProxyHeaderError, ProxyHeaderReader, encode_header

SOURCE = (ipaddress.ip_address("203.0.113.7"), 40001)
DESTINATION = (ipaddress.ip_address("198.51.100.2"), 443)

#: kind -> (the spec, a fresh reader, one complete first message).
KINDS: dict[str, tuple[FirstBytes, Callable[[], BufferedReader[Any]], bytes]] = {
    "proxy_header": (PROXY_HEADER, ProxyHeaderReader, encode_header("v1", SOURCE, DESTINATION)),
    "request_head": (REQUEST_HEAD, HttpRequestReader, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"),
    "client_hello": (CLIENT_HELLO, ClientHelloReader, client_hello("a.test")),
}


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.socket.SocketType]]:
    """An accepted stream (the proxy's side) and the raw client socket that connected to it."""
    with trio.socket.socket() as listener, trio.socket.socket() as client:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        await client.connect(listener.getsockname())
        accepted, _ = await listener.accept()
        stream = trio.SocketStream(accepted)
        try:
            yield stream, client
        finally:
            await trio.aclose_forcefully(stream)


@pytest.fixture(autouse=True, params=["queued", "awaited"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every case both ways: the fast path that reads what is already queued, and the awaited
    reads under the deadline (what the fast path leaves to it, here all of it)."""
    if request.param == "awaited":
        monkeypatch.setattr(connection, "_receive_queued", lambda stream, size: None)
    path: str = request.param
    return path


def reset(client: trio.socket.SocketType) -> None:
    """Close with SO_LINGER 0: an RST, as a client that gives up sends."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_message_over_several_reads_is_read_whole_and_what_follows_is_handed_on(
    kind: str,
) -> None:
    first, new_reader, message = KINDS[kind]
    async with tcp_pair() as (stream, client):
        await client.send(message[2:] + b"after")
        # The first two bytes come as the previous reader's leftovers; the reads are so small
        # that the message's last byte comes in a second read, together with what follows.
        event, after = await read_first_bytes(
            stream,
            new_reader(),
            message[:2],
            first,
            len(message) - 3,
            trio.current_time() + 10,
            10,
        )
    assert (event.raw, after) == (message, b"after")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_reset_before_the_first_byte_is_a_client_reset(kind: str) -> None:
    first, new_reader, _ = KINDS[kind]
    async with tcp_pair() as (stream, client):
        reset(client)
        with pytest.raises(ClientReset) as caught:
            await read_first_bytes(
                stream, new_reader(), b"", first, 4096, trio.current_time() + 10, 10
            )
    assert caught.value.reason == "client_reset"
    assert str(caught.value).startswith(f"{first.sender} reset the connection before its ")


#: kind -> the error and reason of a reset after some of the message arrived.
CUT_SHORT = {
    "proxy_header": (BadProxyHeaderError, "bad_proxy_header"),
    "request_head": (MalformedRequestError, "bad_http_request"),
    "client_hello": (MalformedHelloError, "malformed_hello"),
}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_reset_after_some_bytes_is_the_readers_error(kind: str) -> None:
    first, new_reader, message = KINDS[kind]
    error, reason = CUT_SHORT[kind]
    async with tcp_pair() as (stream, client):
        reset(client)
        with pytest.raises(error) as caught:
            await read_first_bytes(
                stream, new_reader(), message[:3], first, 4096, trio.current_time() + 10, 10
            )
    assert caught.value.reason == reason
    assert str(caught.value).startswith(
        f"{first.sender} reset the connection during the {first.what}: "
    )


#: kind -> the timeout's error, reason and message for a 10 s deadline.
TIMEOUTS = {
    "proxy_header": (
        ProxyHeaderTimeout,
        "proxy_header_timeout",
        "no complete PROXY protocol header within 10 s",
    ),
    "request_head": (
        RequestTimeout,
        "request_timeout",
        "no complete HTTP request head within 10 s",
    ),
    "client_hello": (HelloTimeout, "hello_timeout", "no complete ClientHello within 10 s"),
}


@pytest.mark.parametrize("kind", KINDS)
async def test_the_deadline_is_the_callers_and_names_what_was_incomplete(
    kind: str, autojump_clock: trio.abc.Clock
) -> None:
    first, new_reader, message = KINDS[kind]
    error, reason, text = TIMEOUTS[kind]
    async with tcp_pair() as (stream, client):
        await client.send(message[:3])
        # A deadline already partly used (by a PROXY header, say): what is left of it counts.
        start = trio.current_time()
        with pytest.raises(error) as caught:
            await read_first_bytes(stream, new_reader(), b"", first, 4096, start + 4, 10)
    assert trio.current_time() - start == pytest.approx(4)
    assert (caught.value.reason, str(caught.value)) == (reason, text)
