"""Byte-exact forwarding, half-close, resets, graceful drain and reload, through a real proxy.

The backend here is plain TCP: after the ClientHello (a real capture, whose SNI is
``x.test``) the proxy never looks at the bytes, so the test can send any payload and compare
it exactly.

Every test runs in the three forwarding modes: ``kernel`` (BPF sockhash; root only, and a
failure instead of a skip in CI), ``splice`` (splice(2) through pipes) and ``copy``; in kernel
mode each connection must really have been
spliced (the access log's ``mode``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from proxytest import drain, echo, receive_exactly, serve_tcp, wait_for

HELLO = (Path(__file__).parent.parent / "data" / "hellos" / "curl.bin").read_bytes()
HELLO_NAME = "x.test"  # the SNI inside HELLO


@attrs.define
class RawBackend:
    host: str
    port: int
    streams: list[trio.SocketStream] = attrs.Factory(list)


Handler = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture
def raw_backend(nursery: trio.Nursery) -> Callable[..., Awaitable[RawBackend]]:
    async def start(handler: Handler, host: str = "127.0.0.1") -> RawBackend:
        return RawBackend(host, await serve_tcp(nursery, handler, host))

    return start


#: The forwarding mode of the running test (set by the ``forwarding_mode`` fixture).
MODE = "copy"


@pytest.fixture(
    params=[pytest.param("kernel", marks=pytest.mark.bpf), "splice", "copy"], autouse=True
)
def forwarding_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    mode: str = request.param
    monkeypatch.setattr(sys.modules[__name__], "MODE", mode)
    return mode


def raw_config(backend: RawBackend, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listeners": [{"host": backend.host, "port": 0, "target_port": backend.port}],
        "rules": [{"match": HELLO_NAME, "allow_private": True}],
        "resolver": {"hosts": {HELLO_NAME: [backend.host]}},
        "log": {"access_log": None},
        "ebpf": {"sockmap": {"enabled": MODE == "kernel"}},
        # kernel mode must be the kernel's, not a silent fallback
        "fallback_mode": "none" if MODE == "kernel" else "auto",
        "forwarding": {"mode": "auto" if MODE == "kernel" else MODE},
    }
    if MODE == "splice":
        config["fallback_mode"] = "none"  # splice mode must be splice's, not copy's
    config.update(overrides)
    return config


async def forwarding(running: Any, n: int = 1) -> None:
    """Wait until ``n`` connections are being forwarded (in kernel mode: spliced)."""

    def ready() -> bool:
        live = running.proxy.context.live.values()
        if len(live) != n or not all(info.mode for info in live):
            return False
        return MODE != "kernel" or running.proxy.context.forwarder.registered == n

    await wait_for(ready)


def assert_mode(records: list[dict[str, object]]) -> None:
    """Every forwarded connection ran in the mode under test."""
    assert [r["mode"] for r in records if r["mode"] is not None] == [MODE] * len(
        [r for r in records if r["mode"] is not None]
    )
    assert any(r["mode"] == MODE for r in records)


async def connect(running: Any, host: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream(host, running.port)


def reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


BULK = 32 * 1024 * 1024  # per direction: enough to cycle every buffer many times, fast in CI


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
async def test_bulk_both_directions_at_once_is_byte_exact(
    host: str, raw_backend: Any, start_proxy: Any
) -> None:
    upstream_payload = os.urandom(BULK)
    downstream_payload = os.urandom(BULK)
    seen_by_backend: list[str] = []

    async def backend_handler(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(downstream_payload)
                await stream.send_eof()

            nursery.start_soon(send)
            got = await drain(stream)
            seen_by_backend.append(hashlib.sha256(got).hexdigest())
        await stream.aclose()

    backend = await raw_backend(backend_handler, host)
    running = await start_proxy(raw_config(backend))
    client = await connect(running, host)
    received = b""
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await client.send_all(HELLO + upstream_payload)
            await client.send_eof()

        nursery.start_soon(send)
        received = await drain(client)
    await client.aclose()
    assert hashlib.sha256(received).digest() == hashlib.sha256(downstream_payload).digest()
    # The backend's task may read its EOF after the proxy has logged the connection.
    await wait_for(lambda: len(running.access_log) == 1 and bool(seen_by_backend), timeout=30)
    assert seen_by_backend == [hashlib.sha256(HELLO + upstream_payload).hexdigest()]
    [record] = running.access_log
    assert_mode(running.access_log)
    assert record["reason"] == "normal"
    assert record["bytes_to_upstream"] == len(HELLO) + BULK
    assert record["bytes_to_client"] == BULK


async def test_client_half_close_then_long_response(raw_backend: Any, start_proxy: Any) -> None:
    """Request, FIN, then a long response: the FIN must not cut the response."""
    response = os.urandom(4 * 1024 * 1024)

    async def backend_handler(stream: trio.SocketStream) -> None:
        request = await drain(stream)  # until the client's FIN arrives through the proxy
        assert request == HELLO + b"request"
        await stream.send_all(response)
        await stream.aclose()

    backend = await raw_backend(backend_handler)
    running = await start_proxy(raw_config(backend))
    client = await connect(running)
    await client.send_all(HELLO)
    await forwarding(running)  # a client that half-closes before that is copied (tested below)
    await client.send_all(b"request")
    await client.send_eof()
    assert await drain(client) == response
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["reason"] == "normal"
    assert_mode(running.access_log)


async def test_server_half_close_keeps_client_direction_open(
    raw_backend: Any, start_proxy: Any
) -> None:
    """The server says all it has and sends FIN first; the client keeps sending after it."""
    got: list[bytes] = []

    async def backend_handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"banner")
        await stream.send_eof()
        got.append(await drain(stream))
        await stream.aclose()

    backend = await raw_backend(backend_handler)
    running = await start_proxy(raw_config(backend))
    client = await connect(running)
    await client.send_all(HELLO)
    assert await drain(client) == b"banner"  # EOF from the server arrived
    tail = os.urandom(1024 * 1024)
    await client.send_all(tail)  # this direction still flows
    await client.send_eof()
    await wait_for(lambda: len(got) == 1)
    assert got == [HELLO + tail]
    await client.aclose()


async def test_upstream_reset_resets_client(raw_backend: Any, start_proxy: Any) -> None:
    spliced = trio.Event()

    async def backend_handler(stream: trio.SocketStream) -> None:
        await receive_exactly(stream, len(HELLO))
        await spliced.wait()
        reset(stream)
        await stream.aclose()

    backend = await raw_backend(backend_handler)
    running = await start_proxy(raw_config(backend))
    client = await connect(running)
    await client.send_all(HELLO)
    await forwarding(running)
    spliced.set()
    with pytest.raises(trio.BrokenResourceError):
        await drain(client)
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["reason"] == "upstream_reset"
    assert_mode(running.access_log)


async def test_client_reset_resets_upstream(raw_backend: Any, start_proxy: Any) -> None:
    outcome: list[str] = []

    async def backend_handler(stream: trio.SocketStream) -> None:
        await receive_exactly(stream, len(HELLO))
        try:
            await drain(stream)
            outcome.append("eof")
        except trio.BrokenResourceError:
            outcome.append("reset")
        await stream.aclose()

    backend = await raw_backend(backend_handler)
    running = await start_proxy(raw_config(backend))
    client = await connect(running)
    await client.send_all(HELLO)
    await forwarding(running)
    reset(client)
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["reason"] == "client_reset"
    await wait_for(lambda: outcome == ["reset"])
    assert_mode(running.access_log)


async def test_graceful_shutdown_drains_live_connections(
    raw_backend: Any, start_proxy: Any
) -> None:
    backend = await raw_backend(echo)
    running = await start_proxy(raw_config(backend, timeouts={"drain": 30}))
    client = await connect(running)
    await client.send_all(HELLO)
    assert await receive_exactly(client, len(HELLO)) == HELLO
    running.proxy.shutdown()
    # New connections are refused once the listeners are closed...
    await wait_for(lambda: running.proxy.listeners[0].socket.fileno() == -1)
    with pytest.raises(OSError, match="all attempts to connect to"):
        await connect(running)
    # ...while the live one keeps working until it ends by itself.
    await client.send_all(b"still here")
    assert await receive_exactly(client, 10) == b"still here"
    await client.send_eof()
    assert await drain(client) == b""
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["reason"] == "normal"


async def test_drain_deadline_closes_what_is_left(
    raw_backend: Any, start_proxy: Any, autojump_clock: trio.testing.MockClock
) -> None:
    backend = await raw_backend(echo)
    running = await start_proxy(raw_config(backend, timeouts={"drain": 7, "idle": 3600}))
    client = await connect(running)
    await client.send_all(HELLO)
    await receive_exactly(client, len(HELLO))
    stopped_at = trio.current_time()
    running.proxy.shutdown()
    assert await drain(client) == b""  # the proxy closed us at the drain deadline
    assert trio.current_time() == stopped_at + 7
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["reason"] == "shutdown"


async def test_reload_applies_to_new_connections_only(raw_backend: Any, start_proxy: Any) -> None:
    from trio_sni.sansio.config_load import load_config

    backend = await raw_backend(echo)
    config = raw_config(backend)
    running = await start_proxy(config)
    live = await connect(running)
    await live.send_all(HELLO)
    await receive_exactly(live, len(HELLO))

    running.proxy.reload(
        load_config({**config, "rules": [{"match": HELLO_NAME, "action": "deny"}]})
    )

    refused = await connect(running)
    await refused.send_all(HELLO)
    assert await drain(refused) == bytes([21, 3, 3, 0, 2, 2, 112])  # unrecognized_name alert
    await refused.aclose()
    # The connection that started before the reload is untouched.
    await live.send_all(b"ping")
    assert await receive_exactly(live, 4) == b"ping"
    await live.aclose()
    await wait_for(lambda: len(running.access_log) == 2)
    assert sorted(r["reason"] for r in running.access_log) == ["denied_domain", "normal"]
    assert_mode(running.access_log)


async def test_client_half_closed_before_the_splice_is_copied(
    raw_backend: Any, start_proxy: Any
) -> None:
    """ClientHello, request and FIN in one go: the socket cannot enter the sockhash any
    more (CLOSE_WAIT), so this connection is copied in userspace, and says so."""
    response = os.urandom(1024 * 1024)

    async def backend_handler(stream: trio.SocketStream) -> None:
        assert await drain(stream) == HELLO + b"request"
        await stream.send_all(response)
        await stream.aclose()

    backend = await raw_backend(backend_handler)
    running = await start_proxy(raw_config(backend))
    # Connected, sent and half-closed without an await in between: the proxy (in this Trio
    # run) cannot accept the connection before the FIN is there.
    raw = socket.create_connection(("127.0.0.1", running.port))
    raw.sendall(HELLO + b"request")
    raw.shutdown(socket.SHUT_WR)
    client = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    assert await drain(client) == response
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    # kernel falls back to copy (never to splice: docs/kernel-facts.md, fact 13); the others
    # run as is
    expected_mode = "splice" if MODE == "splice" else "copy"
    assert (record["reason"], record["mode"]) == ("normal", expected_mode)
    assert record["bytes_to_client"] == len(response)
    assert record["bytes_to_upstream"] == len(HELLO) + len(b"request")
