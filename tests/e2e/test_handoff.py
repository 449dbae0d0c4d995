"""A connection after the hand-off, in every mode: no task of its own (issue 14).

In kernel mode, once both sockets are in the sockhash, the connection's handler task returns;
the forwarder's shared hang-up watch ends the connection (FIN or RST passed on, idle timeout,
shutdown) and calls the handler's cleanup, which closes the sockets and writes the access-log
line. In copy and splice mode the forwarder's relay does the same once the connection is
connected, moving the bytes as well. These tests hold open many connections and count the Trio
tasks of the run, then end them each way with exact bytes on both ends and in the access log.
``test_connection_ends.py`` races the same ends hundreds of times; here the point is that no
task is left behind to do it.

The clients and the backend are driven from the test's own task, one step after the other (a
connection moves its bytes in the kernel meanwhile), so every task counted is the proxy's.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
from proxytest import client_hello, receive_exactly, wait_for

from trio_sni.forward.kernel import KernelForwarder

EMPTY = {"sock_hash": 0, "targets": 0, "peer": 0, "progress": 0}
SIOCOUTQ = 0x5411


@attrs.define(eq=False)
class Conn:
    """One connection through the proxy: the client's end, the backend's end, and the bytes
    each side was sent."""

    number: int
    client: trio.SocketStream
    server: trio.SocketStream
    hello: bytes
    to_upstream: int = 0
    to_client: int = 0

    @property
    def name(self) -> str:
        return f"c{self.number:04}.handoff.test"


@pytest.fixture(params=[pytest.param("kernel", marks=pytest.mark.bpf), "splice", "copy"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def kernel_config(backend_port: int, mode: str = "kernel", **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": backend_port}],
        "rules": [{"suffix": "handoff.test", "target": "127.0.0.1", "allow_private": True}],
        "log": {"access_log": None},
        "fallback_mode": "none",
        "forwarding": {"mode": mode},
        "limits": {"per_client_rate": 0, "per_client_connections": 0},
    }
    config.update(overrides)
    return config


def tasks_living() -> int:
    return trio.lowlevel.current_statistics().tasks_living


def forwarder_of(running: Any) -> KernelForwarder:
    forwarder = running.proxy.context.forwarder
    assert isinstance(forwarder, KernelForwarder), forwarder
    return forwarder


#: Every connection a test opened, closed when it ends (also when it fails).
OPENED: list[trio.SocketStream] = []


@pytest.fixture(autouse=True)
def close_what_was_opened() -> Iterator[None]:
    yield
    for stream in OPENED:  # after the Trio run: close the fds, not Trio's sockets
        fd = stream.socket.detach()
        if fd != -1:
            os.close(fd)
    OPENED.clear()


async def open_connections(
    running: Any, backend: trio.socket.SocketType, count: int, start: int = 0
) -> list[Conn]:
    """``count`` connections, each with a first exchange both ways (so each is forwarding)."""
    conns = []
    for number in range(start, start + count):
        client = await trio.open_tcp_stream("127.0.0.1", running.port)
        OPENED.append(client)
        conn = Conn(number, client, client, b"")
        conn.hello = client_hello(conn.name)
        await client.send_all(conn.hello)
        sock, _ = await backend.accept()
        conn.server = trio.SocketStream(sock)
        OPENED.append(conn.server)
        assert await receive_exactly(conn.server, len(conn.hello)) == conn.hello
        conn.to_upstream = len(conn.hello)
        await exchange(conn, up=100 + number, down=200 + number)
        conns.append(conn)
    return conns


async def exchange(conn: Conn, *, up: int, down: int) -> None:
    """``up`` bytes client → backend and ``down`` bytes back, each checked exactly."""
    if up:
        data = bytes([conn.number % 251]) * up
        await conn.client.send_all(data)
        assert await receive_exactly(conn.server, up) == data
        conn.to_upstream += up
    if down:
        data = bytes([conn.number % 241]) * down
        await conn.server.send_all(data)
        assert await receive_exactly(conn.client, down) == data
        conn.to_client += down


async def read_eof(stream: trio.SocketStream) -> None:
    assert await stream.receive_some(1) == b""


async def read_reset(stream: trio.SocketStream) -> None:
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some(65536)  # nothing was left to read: the reset


async def reset_after_acked(stream: trio.SocketStream) -> None:
    """Close with an RST once the peer (the proxy) has acknowledged everything sent."""
    await wait_for(
        lambda: not struct.unpack("i", fcntl.ioctl(stream.socket.fileno(), SIOCOUTQ, b"\0" * 4))[0]
    )
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@pytest.fixture
async def backend() -> Any:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    with sock:
        yield sock


def check_records(running: Any, conns: list[Conn], reason: str) -> None:
    mode = running.proxy.context.forwarder.mode
    by_name = {r["sni"]: r for r in running.access_log}
    for conn in conns:
        record = by_name[conn.name]
        got = (
            record["reason"],
            record["mode"],
            record["bytes_to_upstream"],
            record["bytes_to_client"],
        )
        assert got == (reason, mode, conn.to_upstream, conn.to_client), record


async def assert_nothing_left(running: Any) -> None:
    ctx = running.proxy.context
    await wait_for(lambda: not ctx.live and not ctx.handed_off, timeout=10)
    if ctx.forwarder.mode == "kernel":
        forwarder = forwarder_of(running)
        assert not forwarder.registered
        assert forwarder.plane.entries() == EMPTY
        assert not forwarder.live


async def test_handed_off_connections_have_no_task_and_end_each_way_with_exact_counts(
    mode: str, start_proxy: Callable[..., Any], backend: trio.socket.SocketType
) -> None:
    running = await start_proxy(kernel_config(backend.getsockname()[1], mode))
    # The shared watch task starts with the first connection.
    first = await open_connections(running, backend, 1)
    before = tasks_living()
    per_ending = 40
    conns = await open_connections(running, backend, 4 * per_ending, start=1)
    handed_off = running.proxy.context.handed_off
    assert len(handed_off) == 1 + 4 * per_ending
    if mode == "kernel":
        assert forwarder_of(running).registered == 1 + 4 * per_ending
    assert tasks_living() == before  # 160 more connections, not one more task

    fin_client = conns[:per_ending]
    fin_upstream = conns[per_ending : 2 * per_ending]
    rst_client = conns[2 * per_ending : 3 * per_ending]
    rst_upstream = conns[3 * per_ending :]
    for conn in fin_client:
        # The client half-closes; the backend answers after its EOF, then closes too.
        await conn.client.send_eof()
        await read_eof(conn.server)
        await exchange(conn, up=0, down=300)
        await conn.server.send_eof()
        await read_eof(conn.client)
    for conn in fin_upstream:
        await conn.server.send_eof()
        await read_eof(conn.client)
        await exchange(conn, up=300, down=0)
        await conn.client.send_eof()
        await read_eof(conn.server)
    for conn in rst_client:
        # What the client sent before its RST reaches the backend, then the RST.
        await conn.client.send_all(b"r" * 50)
        conn.to_upstream += 50
        await reset_after_acked(conn.client)
        assert await receive_exactly(conn.server, 50) == b"r" * 50
        await read_reset(conn.server)
    for conn in rst_upstream:
        await conn.server.send_all(b"R" * 70)
        conn.to_client += 70
        await reset_after_acked(conn.server)
        assert await receive_exactly(conn.client, 70) == b"R" * 70
        await read_reset(conn.client)
    await wait_for(lambda: len(running.access_log) == 4 * per_ending, timeout=10)
    check_records(running, fin_client + fin_upstream, "normal")
    check_records(running, rst_client, "client_reset")
    check_records(running, rst_upstream, "upstream_reset")
    for conn in conns:
        conn.client.socket.close()
        conn.server.socket.close()
    await wait_for(lambda: len(handed_off) == 1, timeout=10)
    assert tasks_living() <= before
    first[0].client.socket.close()
    first[0].server.socket.close()
    await assert_nothing_left(running)


async def test_idle_handed_off_connections_time_out_with_exact_counts(
    mode: str, start_proxy: Callable[..., Any], backend: trio.socket.SocketType
) -> None:
    running = await start_proxy(kernel_config(backend.getsockname()[1], mode, timeouts={"idle": 1}))
    conns = await open_connections(running, backend, 30)
    # Handed off, or (the first, on a slow machine) timed out already.
    assert len(running.proxy.context.handed_off) + len(running.access_log) == 30
    with trio.fail_after(10):
        for conn in conns:
            # The proxy closes both sockets: a FIN each way, nothing lost.
            await read_eof(conn.client)
            await read_eof(conn.server)
    await wait_for(lambda: len(running.access_log) == 30, timeout=5)
    check_records(running, conns, "idle_timeout")
    for conn in conns:
        conn.client.socket.close()
        conn.server.socket.close()
    await assert_nothing_left(running)


async def test_shutdown_ends_handed_off_connections_at_the_drain_deadline(
    mode: str, start_proxy: Callable[..., Any], backend: trio.socket.SocketType
) -> None:
    """In-process twin of the CLI's SIGTERM test: handed-off connections wait for the drain
    deadline like the others, then end with reason ``shutdown`` and exact counts."""
    running = await start_proxy(
        kernel_config(backend.getsockname()[1], mode, timeouts={"drain": 1})
    )
    conns = await open_connections(running, backend, 50)
    forwarder = running.proxy.context.forwarder
    started = trio.current_time()
    running.proxy.shutdown()
    # One connection finishes by itself within the deadline: its reason is its own.
    finished, rest = conns[0], conns[1:]
    await finished.client.send_eof()
    await read_eof(finished.server)
    await finished.server.send_eof()
    await read_eof(finished.client)
    with trio.fail_after(5):
        for conn in rest:
            await read_eof(conn.client)
            await read_eof(conn.server)
    assert trio.current_time() - started >= 0.9
    await wait_for(lambda: len(running.access_log) == 50, timeout=5)
    check_records(running, [finished], "normal")
    check_records(running, rest, "shutdown")
    for conn in conns:
        conn.client.socket.close()
        conn.server.socket.close()
    if mode == "kernel":
        await wait_for(lambda: forwarder.plane.closed, timeout=10)
    assert not running.proxy.context.live


@pytest.mark.bpf
async def test_a_worker_at_its_fd_limit_stops_accepting_until_a_connection_ends(
    nursery: trio.Nursery, backend: trio.socket.SocketType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers share the listening socket: one that is full leaves new clients in the backlog
    for the others (here there are none, so the client waits) instead of refusing them."""
    from trio_sni import server
    from trio_sni.sansio.config_load import load_config

    records: list[dict[str, object]] = []
    proxy = server.Proxy(
        load_config(kernel_config(backend.getsockname()[1])), access_log=records.append, worker=0
    )
    [listener] = await nursery.start(proxy.serve)
    running = attrs.make_class("Running", ["port", "proxy"])(
        listener.socket.getsockname()[1], proxy
    )
    # Room for a few connections: each takes four fds of this process (both ends of both),
    # and the kernel hands out the lowest free fd.
    lowest_free = os.dup(0)
    os.close(lowest_free)
    limit = lowest_free + server.FD_HEADROOM + 12
    monkeypatch.setattr(server.resource, "getrlimit", lambda _which: (limit, limit))
    conns: list[Conn] = []
    for number in range(20):
        client = await trio.open_tcp_stream("127.0.0.1", running.port)
        OPENED.append(client)
        hello = client_hello(f"c{number:04}.handoff.test")
        await client.send_all(hello)
        with trio.move_on_after(0.5):
            sock, _ = await backend.accept()
            OPENED.append(trio.SocketStream(sock))
            conns.append(Conn(number, client, trio.SocketStream(sock), hello))
            continue
        break  # this one waits in the backlog
    else:
        raise AssertionError("the proxy never stopped accepting")
    assert 1 <= len(conns) < 20
    conns[0].client.socket.close()
    conns[0].server.socket.close()
    with trio.fail_after(5):
        sock, _ = await backend.accept()  # accepted once a connection ended, and routed
    OPENED.append(trio.SocketStream(sock))
    assert not [r for r in records if r["reason"] == "fd_limit"]
    proxy.shutdown()
