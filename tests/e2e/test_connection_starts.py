"""Connections that end, or are refused, at their very start, through a real proxy on loopback.

A connect that succeeded was accepted by the kernel, so the proxy must accept it and write
exactly one access-log line for it, with the client's address, even when the client reset it
before the proxy got to it. And a first packet that already shows it is no ClientHello is
refused at once, not at the hello deadline.
"""

from __future__ import annotations

import collections
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
import trio
from proxytest import wait_for

#: How many clients connect and reset, and how many of them at a time.
CLIENTS = 600
CONCURRENCY = 50


async def connect_and_reset(port: int) -> str | None:
    """Connect, then close at once with SO_LINGER 0 (an RST, no FIN, no byte sent); return the
    client's address as the access log writes it, or None if the connect failed."""
    sock = trio.socket.socket()
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            await sock.connect(("127.0.0.1", port))
        except OSError:
            return None  # the kernel never accepted it: no line is owed
        host, client_port = sock.getsockname()
        return f"{host}:{client_port}"


async def test_clients_that_reset_at_once_each_get_one_access_log_line(
    start_proxy: Callable[..., Any], proxy_config_in_mode: Callable[..., Any]
) -> None:
    # No rate limit: every connection must reach the hello reader, whose read sees the reset.
    limits = {"per_client_rate": 0, "per_client_connections": 0}
    running = await start_proxy(proxy_config_in_mode(443, limits=limits))
    clients: list[str] = []

    async def connect_some(count: int) -> None:
        for _ in range(count):
            address = await connect_and_reset(running.port)
            if address is not None:
                clients.append(address)

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(connect_some, CLIENTS // CONCURRENCY)
    assert len(clients) > CLIENTS * 0.9, "most connects should succeed on loopback"

    # Every connection the kernel accepted is accepted and ended by the proxy: then no more
    # lines can come, and the lines must match the clients one to one (a port may be reused
    # by a later client: an RST leaves no TIME_WAIT, hence the counts).
    await wait_for(
        lambda: len(running.access_log) >= len(clients) and not running.proxy.context.live,
        timeout=30,
    )
    logged = collections.Counter(str(record["client"]) for record in running.access_log)
    assert logged == collections.Counter(clients)
    for record in running.access_log:
        assert record["reason"] == "client_reset", record
        assert record["decision"] == "deny"
        assert str(record["error"]).startswith(
            "client reset the connection before its ClientHello: "
        )
        assert record["bytes_to_upstream"] == record["bytes_to_client"] == 0


#: listener settings -> the error of a client that resets before its first byte.
LISTENER_KINDS = {
    "tls": ({}, "client reset the connection before its ClientHello: "),
    "http": ({"protocol": "http"}, "client reset the connection before its request head: "),
    "proxy_protocol": (
        {"accept_proxy_protocol": True},
        "peer reset the connection before its PROXY protocol header: ",
    ),
}


@pytest.mark.parametrize("kind", LISTENER_KINDS)
async def test_a_client_that_resets_once_accepted_is_client_reset_on_every_listener(
    kind: str, start_proxy: Callable[..., Any], proxy_config: Callable[..., Any]
) -> None:
    settings, error = LISTENER_KINDS[kind]
    config = proxy_config(443)
    config["listeners"][0].update(settings)
    running = await start_proxy(config)
    sock = trio.socket.socket()
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await sock.connect(("127.0.0.1", running.port))
        host, port = sock.getsockname()
        await wait_for(lambda: len(running.proxy.context.live) == 1)  # accepted, reading
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["client"] == f"{host}:{port}"
    assert record["reason"] == "client_reset"
    assert str(record["error"]).startswith(error)


#: A fatal handshake_failure alert (7 bytes) and an application-data record of 5 bytes (10).
SHORT_RECORDS = {
    "alert": (
        b"\x15\x03\x03\x00\x02\x02\x28",
        "TLS record 1 has content type 21 (alert) before the ClientHello was complete; the "
        "ClientHello must come first, in handshake records (22)",
    ),
    "application_data": (
        b"\x17\x03\x03\x00\x05hello",
        "TLS record 1 has content type 23 (application_data) before the ClientHello was "
        "complete; the ClientHello must come first, in handshake records (22)",
    ),
}


@pytest.mark.parametrize("kind", SHORT_RECORDS)
async def test_a_short_non_handshake_record_is_refused_at_once(
    kind: str, start_proxy: Callable[..., Any], proxy_config: Callable[..., Any]
) -> None:
    data, error = SHORT_RECORDS[kind]
    running = await start_proxy(proxy_config(443, timeouts={"client_hello": 10}))
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        await stream.send_all(data)
        sent = trio.current_time()
        # The client keeps its side open and waits, as a TLS peer waiting for an answer does.
        with trio.fail_after(5):
            assert await stream.receive_some(65536) == b""
        closed_after = trio.current_time() - sent
    finally:
        await trio.aclose_forcefully(stream)
    assert closed_after < 0.5

    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["decision"] == "deny"
    assert record["reason"] == "malformed_hello"
    assert record["error"] == error
    assert isinstance(record["duration"], float)
    assert record["duration"] < 0.5
