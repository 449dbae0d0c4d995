"""Refusals through a running proxy on loopback: each with its access-log reason and message.

Every refused connection here is a real socket to a real proxy; the names are resolved by a
real DNS server on loopback (``dns_server``), and the allowed ones reach a real TLS backend.
The proxy never sends traffic outside loopback in these tests: addresses such as 10/8 or
169.254.169.254 are covered by the sans-I/O SSRF tables, which decide without connecting.

Closing behaviour that the assertions rely on (Linux): a socket closed with bytes still unread
in its receive queue sends RST instead of FIN, so a client whose bytes the proxy never read sees
a reset, and a client all of whose bytes were read sees a clean EOF.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from dnsserver import DNSServer
from proxytest import drain, wait_for

HELLOS = Path(__file__).parent.parent / "data" / "hellos"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
RESPONSE_BODY = b"hello from the backend\n"
ECONNREFUSED = f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"
NOT_TLS_TAIL = "; a TLS client starts with a handshake record (byte 0x16)"


def capture(name: str) -> bytes:
    return (HELLOS / f"{name}.bin").read_bytes()


def random_garbage() -> bytes:
    """64 seeded random bytes that cannot be mistaken for TLS or SSLv2 (first byte < 0x80,
    not a TLS content type 0x14 to 0x18) and hold no newline in the 16 bytes the reader
    quotes."""
    rng = random.Random(0x5EED)
    first = rng.choice([b for b in range(0x80) if b != 0x0A and not 0x14 <= b <= 0x18])
    rest = bytes(rng.choice([b for b in range(256) if b != 0x0A]) for _ in range(63))
    return bytes([first]) + rest


#: An SSLv2-compatible CLIENT-HELLO as old clients sent it: 2-byte header 0x80 0x2e (46 bytes),
#: msg_type 1, version 3.1, 21 bytes of cipher specs, no session id, a 16-byte challenge.
SSLV2_HELLO = (
    b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10"
    + b"\x00\x00\x39\x00\x00\x38\x00\x00\x35\x00\x00\x16\x00\x00\x13\x00\x00\x0a\x07\x00\xc0"
    + bytes(range(16))
)
GARBAGE = random_garbage()

#: (what the client sends, the reason, the exact error in the access log).
BAD_STARTS: dict[str, tuple[bytes, str, str]] = {
    "random": (
        GARBAGE,
        "not_tls",
        f"not TLS: the connection starts with {GARBAGE[:16]!r}{NOT_TLS_TAIL}",
    ),
    "http": (
        b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n",
        "not_tls",
        r"not TLS: the connection starts with b'GET / HTTP/1.1\r\n' (looks like plain HTTP)"
        + NOT_TLS_TAIL,
    ),
    "ssh": (
        b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n",
        "not_tls",
        "not TLS: the connection starts with b'SSH-2.0-OpenSSH_' (looks like SSH)" + NOT_TLS_TAIL,
    ),
    "sslv2": (
        SSLV2_HELLO,
        "not_tls",
        "SSLv2-style ClientHello (client version 0x0301): this obsolete format cannot carry a "
        "server name; the client must send a TLS ClientHello",
    ),
    "no_sni": (
        capture("openssl-nosni"),
        "no_sni",
        "the ClientHello has no server_name (SNI) extension; this proxy routes by server name, "
        "so the client must send one (clients leave it out when they connect to an IP address)",
    ),
    # 1880 bytes in one record, against a 1024-byte cap (see test_bad_starts...).
    "too_large": (
        capture("openssl-ffdhe8192-large"),
        "too_large",
        "ClientHello larger than the 1024-byte limit: TLS record 1 would end at byte 1880",
    ),
}


async def closed_by_proxy(stream: trio.SocketStream) -> str:
    """Wait until the proxy closes ``stream`` having sent nothing; return ``eof`` or ``reset``."""
    with trio.fail_after(10):
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return "reset"
    assert data == b"", f"the proxy sent {data!r} on a refused connection"
    return "eof"


async def send_and_wait_for_close(port: int, data: bytes) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(data)
        return await closed_by_proxy(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def tls_get(port: int, name: str, ctx: ssl.SSLContext) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        with trio.fail_after(10):
            await tls.send_all(REQUEST)
            return await drain(tls)
    finally:
        await trio.aclose_forcefully(tls)


async def tls_handshake_refused(port: int, name: str, ctx: ssl.SSLContext) -> None:
    """A real TLS client whose handshake the proxy ends by closing (no ServerHello)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()
    finally:
        await trio.aclose_forcefully(tls)


def dns_config(
    dns_server: DNSServer, target_port: int, rules: list[dict[str, Any]], **overrides: Any
) -> dict[str, Any]:
    """A proxy on 127.0.0.1 that resolves every name through the loopback DNS server."""
    config: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": target_port}],
        "rules": rules,
        "resolver": {"nameservers": [dns_server.nameserver]},
        "log": {"access_log": None},
    }
    config.update(overrides)
    return config


@pytest.fixture
def no_hostname_check(ca: trustme.CA) -> ssl.SSLContext:
    """Verifies the chain but not the name: the test certificate does not cover ``evil.test``."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    return ctx


# ------------------------------------------------------------------------------------------
# Bytes that are not a routable ClientHello


async def test_bad_starts_are_refused_while_a_live_tls_connection_keeps_working(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    running = await start_proxy(
        proxy_config(tls_backend.port, limits={"max_client_hello_size": 1024})
    )
    # A real TLS connection, handshake done through the proxy, request not sent yet.
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    live = trio.SSLStream(stream, client_context, server_hostname="bench.test")
    try:
        with trio.fail_after(10):
            await live.do_handshake()

        closes: dict[str, str] = {}

        async def bad_client(label: str, data: bytes) -> None:
            closes[label] = await send_and_wait_for_close(running.port, data)

        async with trio.open_nursery() as nursery:
            for label, (data, _reason, _error) in BAD_STARTS.items():
                nursery.start_soon(bad_client, label, data)
            # ...and a fresh request at the same time, on the same proxy.
            nursery.start_soon(tls_get, running.port, "www.bench.test", client_context)

        # The live connection was not disturbed: its request goes through now.
        with trio.fail_after(10):
            await live.send_all(REQUEST)
            response = await drain(live)
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert response.endswith(RESPONSE_BODY)
    finally:
        await trio.aclose_forcefully(live)

    # The proxy read every byte of each bad start (clean EOF), except the oversized hello: it
    # stopped reading at the 1024-byte cap, so the unread rest turned its close into a reset.
    expected_closes = {label: "eof" for label in BAD_STARTS}
    expected_closes["too_large"] = "reset"
    assert closes == expected_closes

    await wait_for(lambda: len(running.access_log) == len(BAD_STARTS) + 2)
    refused = [r for r in running.access_log if r["decision"] == "deny"]
    assert sorted((r["reason"], r["error"]) for r in refused) == sorted(
        (reason, error) for _data, reason, error in BAD_STARTS.values()
    )
    for record in refused:
        assert record["sni"] is None
        assert record["target"] is None
        assert record["bytes_to_upstream"] == 0
        assert record["bytes_to_client"] == 0
    served = [r for r in running.access_log if r["decision"] == "allow"]
    assert sorted(r["sni"] for r in served) == ["bench.test", "www.bench.test"]
    assert all(r["reason"] == "normal" for r in served)
    assert tls_backend.server_names == ["bench.test", "www.bench.test"]
    assert tls_backend.connections == 2


# ------------------------------------------------------------------------------------------
# Names resolved through a real DNS server, and the SSRF guard


async def test_name_resolving_to_loopback_is_refused_without_allow_private(
    dns_server: DNSServer,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    no_hostname_check: ssl.SSLContext,
) -> None:
    dns_server.add("evil.test", "A", "127.0.0.1")
    dns_server.add("evil6.test", "AAAA", "::1")
    rules = [{"match": "evil.test"}, {"match": "evil6.test"}]
    running = await start_proxy(dns_config(dns_server, tls_backend.port, rules))

    await tls_handshake_refused(running.port, "evil.test", no_hostname_check)
    await tls_handshake_refused(running.port, "evil6.test", no_hostname_check)

    await wait_for(lambda: len(running.access_log) == 2)
    hint = 'add "allow_private": true to the rule if this is intended'
    for record, name, address in zip(
        running.access_log, ["evil.test", "evil6.test"], ["127.0.0.1", "::1"], strict=True
    ):
        assert record["sni"] == name
        assert record["rule"] == name
        assert record["decision"] == "deny"
        assert record["reason"] == "ssrf_blocked"
        assert record["error"] == (
            f"{name} resolves only to refused addresses: {address} (loopback); {hint}"
        )
        assert record["target"] is None
        assert record["bytes_to_upstream"] == 0
    assert dns_server.query_count("evil.test", "A") == 1
    assert tls_backend.connections == 0


async def test_name_resolving_to_loopback_reaches_backend_with_allow_private(
    dns_server: DNSServer,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    no_hostname_check: ssl.SSLContext,
) -> None:
    dns_server.add("evil.test", "A", "127.0.0.1")
    rules = [{"match": "evil.test", "allow_private": True}]
    running = await start_proxy(dns_config(dns_server, tls_backend.port, rules))

    response = await tls_get(running.port, "evil.test", no_hostname_check)

    assert response.endswith(RESPONSE_BODY)
    assert tls_backend.server_names == ["evil.test"]
    assert tls_backend.received == [REQUEST]
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["decision"] == "allow"
    assert record["reason"] == "normal"
    assert record["target"] == f"127.0.0.1:{tls_backend.port}"
    assert record["error"] is None


async def test_nxdomain_is_resolve_failed(
    dns_server: DNSServer,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    no_hostname_check: ssl.SSLContext,
) -> None:
    rules = [{"match": "ghost.test", "allow_private": True}]
    running = await start_proxy(dns_config(dns_server, tls_backend.port, rules))

    await tls_handshake_refused(running.port, "ghost.test", no_hostname_check)

    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["sni"] == "ghost.test"
    assert record["decision"] == "allow"  # the policy allowed it; resolution failed after
    assert record["reason"] == "resolve_failed"
    assert record["error"] == "ghost.test: no such domain (NXDOMAIN)"
    assert record["target"] is None
    assert dns_server.query_count("ghost.test") >= 1
    assert tls_backend.connections == 0


async def test_dead_upstream_is_connect_failed(
    dns_server: DNSServer,
    start_proxy: Callable[..., Any],
    no_hostname_check: ssl.SSLContext,
) -> None:
    # Bound but not listening: the kernel answers SYN with RST, and the port stays ours.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        rules = [{"match": "dead.test", "target": f"127.0.0.1:{port}", "allow_private": True}]
        running = await start_proxy(dns_config(dns_server, 443, rules))

        await tls_handshake_refused(running.port, "dead.test", no_hostname_check)

        await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["decision"] == "allow"
    assert record["reason"] == "connect_failed"
    assert record["error"] == f"connect to 127.0.0.1:{port} failed: {ECONNREFUSED}"
    assert record["target"] is None
    assert dns_server.query_count("dead.test") == 0  # an IP target is never looked up


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_name_resolving_to_the_proxy_itself_is_refused_even_with_allow_private(
    dns_server: DNSServer,
    start_proxy: Callable[..., Any],
    no_hostname_check: ssl.SSLContext,
) -> None:
    # The classic loop: listen on P, forward to port P, and a name that resolves to us. The
    # listener port must be known before the config is built, so pick a free one; another
    # process may take it in between, so retry a few times.
    dns_server.add("loop.test", "A", "127.0.0.1")
    rules = [{"match": "loop.test", "allow_private": True}]
    for _attempt in range(5):
        port = _free_loopback_port()
        config = dns_config(dns_server, port, rules)
        config["listeners"][0]["port"] = port
        try:
            running = await start_proxy(config)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        break
    else:
        pytest.fail("no free loopback port for the proxy after 5 attempts")
    assert running.port == port

    await tls_handshake_refused(running.port, "loop.test", no_hostname_check)

    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log  # one record: the proxy never connected to itself
    assert record["decision"] == "deny"
    assert record["reason"] == "ssrf_blocked"
    # allow_private is already set and cannot lift this refusal, so no hint to set it.
    assert record["error"] == (
        "loop.test resolves only to refused addresses: 127.0.0.1 (the proxy's own listen address)"
    )


# ------------------------------------------------------------------------------------------
# Client access lists


async def test_denied_client_is_closed_without_reading(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    running = await start_proxy(proxy_config(tls_backend.port, clients={"deny": ["127.0.0.0/8"]}))
    # A blocking connect + send completes before the proxy even accepts (the handshake is
    # done by the kernel's backlog), so the hello is sitting unread when the proxy decides.
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=5)
    try:
        sock.sendall(capture("python-ssl"))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise
    try:
        # Reset, not EOF: the proxy closed with the hello still unread, so it read nothing.
        assert await closed_by_proxy(stream) == "reset"
    finally:
        await trio.aclose_forcefully(stream)

    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["decision"] == "deny"
    assert record["reason"] == "denied_client"
    assert record["error"] == "client 127.0.0.1 is in clients.deny (127.0.0.0/8)"
    assert record["sni"] is None
    assert record["bytes_to_upstream"] == 0
    assert tls_backend.connections == 0
