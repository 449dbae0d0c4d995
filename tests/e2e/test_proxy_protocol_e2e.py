"""PROXY protocol both ways, through a running proxy: exact bytes, then real peers.

Sending (a rule's ``proxy_protocol``): a raw loopback backend records exactly what arrives,
and nginx (``listen ... proxy_protocol``) answers with the client address it understood.
Accepting (a listener's ``accept_proxy_protocol``): exact v1/v2 headers written by the test,
and haproxy (``send-proxy`` / ``send-proxy-v2``) in front of the proxy. The real client binds
127.0.0.2, so its address differs from haproxy's (127.0.0.1) and the tests can tell them apart.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from daemons import free_port, require, running_daemon
from proxytest import drain, serve_tcp, wait_for

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
BODY = b"hello from the backend\n"
CLIENT_IP = "127.0.0.2"  # any 127/8 address is loopback on Linux

NGINX_CONFIG = """\
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "{answer}";
        }}
    }}
}}
"""

#: What nginx answers: the addresses it read from the PROXY header, and the Host.
NGINX_ANSWER = (
    "client=$proxy_protocol_addr:$proxy_protocol_port "
    "server=$proxy_protocol_server_addr:$proxy_protocol_server_port host=$host\\n"
)

HAPROXY_CONFIG = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{port}
    default_backend proxy
backend proxy
    server trio_sni 127.0.0.1:{target} {send}
"""


@pytest.fixture
def proxy_config(
    proxy_config_in_mode: Callable[..., dict[str, Any]],
) -> Callable[..., dict[str, Any]]:
    return proxy_config_in_mode  # every test here runs in each forwarding mode


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def start_nginx(stack: ExitStack, tmp_path: Path) -> int:
    nginx = require("nginx")
    port = free_port()
    work = tmp_path / f"nginx-{port}"
    work.mkdir()
    config = NGINX_CONFIG.format(work=work, port=port, answer=NGINX_ANSWER)
    (work / "nginx.conf").write_text(config, "utf-8")
    stack.enter_context(
        running_daemon(
            [nginx, "-c", str(work / "nginx.conf"), "-p", str(work), "-e", str(work / "error.log")],
            port=port,
            log=work / "stdout.log",
        )
    )
    return port


def start_haproxy(stack: ExitStack, tmp_path: Path, target: int, send: str) -> int:
    haproxy = require("haproxy")
    port = free_port()
    work = tmp_path / f"haproxy-{port}"
    work.mkdir()
    config = work / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, target=target, send=send), "utf-8")
    stack.enter_context(
        running_daemon([haproxy, "-f", str(config), "-db"], port=port, log=work / "stdout.log")
    )
    return port


async def recording_backend(
    nursery: trio.Nursery,
    received: list[bytes],
    done: Callable[[bytes], bool],
    host: str = "127.0.0.1",
) -> int:
    """A raw TCP backend: keeps what each connection sends until ``done(data)``, then closes."""

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(5):
            while not done(data):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        received.append(data)
        await trio.aclose_forcefully(stream)

    return await serve_tcp(nursery, handler, host)


async def connect_from(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port from ``host`` (to tell clients apart on loopback)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((host, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def tls_get_over(stream: trio.SocketStream, name: str, ctx: ssl.SSLContext) -> bytes:
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        await tls.send_all(REQUEST)
        return await drain(tls)
    finally:
        await trio.aclose_forcefully(tls)


def hello_bytes() -> bytes:
    """A real ClientHello for bench.test, made by Python's ssl module in memory."""
    ctx = ssl.create_default_context()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), (out := ssl.MemoryBIO()), server_hostname="bench.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


# --- sending: exact bytes at the target ----------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_header_sent_to_target_exact_bytes(
    version: str,
    host: str,
    nursery: trio.Nursery,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    hello = hello_bytes()
    received: list[bytes] = []
    backend = await recording_backend(nursery, received, lambda data: data.endswith(hello), host)
    config = proxy_config(backend)
    config["listeners"][0]["host"] = host
    config["resolver"]["hosts"]["bench.test"] = [host]
    config["rules"][0]["proxy_protocol"] = version
    running = await start_proxy(config)
    client = await trio.open_tcp_stream(host, running.port)
    try:
        client_port = client.socket.getsockname()[1]
        await client.send_all(hello)
        await wait_for(lambda: len(received) == 1)
    finally:
        await trio.aclose_forcefully(client)
    [data] = received
    ports = client_port.to_bytes(2, "big") + running.port.to_bytes(2, "big")
    if version == "v1":
        proto = "TCP4" if host == "127.0.0.1" else "TCP6"
        expected = f"PROXY {proto} {host} {host} {client_port} {running.port}\r\n".encode()
    elif host == "127.0.0.1":
        expected = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([127, 0, 0, 1]) * 2 + ports
    else:
        loopback6 = bytes(15) + b"\x01"
        expected = b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" + loopback6 * 2 + ports
    assert data[: len(expected)] == expected
    assert data[len(expected) :].startswith(hello)


# --- accepting: exact bytes from a "load balancer" -----------------------------------------


def v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    return (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
        + socket.inet_aton(src[0])
        + socket.inet_aton(dst[0])
        + src[1].to_bytes(2, "big")
        + dst[1].to_bytes(2, "big")
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_accepted_header_is_the_client(
    version: str,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
    forwarding_mode: str,
) -> None:
    config = proxy_config(tls_backend.port)
    config["listeners"][0]["accept_proxy_protocol"] = True
    config["clients"] = {"deny": ["198.51.100.0/24"]}
    running = await start_proxy(config)
    for source in (("203.0.113.7", 40001), ("198.51.100.9", 40002)):
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        if version == "v1":
            header = f"PROXY TCP4 {source[0]} 192.0.2.1 {source[1]} 443\r\n".encode()
        else:
            header = v2_header(source, ("192.0.2.1", 443))
        await stream.send_all(header)
        if source[0].startswith("203."):
            assert (await tls_get_over(stream, "bench.test", client_context)).endswith(BODY)
        else:
            assert await drain(stream) == b""  # refused before the hello: closed
            await trio.aclose_forcefully(stream)
    await wait_for(lambda: len(running.access_log) == 2)
    allowed, denied = running.access_log
    assert (allowed["client"], allowed["reason"]) == ("203.0.113.7:40001", "normal")
    assert allowed["mode"] == forwarding_mode
    assert str(allowed["peer"]).startswith("127.0.0.1:")
    assert (denied["client"], denied["reason"]) == ("198.51.100.9:40002", "denied_client")


@pytest.mark.parametrize(
    ("first", "reason", "error"),
    [
        # (the hello's random bytes may hold a quote, which changes how repr() quotes them)
        (None, "no_proxy_header", "no PROXY protocol header: the connection starts with b"),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            "bad_proxy_header",
            "malformed PROXY v1 header b'PROXY TCP4 1.2.3.4 5.6.7.8 1\\r\\n'",
        ),
        (
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
            "bad_proxy_header",
            "PROXY v2 header announces 65535 bytes of addresses and TLVs, more than the 4096 "
            "accepted",
        ),
    ],
    ids=["missing", "malformed-v1", "oversized-v2"],
)
async def test_missing_or_bad_header_is_refused_with_a_log_line(
    first: bytes | None,
    reason: str,
    error: str,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = proxy_config(tls_backend.port)
    config["listeners"][0]["accept_proxy_protocol"] = True
    running = await start_proxy(config)
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        await stream.send_all(hello_bytes() if first is None else first)
        with pytest.raises(trio.BrokenResourceError) if first is None else _no_error():
            await drain(stream)
    finally:
        await trio.aclose_forcefully(stream)
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["reason"] == reason
    assert str(record["error"]).startswith(error)
    assert "refused 127.0.0.1:" in caplog.text
    assert error[:40] in caplog.text
    assert tls_backend.connections == 0


class _no_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --- real peers -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_sees_the_real_client_through_an_http_listener(
    version: str,
    tmp_path: Path,
    daemons: ExitStack,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    forwarding_mode: str,
) -> None:
    nginx = start_nginx(daemons, tmp_path)
    config = proxy_config(nginx)
    config["listeners"][0]["protocol"] = "http"
    config["rules"][0]["proxy_protocol"] = version
    running = await start_proxy(config)
    stream = await connect_from(CLIENT_IP, running.port)
    try:
        client_port = stream.socket.getsockname()[1]
        # Keep-alive, and close only after the answer: with "Connection: close" nginx can
        # answer and close before the kernel forwarder registers the pair, which then (rightly)
        # falls back to copy for that connection, and the mode under test would not be seen.
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n")
        response = b""
        with trio.fail_after(10):
            while not response.endswith(b"host=bench.test\n"):
                response += await stream.receive_some(65536)
    finally:
        await trio.aclose_forcefully(stream)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["mode"] == forwarding_mode
    assert response.endswith(
        f"client={CLIENT_IP}:{client_port} server=127.0.0.1:{running.port} "
        "host=bench.test\n".encode()
    )


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
async def test_behind_haproxy_the_client_address_comes_from_its_header(
    send: str,
    tmp_path: Path,
    daemons: ExitStack,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
    forwarding_mode: str,
) -> None:
    config = proxy_config(tls_backend.port)
    config["listeners"][0]["accept_proxy_protocol"] = True
    running = await start_proxy(config)
    haproxy = start_haproxy(daemons, tmp_path, running.port, send)
    stream = await connect_from(CLIENT_IP, haproxy)
    client_port = stream.socket.getsockname()[1]
    assert (await tls_get_over(stream, "bench.test", client_context)).endswith(BODY)
    # haproxy also relays the readiness probe's connection (from 127.0.0.1); find ours.
    client = f"{CLIENT_IP}:{client_port}"
    await wait_for(lambda: any(r["client"] == client for r in running.access_log))
    [record] = [r for r in running.access_log if r["client"] == client]
    assert str(record["peer"]).startswith("127.0.0.1:")
    assert (record["reason"], record["mode"]) == ("normal", forwarding_mode)
    assert tls_backend.received == [REQUEST]


async def test_chain_haproxy_to_proxy_to_nginx_keeps_the_client(
    tmp_path: Path,
    daemons: ExitStack,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    """haproxy (v2) -> trio-sni (accepts, then sends v1) -> nginx: nginx sees the client."""
    nginx = start_nginx(daemons, tmp_path)
    config = proxy_config(nginx)
    config["listeners"][0].update(protocol="http", accept_proxy_protocol=True)
    config["rules"][0]["proxy_protocol"] = "v1"
    running = await start_proxy(config)
    haproxy = start_haproxy(daemons, tmp_path, running.port, "send-proxy-v2")
    stream = await connect_from(CLIENT_IP, haproxy)
    try:
        client_port = stream.socket.getsockname()[1]
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n")
        response = await drain(stream)
    finally:
        await trio.aclose_forcefully(stream)
    assert response.endswith(
        f"client={CLIENT_IP}:{client_port} server=127.0.0.1:{haproxy} host=bench.test\n".encode()
    )


async def test_header_and_hello_share_one_total_deadline(
    autojump_clock: trio.testing.MockClock,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    """A slow header eats into the ClientHello's time: one deadline covers both."""
    config = proxy_config(tls_backend.port, timeouts={"client_hello": 10})
    config["listeners"][0]["accept_proxy_protocol"] = True
    running = await start_proxy(config)
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443\r\n"
    results = []
    # 1: half a header, then nothing. 2: nothing for 6 s, then the header and half a hello:
    # the hello gets only the 4 s left of the one deadline, not 10 s of its own.
    for first, later in ((b"PROXY TCP4 ", b""), (b"", header + b"\x16\x03\x01")):
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        opened = trio.current_time()
        try:
            with trio.fail_after(60):
                if first:
                    await stream.send_all(first)
                await trio.sleep(6)
                if later:
                    await stream.send_all(later)
                results.append((await drain(stream), trio.current_time() - opened))
        finally:
            await trio.aclose_forcefully(stream)
    assert results == [(b"", 10), (b"", 10)]
    await wait_for(lambda: len(running.access_log) == 2)
    header_late, hello_late = running.access_log
    assert (header_late["reason"], header_late["error"]) == (
        "proxy_header_timeout",
        "no complete PROXY protocol header within 10 s",
    )
    assert (hello_late["reason"], hello_late["client"]) == ("hello_timeout", "203.0.113.7:40001")
    assert hello_late["duration"] == 10.0


async def test_limits_count_the_address_from_the_header(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    """All three connections come from 127.0.0.1; the limiter sees two different clients."""
    config = proxy_config(
        tls_backend.port, limits={"per_client_burst": 1, "per_client_rate": 0.001}
    )
    config["listeners"][0]["accept_proxy_protocol"] = True
    running = await start_proxy(config)
    for count, source in enumerate(("203.0.113.7", "203.0.113.7", "203.0.113.8"), start=1):
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        try:
            await stream.send_all(f"PROXY TCP4 {source} 192.0.2.1 40000 443\r\n".encode())
            await stream.send_eof()  # no hello: the allowed ones end as malformed_hello
            await drain(stream)
        finally:
            await trio.aclose_forcefully(stream)
        await wait_for(lambda n=count: len(running.access_log) == n)  # one at a time, in order
    assert [(r["client"], r["reason"]) for r in running.access_log] == [
        ("203.0.113.7:40000", "malformed_hello"),
        ("203.0.113.7:40000", "rate_limited"),
        ("203.0.113.8:40000", "malformed_hello"),
    ]
    assert "203.0.113.7 exceeded per_client_rate" in str(running.access_log[1]["error"])


async def test_connections_waiting_for_a_header_count_against_max_connections(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    config = proxy_config(tls_backend.port, max_connections=2)
    config["listeners"][0]["accept_proxy_protocol"] = True
    running = await start_proxy(config)
    silent = [await trio.open_tcp_stream("127.0.0.1", running.port) for _ in range(2)]
    try:
        await wait_for(lambda: len(running.proxy.context.live) == 2)
        third = await trio.open_tcp_stream("127.0.0.1", running.port)
        try:
            assert await drain(third) == b""
        finally:
            await trio.aclose_forcefully(third)
        await wait_for(lambda: len(running.access_log) == 1)
        [record] = running.access_log
        assert record["reason"] == "max_connections"
        assert record["error"] == (
            "the proxy has 2 connections, some still waiting for their PROXY header "
            "(max_connections = 2)"
        )
    finally:
        for stream in silent:
            await trio.aclose_forcefully(stream)


async def test_only_listed_load_balancers_may_send_headers(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = proxy_config(tls_backend.port)
    config["listeners"][0].update(accept_proxy_protocol=True, proxy_protocol_from=["127.0.0.2/32"])
    running = await start_proxy(config)
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443\r\n"
    trusted = await trio.open_tcp_stream("127.0.0.1", running.port, local_address="127.0.0.2")
    await trusted.send_all(header)
    assert (await tls_get_over(trusted, "bench.test", client_context)).endswith(BODY)
    untrusted = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        await untrusted.send_all(header)
        with contextlib.suppress(trio.BrokenResourceError):  # unread header: maybe a reset
            assert await drain(untrusted) == b""
    finally:
        await trio.aclose_forcefully(untrusted)
    await wait_for(lambda: len(running.access_log) == 2)
    # The two lines come in whichever order the connections ended.
    by_reason = {r["reason"]: r for r in running.access_log}
    assert set(by_reason) == {"normal", "untrusted_proxy"}
    ok, refused = by_reason["normal"], by_reason["untrusted_proxy"]
    assert ok["client"] == "203.0.113.7:40001"
    assert str(refused["client"]).startswith("127.0.0.1:")  # its header was never read
    assert refused["error"] == (
        "127.0.0.1 may not send PROXY headers to 127.0.0.1:0: it is not in the listener's "
        "proxy_protocol_from"
    )
    assert tls_backend.connections == 1
    assert "accepts PROXY headers from anyone" not in caplog.text


async def test_a_listener_open_to_any_sender_is_warned_about(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = proxy_config(tls_backend.port)
    config["listeners"][0]["accept_proxy_protocol"] = True
    await start_proxy(config)
    assert (
        "listener 127.0.0.1:0 accepts PROXY headers from anyone who reaches it, who can then "
        "claim any client address: set its proxy_protocol_from to your load balancers' "
        "networks" in caplog.text
    )
