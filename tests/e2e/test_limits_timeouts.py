"""Timeouts and connection limits through a running proxy on loopback.

The timeout tests run on trio's autojump clock (pytest-trio's ``autojump_clock`` fixture) and
assert exact virtual times. That works with real loopback sockets because loopback delivers a
TCP segment (and completes a handshake) inside the sending syscall, and trio only jumps the
clock when its I/O poll finds nothing ready: every exchange takes zero virtual time, and the
clock moves only when everyone waits for a deadline. The one thing this relies on is the
kernel processing loopback packets synchronously, which it does unless softirq work is pushed
to ksoftirqd under extreme load.

Every wait on the autojump clock sits under a ``fail_after`` in virtual seconds, so a hang
fails at once (virtual time jumps straight to that deadline) instead of stalling the run.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from proxytest import drain, serve_tcp, wait_for

HELLO = (Path(__file__).parent.parent / "data" / "hellos" / "python-ssl.bin").read_bytes()
REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
RESPONSE_BODY = b"hello from the backend\n"


@pytest.fixture
def proxy_config(proxy_config: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """The e2e config in copy mode: these tests check times exactly on the autojump clock.

    Only the copy forwarder sees every byte; the kernel forwarder polls byte counters on timers,
    which the autojump clock would skip through (its idle timeout is tested in
    tests/e2e/test_kernel_forwarding.py).
    """

    def build(backend_port: int, **overrides: Any) -> dict[str, Any]:
        overrides.setdefault("ebpf", {"sockmap": {"enabled": False}})
        return proxy_config(backend_port, **overrides)

    return build


# ------------------------------------------------------------------------------------------
# Helpers


async def tls_get(
    port: int, name: str, ctx: ssl.SSLContext, *, local_address: str | None = None
) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        with trio.fail_after(30):
            await tls.send_all(REQUEST)
            return await drain(tls)
    finally:
        await trio.aclose_forcefully(tls)


async def tls_refused(
    port: int, name: str, ctx: ssl.SSLContext, *, local_address: str | None = None
) -> None:
    """A real TLS client the proxy turns away: the handshake ends with the connection closed."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        with trio.fail_after(30), pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()
    finally:
        await trio.aclose_forcefully(tls)


async def closed_by_proxy(stream: trio.SocketStream) -> None:
    """Wait until the proxy closes a silent client's connection without sending anything."""
    with trio.fail_after(30):
        assert await stream.receive_some(65536) == b""


@attrs.define
class EchoBackend:
    """A TLS server that echoes and keeps the connection open until the peer closes it."""

    port: int
    closed_at: list[float] = attrs.Factory(list)


@pytest.fixture
async def echo_backend(nursery: trio.Nursery, server_context: ssl.SSLContext) -> EchoBackend:
    closed_at: list[float] = []

    async def echo(stream: trio.SocketStream) -> None:
        # https_compatible: the proxy closes without close_notify; that is an EOF here.
        tls = trio.SSLStream(stream, server_context, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
            while data := await tls.receive_some(65536):
                await tls.send_all(data)
            closed_at.append(trio.current_time())
        except (trio.BrokenResourceError, ssl.SSLError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    return EchoBackend(port=await serve_tcp(nursery, echo), closed_at=closed_at)


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A 127.0.0.1 port that silently drops SYNs: ``listen(0)`` with its one queue slot taken,
    so Linux drops further SYNs and a connect hangs, like an unroutable address."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.socket())
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port: int = sock.getsockname()[1]
        filler = stack.enter_context(socket.socket())
        filler.connect(("127.0.0.1", port))
        yield port


# ------------------------------------------------------------------------------------------
# Timeouts (autojump clock, exact)


async def test_trickled_hello_is_cut_at_the_total_deadline(
    autojump_clock: trio.testing.MockClock,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    running = await start_proxy(proxy_config(tls_backend.port, timeouts={"client_hello": 10}))
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    opened = trio.current_time()
    sent: list[float] = []
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    # One byte of a real hello every 3 s: each read comes well within 10 s,
                    # so only a deadline on the whole hello (not per read) ends this.
                    for byte in HELLO:
                        await stream.send_all(bytes([byte]))
                        sent.append(trio.current_time() - opened)
                        await trio.sleep(3)

                nursery.start_soon(trickle)
                assert await stream.receive_some(65536) == b""
                closed_at = trio.current_time()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)

    assert closed_at == opened + 10
    assert sent == [0, 3, 6, 9]
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["reason"] == "hello_timeout"
    assert record["decision"] == "deny"
    assert record["error"] == "no complete ClientHello within 10 s"
    assert record["duration"] == 10.0
    assert record["sni"] is None
    assert tls_backend.connections == 0


async def test_silent_connection_closes_exactly_idle_seconds_after_the_last_byte(
    autojump_clock: trio.testing.MockClock,
    echo_backend: EchoBackend,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    running = await start_proxy(proxy_config(echo_backend.port, timeouts={"idle": 30}))
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    opened = trio.current_time()
    tls = trio.SSLStream(
        stream, client_context, server_hostname="bench.test", https_compatible=True
    )
    try:
        with trio.fail_after(300):
            await tls.send_all(b"ping")
            assert await tls.receive_some(65536) == b"ping"
            await trio.sleep(7)  # the idle deadline moves with every byte, either way
            await tls.send_all(b"ping again")
            assert await tls.receive_some(65536) == b"ping again"
            last_byte = trio.current_time()
            # Now silent, TLS connection open: the proxy must close it at last_byte + 30.
            assert await tls.receive_some(65536) == b""
            closed_at = trio.current_time()
            await wait_for(lambda: len(running.access_log) == 1)
    finally:
        await trio.aclose_forcefully(tls)

    assert last_byte == opened + 7
    assert closed_at == last_byte + 30
    assert echo_backend.closed_at == [closed_at]  # the upstream side was closed at once too
    [record] = running.access_log
    assert record["reason"] == "idle_timeout"
    assert record["decision"] == "allow"
    assert record["duration"] == 37.0
    assert record["target"] == f"127.0.0.1:{echo_backend.port}"
    assert record["bytes_to_upstream"] > 0
    assert record["bytes_to_client"] > 0


@pytest.mark.skipif(
    sys.platform != "linux", reason="black holes rely on Linux dropping SYNs to a full backlog"
)
async def test_connect_to_a_black_hole_fails_at_the_connect_timeout(
    autojump_clock: trio.testing.MockClock,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    with black_hole() as port:
        config = proxy_config(port, timeouts={"connect": 10, "client_hello": 5})
        running = await start_proxy(config)
        opened = trio.current_time()
        # The hello arrives at once; then the proxy waits for the upstream, not the client,
        # so the 5 s hello deadline is over and only the 10 s connect timeout applies.
        await tls_refused(running.port, "bench.test", client_context)
        closed_at = trio.current_time()
        await wait_for(lambda: len(running.access_log) == 1)

    assert closed_at == opened + 10
    [record] = running.access_log
    assert record["decision"] == "allow"
    assert record["reason"] == "connect_failed"
    assert record["error"] == f"connect to 127.0.0.1:{port} timed out after 10.0 s"
    assert record["duration"] == 10.0
    assert record["target"] is None


# ------------------------------------------------------------------------------------------
# Connection limits


async def test_per_client_connection_limit(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    running = await start_proxy(
        proxy_config(tls_backend.port, limits={"per_client_connections": 1})
    )
    first = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        await wait_for(lambda: len(running.proxy.context.live) == 1)  # accepted, slot taken
        # A second connection from the same client while the first is open: refused.
        second = await trio.open_tcp_stream("127.0.0.1", running.port)
        try:
            await closed_by_proxy(second)
        finally:
            await trio.aclose_forcefully(second)
        # Another client (127.0.0.2 is loopback too) has its own count.
        other = await tls_get(running.port, "bench.test", client_context, local_address="127.0.0.2")
        assert other.endswith(RESPONSE_BODY)
    finally:
        await trio.aclose_forcefully(first)
    await wait_for(lambda: len(running.proxy.context.live) == 0)

    # The first connection's slot is free again.
    assert (await tls_get(running.port, "bench.test", client_context)).endswith(RESPONSE_BODY)

    await wait_for(lambda: len(running.access_log) == 4)
    [refused] = running.records_for("too_many_connections")
    assert refused["decision"] == "deny"
    assert refused["client"].startswith("127.0.0.1:")
    assert refused["error"] == "client 127.0.0.1 has 1 live connection (per_client_connections = 1)"
    served = running.records_for("normal")
    assert sorted(r["client"].split(":")[0] for r in served) == ["127.0.0.1", "127.0.0.2"]
    # The first connection never sent a hello; closing it ends it as a short read.
    [first_record] = running.records_for("malformed_hello")
    assert first_record["error"] == (
        "connection closed after 0 bytes, before the ClientHello was complete"
    )
    assert tls_backend.connections == 2


async def test_per_client_rate_and_burst(
    autojump_clock: trio.testing.MockClock,
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    limits = {"per_client_rate": 1, "per_client_burst": 2}
    running = await start_proxy(proxy_config(tls_backend.port, limits=limits))
    start = trio.current_time()

    # The burst: two new connections at once, the third at the same instant is refused.
    for _ in range(2):
        assert (await tls_get(running.port, "bench.test", client_context)).endswith(RESPONSE_BODY)
    await tls_refused(running.port, "bench.test", client_context)
    # Half a token later: still refused (a refusal takes no token). Another client is not.
    await trio.sleep_until(start + 0.5)
    await tls_refused(running.port, "bench.test", client_context)
    other = await tls_get(running.port, "bench.test", client_context, local_address="127.0.0.2")
    assert other.endswith(RESPONSE_BODY)
    # Exactly one second after the burst the bucket holds one token again.
    await trio.sleep_until(start + 1)
    assert (await tls_get(running.port, "bench.test", client_context)).endswith(RESPONSE_BODY)
    assert trio.current_time() == start + 1

    await wait_for(lambda: len(running.access_log) == 6)
    # A refusal is logged at once, a served connection when it has ended: a line of each
    # made at about the same moment may come in either order, so compare the lines as a set.
    reasons = sorted((r["client"].split(":")[0], r["reason"]) for r in running.access_log)
    assert reasons == [
        ("127.0.0.1", "normal"),
        ("127.0.0.1", "normal"),
        ("127.0.0.1", "normal"),
        ("127.0.0.1", "rate_limited"),
        ("127.0.0.1", "rate_limited"),
        ("127.0.0.2", "normal"),
    ]
    for record in running.records_for("rate_limited"):
        assert record["decision"] == "deny"
        assert record["error"] == "client 127.0.0.1 exceeded per_client_rate (1/s, burst 2)"
        assert record["sni"] is None
    assert tls_backend.connections == 4


async def test_global_max_connections(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    running = await start_proxy(proxy_config(tls_backend.port, max_connections=1))
    first = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        await wait_for(lambda: len(running.proxy.context.live) == 1)
        # Global: a different client is refused too.
        await tls_refused(running.port, "bench.test", client_context, local_address="127.0.0.2")
    finally:
        await trio.aclose_forcefully(first)
    await wait_for(lambda: len(running.proxy.context.live) == 0)

    assert (await tls_get(running.port, "bench.test", client_context)).endswith(RESPONSE_BODY)

    await wait_for(lambda: len(running.access_log) == 3)
    [refused] = running.records_for("max_connections")
    assert refused["decision"] == "deny"
    assert refused["client"].startswith("127.0.0.2:")
    assert refused["error"] == "the proxy has 1 live connection (max_connections = 1)"
    assert tls_backend.connections == 1
