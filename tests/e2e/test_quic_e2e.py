"""QUIC passthrough with real QUIC endpoints (aioquic's client and server, on loopback):
routed by the name in the client's Initial packets, relayed byte-exact, logged once a flow."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import quicproxy
import trio
import trustme
from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived
from aioquic.quic.packet import QuicProtocolVersion
from prometheus_client import generate_latest
from proxytest import wait_for
from quicproxy import MODES, AioquicServer, StartProxy, in_mode
from quictest import crypto, handshake_message, initial, padded
from statusclient import metric_samples, sample

from trio_sni.sansio.config_load import load_config

NAME = "quic.test"


class Echo(QuicConnectionProtocol):
    """Answers every stream with what it carried."""

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data, event.end_stream)
            self.transmit()


class QuicServer(AioquicServer):
    """An aioquic echo server for :data:`NAME` (``retry``, ``versions``: as
    :class:`quicproxy.AioquicServer`)."""

    def __init__(
        self, ca: trustme.CA, tmp: Path, *, retry: bool = False, versions: list[int] | None = None
    ) -> None:
        super().__init__(ca, tmp, NAME, ["echo"], Echo, retry=retry, versions=versions)


def echo_through(
    port: int,
    ca: trustme.CA,
    data: bytes,
    *,
    version: int = QuicProtocolVersion.VERSION_1,
    also: tuple[int, ...] = (),
    alpn: list[str] | None = None,
    name: str = NAME,
    timeout: float = 30,
    host: str = "127.0.0.1",
) -> bytes:
    """One QUIC connection to ``host``:``port`` naming :data:`NAME`: send ``data`` on a
    stream, read the answer (a thread of its own: aioquic's client runs on asyncio)."""

    async def main() -> bytes:
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=alpn or ["echo"],
            server_name=name,
            original_version=version,
            supported_versions=[version, *also],
        )
        configuration.load_verify_locations(cadata=ca.cert_pem.bytes())
        async with connect(host, port, configuration=configuration) as client:
            reader, writer = await client.create_stream()
            writer.write(data)
            writer.write_eof()
            return await reader.read()

    return asyncio.run(asyncio.wait_for(main(), timeout))


@pytest.fixture(scope="module")
def quic_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def quic_server(quic_ca: trustme.CA, tmp_path: Path) -> Any:
    with QuicServer(quic_ca, tmp_path) as server:
        yield server


def quic_config(backend_port: int, **overrides: Any) -> dict[str, Any]:
    """:func:`quicproxy.quic_config` for :data:`NAME`, and ``socks.test`` through a SOCKS5
    upstream (which QUIC cannot follow)."""
    config = quicproxy.quic_config(NAME, backend_port, socks5={"address": "127.0.0.1:9"})
    config["rules"].append({"match": "socks.test", "via": "socks5"})
    config.update(overrides)
    return config


@pytest.fixture
async def start_quic_proxy(nursery: trio.Nursery) -> StartProxy:
    return quicproxy.quic_proxy_starter(nursery)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "version", [QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2], ids=["v1", "v2"]
)
async def test_a_quic_connection_is_routed_by_name_and_relayed_byte_exact(
    start_quic_proxy: Callable[..., Any],
    quic_server: QuicServer,
    quic_ca: trustme.CA,
    version: int,
    mode: str,
) -> None:
    proxy, port, records = await start_quic_proxy(in_mode(quic_config(quic_server.port), mode))
    data = os.urandom(1 << 20)
    got = await trio.to_thread.run_sync(lambda: echo_through(port, quic_ca, data, version=version))
    assert got == data
    samples = metric_samples(generate_latest(proxy.metrics.registry).decode())
    assert sample(samples, "trio_sni_quic_flows_active") == 1  # until its idle timeout
    [live] = proxy.context.live.values()  # its live counts (/connections), the kernel's too
    await wait_for(lambda: live.counters.to_client > len(data), timeout=0.5)
    await wait_for(lambda: len(records) == 1, timeout=10)  # the flow ends when idle (1 s)
    [record] = records
    assert record["transport"] == "quic"
    assert record["mode"] == ("kernel" if mode == "kernel" else "udp")
    assert (record["sni"], record["alpn"], record["decision"]) == (NAME, ["echo"], "allow")
    assert record["reason"] == "idle_timeout"
    assert record["target"] == f"127.0.0.1:{quic_server.port}"
    assert record["bytes_to_upstream"] > len(data)  # the stream, QUIC's framing and the AEAD tags
    assert record["bytes_to_client"] > len(data)
    assert record["datagrams_to_upstream"] > 100
    assert record["datagrams_to_client"] > 100
    samples = metric_samples(generate_latest(proxy.metrics.registry).decode())
    assert sample(samples, "trio_sni_quic_flows_active") == 0
    for direction in ("to_upstream", "to_client"):
        got_count = sample(samples, "trio_sni_quic_datagrams_total", direction=direction)
        assert got_count == record[f"datagrams_{direction}"]
    if mode == "kernel":
        # Nearly every datagram was the kernel's; the proxy passed the first flight and what
        # came before the sockets entered the sockhash.
        redirected = sample(samples, "trio_sni_ebpf_sockmap_quic_redirected_total")
        total = record["datagrams_to_upstream"] + record["datagrams_to_client"]
        assert redirected >= total - 20, (redirected, total)
        kernel = proxy.forwarding.plan.for_mode("kernel")
        assert kernel.quic is not None  # type: ignore[attr-defined]
        assert set(kernel.quic.entries().values()) == {0}  # type: ignore[attr-defined]
    assert not proxy.context.live
    assert not proxy.quic_listeners[0].flows


@pytest.mark.bpf
async def test_flows_the_kernel_relays_at_once_share_one_count_sweep(
    start_quic_proxy: Callable[..., Any], quic_server: QuicServer, quic_ca: trustme.CA
) -> None:
    """Five flows relayed by the kernel at the same time: each is byte-exact and logged with
    its own counts, one task reads all their counts, and nothing is left registered."""
    proxy, port, records = await start_quic_proxy(in_mode(quic_config(quic_server.port), "kernel"))
    [listener] = proxy.quic_listeners
    sent = [os.urandom(100_000 + i) for i in range(5)]
    got: dict[int, bytes] = {}

    async def one(i: int) -> None:
        got[i] = await trio.to_thread.run_sync(lambda: echo_through(port, quic_ca, sent[i]))

    async with trio.open_nursery() as clients:
        for i in range(5):
            clients.start_soon(one, i)
    assert [got[i] for i in range(5)] == sent
    assert len(listener._in_kernel) == 5  # until their idle timeout
    assert proxy.acceleration_status().maps["quic_sockmap"].entries == 5  # /ebpf/status
    await wait_for(lambda: len(records) == 5, timeout=10)
    assert {r["mode"] for r in records} == {"kernel"}
    assert sorted(r["bytes_to_client"] > len(sent[0]) for r in records) == [True] * 5
    assert not listener._in_kernel
    assert proxy.acceleration_status().maps["quic_sockmap"].entries == 0
    kernel = proxy.forwarding.plan.for_mode("kernel")
    assert set(kernel.quic.entries().values()) == {0}  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", MODES)
async def test_a_stop_lets_the_flows_the_kernel_relays_drain_and_ends_the_others(
    start_quic_proxy: Callable[..., Any], quic_server: QuicServer, quic_ca: trustme.CA, mode: str
) -> None:
    """The proxy stops accepting while a client's QUIC connection is open. A flow the kernel
    relays has a socket of its own, connected to the client: it drains like a TCP connection,
    so the same connection's next request is still answered and the flow ends when idle. A
    flow the proxy relays needs the listening socket, so it ends at once (reason shutdown)."""
    proxy, port, records = await start_quic_proxy(in_mode(quic_config(quic_server.port), mode))
    first_done, go_on = threading.Event(), threading.Event()

    def client() -> tuple[bytes, bytes | None]:
        async def echo(connection: Any, data: bytes) -> bytes:
            reader, writer = await connection.create_stream()
            writer.write(data)
            writer.write_eof()
            answer: bytes = await reader.read()
            return answer

        async def main() -> tuple[bytes, bytes | None]:
            configuration = QuicConfiguration(
                is_client=True, alpn_protocols=["echo"], server_name=NAME, idle_timeout=2.0
            )
            configuration.load_verify_locations(cadata=quic_ca.cert_pem.bytes())
            async with connect("127.0.0.1", port, configuration=configuration) as connection:
                one = await echo(connection, b"before the stop")
                first_done.set()
                await asyncio.get_running_loop().run_in_executor(None, go_on.wait)
                try:
                    two = await asyncio.wait_for(echo(connection, b"after the stop"), 3)
                except TimeoutError:
                    two = None
                return one, two

        return asyncio.run(main())

    answers: list[tuple[bytes, bytes | None]] = []

    async def run_client() -> None:
        answers.append(await trio.to_thread.run_sync(client))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_client)
        await trio.to_thread.run_sync(first_done.wait)
        proxy.shutdown()
        await wait_for(lambda: proxy.quic_listeners[0].sock.fileno() == -1, timeout=5)
        go_on.set()
    [(one, two)] = answers
    assert one == b"before the stop"
    await wait_for(lambda: len(records) == 1, timeout=10)
    if mode == "kernel":
        assert two == b"after the stop"
        assert records[0]["reason"] == "idle_timeout"
    else:
        assert two in (None, b"")  # no answer, or the connection closed (port unreachable)
        assert records[0]["reason"] == "shutdown"


@pytest.mark.parametrize("mode", MODES)
async def test_a_flow_on_an_ipv6_listener_is_relayed_byte_exact(
    start_quic_proxy: Callable[..., Any], quic_server: QuicServer, quic_ca: trustme.CA, mode: str
) -> None:
    """A client on ::1 (the flow's address has four parts; in kernel mode its own socket is
    an IPv6 one, bound beside the listener's)."""
    config = in_mode(quic_config(quic_server.port), mode)
    config["listeners"] = [{"host": "::1", "port": 0, "protocol": "quic"}]
    _proxy, port, records = await start_quic_proxy(config)
    data = os.urandom(200_000)
    got = await trio.to_thread.run_sync(lambda: echo_through(port, quic_ca, data, host="::1"))
    assert got == data
    await wait_for(lambda: len(records) == 1, timeout=10)
    [record] = records
    assert str(record["client"]).startswith("[::1]:")
    assert record["mode"] == ("kernel" if mode == "kernel" else "udp")
    assert record["bytes_to_client"] > len(data)


async def test_a_server_that_asks_for_a_retry_gets_its_token_back_through_the_flow(
    start_quic_proxy: Callable[..., Any], quic_ca: trustme.CA, tmp_path: Path
) -> None:
    """The server's Retry (a new connection ID and a token) reaches the client through the
    flow, and the client's second Initial (new DCID, token) reaches the server through the
    same flow: one connection, one log line, byte-exact."""
    with QuicServer(quic_ca, tmp_path, retry=True) as server:
        proxy, port, records = await start_quic_proxy(quic_config(server.port))
        data = os.urandom(1 << 16)
        got = await trio.to_thread.run_sync(lambda: echo_through(port, quic_ca, data))
        assert got == data
        await wait_for(lambda: len(records) == 1, timeout=10)
    [record] = records
    assert (record["sni"], record["decision"], record["reason"]) == (NAME, "allow", "idle_timeout")
    assert record["bytes_to_client"] > len(data)
    assert not proxy.quic_listeners[0].flows


async def test_a_server_that_answers_with_version_negotiation_gets_the_retried_initial(
    start_quic_proxy: Callable[..., Any], quic_ca: trustme.CA, tmp_path: Path
) -> None:
    """The client starts in QUIC v2, the server speaks only v1: its Version Negotiation
    packet reaches the client through the flow, and the client's new v1 Initial reaches the
    server through the same flow. One connection, one log line, byte-exact."""
    v1, v2 = QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2
    with QuicServer(quic_ca, tmp_path, versions=[v1]) as server:
        proxy, port, records = await start_quic_proxy(quic_config(server.port))
        got = await trio.to_thread.run_sync(
            lambda: echo_through(port, quic_ca, b"negotiated", version=v2, also=(v1,))
        )
        assert got == b"negotiated"
        await wait_for(lambda: len(records) == 1, timeout=10)
    [record] = records
    assert (record["sni"], record["decision"], record["reason"]) == (NAME, "allow", "idle_timeout")
    assert not proxy.quic_listeners[0].flows


async def test_a_hello_over_two_initial_packets_is_routed(
    start_quic_proxy: Callable[..., Any], quic_server: QuicServer, quic_ca: trustme.CA
) -> None:
    """A ClientHello that does not fit one Initial (a long ALPN list stands in for Chrome's
    post-quantum key share) is put together from both."""
    _proxy, port, records = await start_quic_proxy(quic_config(quic_server.port))
    alpn = ["echo", *(f"x-{i:02}-" + "a" * 60 for i in range(24))]
    got = await trio.to_thread.run_sync(lambda: echo_through(port, quic_ca, b"ping", alpn=alpn))
    assert got == b"ping"
    await wait_for(lambda: len(records) == 1, timeout=10)
    assert records[0]["hello_size"] > 1200  # type: ignore[operator]


@pytest.mark.parametrize(
    ("name", "reason"),
    [("denied.test", "denied_domain"), ("socks.test", "quic_via_socks5")],
)
async def test_a_refused_flow_is_dropped_and_logged_once(
    start_quic_proxy: Callable[..., Any],
    quic_server: QuicServer,
    quic_ca: trustme.CA,
    name: str,
    reason: str,
) -> None:
    """The client gets nothing (it falls back to TCP); its retransmitted Initials make no
    second log line, and nothing reaches the backend."""
    _proxy, port, records = await start_quic_proxy(quic_config(quic_server.port))
    with pytest.raises((TimeoutError, ConnectionError)):
        await trio.to_thread.run_sync(
            lambda: echo_through(port, quic_ca, b"x", name=name, timeout=2.5)
        )
    await wait_for(lambda: len(records) == 1, timeout=10)
    [record] = records
    assert (record["sni"], record["decision"], record["reason"]) == (name, "deny", reason)
    assert record["datagrams_to_upstream"] == 0
    await trio.sleep(0.2)
    assert len(records) == 1


async def test_datagrams_that_start_no_quic_connection_make_no_flow(
    start_quic_proxy: Callable[..., Any], quic_server: QuicServer
) -> None:
    _proxy, port, records = await start_quic_proxy(quic_config(quic_server.port))
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.sendto(b"\x40" + bytes(100), ("127.0.0.1", port))  # a short header
        await sock.sendto(b"hello", ("127.0.0.1", port))
        await sock.sendto(b"\xc0" + bytes(40), ("127.0.0.1", port))  # a long header, garbage
        await wait_for(lambda: len(records) == 1, timeout=5)
    assert records[0]["reason"] in ("not_quic_initial", "malformed_hello", "quic_version")
    assert len(records) == 1


def x_test_initial() -> bytes:
    """A client's first datagram naming x.test (curl's captured ClientHello in a QUIC v1
    Initial built by the tests, padded to 1200 bytes)."""
    return padded(initial(crypto(0, handshake_message("curl.bin"))))


async def udp_sink(host: str = "127.0.0.1") -> trio.socket.SocketType:
    sink = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sink.bind((host, 0))
    return sink


async def received_by(sink: trio.socket.SocketType, wait: float) -> list[object]:
    """The senders of every datagram ``sink`` gets within ``wait`` seconds."""
    senders: list[object] = []
    with trio.move_on_after(wait):
        while True:
            _data, sender = await sink.recvfrom(65536)
            senders.append(sender)
    return senders


async def test_a_flood_of_new_flows_from_one_client_is_held_to_its_limit(
    start_quic_proxy: Callable[..., Any],
) -> None:
    """Ten new flows from one address (ten source ports) with per_client_connections 3:
    three are routed (the target gets three Initials, from three sockets of the proxy), seven
    are refused and logged at once, and nothing of theirs is sent on."""
    with await udp_sink() as sink:
        config = quic_config(0, limits={"per_client_connections": 3, "per_client_rate": 0})
        target = f"127.0.0.1:{sink.getsockname()[1]}"
        rule = {"match": "x.test", "target": target, "allow_private": True, "via": "direct"}
        config["rules"] = [rule]
        _proxy, port, records = await start_quic_proxy(config)
        clients = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10)]
        try:
            for client in clients:
                await client.connect(("127.0.0.1", port))
                await client.send(x_test_initial())
            senders = await received_by(sink, 0.5)
        finally:
            for client in clients:
                client.close()
        assert len(senders) == len(set(senders)) == 3
        refused = [r for r in records if r["reason"] == "too_many_connections"]
        assert len(refused) == 7
        assert all(r["datagrams_to_upstream"] == 0 for r in refused)
        await wait_for(lambda: len(records) == 10, timeout=10)  # the routed ones idle out


async def test_the_flow_table_holds_max_connections_and_refused_flows_make_room(
    start_quic_proxy: Callable[..., Any],
) -> None:
    """max_connections 3: garbage Initials from 20 source ports (a spoofed flood) keep at
    most 3 flows, each refused and logged; a real client still gets routed (the oldest refused
    flow makes room); with 3 routed flows, a fourth client's datagram is dropped and counted,
    not queued."""
    with await udp_sink() as sink:
        config = quic_config(0, max_connections=3, limits={"per_client_rate": 0})
        target = f"127.0.0.1:{sink.getsockname()[1]}"
        rule = {"match": "x.test", "target": target, "allow_private": True, "via": "direct"}
        config["rules"] = [rule]
        config["timeouts"] = {"quic_idle": 5}
        proxy, port, records = await start_quic_proxy(config)
        [listener] = proxy.quic_listeners
        sockets = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(24)]
        try:
            for sock in sockets[:20]:
                await sock.sendto(b"\xc0" + bytes(40), ("127.0.0.1", port))
                await trio.sleep(0.005)
                assert len(listener.flows) <= 3
            await wait_for(lambda: len(records) == 20, timeout=5)  # each refused once
            assert len(listener.flows) == len(listener.lingering) == 3
            for sock in sockets[20:23]:  # routed, one by one making room
                await sock.sendto(x_test_initial(), ("127.0.0.1", port))
            senders = await received_by(sink, 0.5)
            assert len(senders) == 3
            assert not listener.lingering
            await sockets[23].sendto(x_test_initial(), ("127.0.0.1", port))
            assert await received_by(sink, 0.3) == []
            assert proxy.context.quic_flows_dropped == 1
            samples = metric_samples(generate_latest(proxy.metrics.registry).decode())
            assert sample(samples, "trio_sni_quic_flows_dropped_total") == 1
        finally:
            for sock in sockets:
                sock.close()


async def test_a_destination_the_ssrf_guard_refuses_is_sent_no_datagram(
    start_quic_proxy: Callable[..., Any],
) -> None:
    """The rule's target is a loopback address without allow_private: refused, logged, and
    not one datagram reaches it (were the guard broken, the sink on that loopback address
    would get the Initial)."""
    with await udp_sink("127.0.0.2") as sink:
        config = quic_config(0)
        target = f"127.0.0.2:{sink.getsockname()[1]}"
        config["rules"] = [{"match": "x.test", "target": target, "via": "direct"}]
        _proxy, port, records = await start_quic_proxy(config)
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            await client.connect(("127.0.0.1", port))
            await client.send(x_test_initial())
            await wait_for(lambda: len(records) == 1, timeout=5)
            assert await received_by(sink, 0.3) == []
    [record] = records
    assert (record["sni"], record["decision"], record["reason"]) == (
        "x.test",
        "deny",
        "ssrf_blocked",
    )
    assert record["datagrams_to_upstream"] == 0


def test_a_quic_listener_with_workers_needs_a_fixed_port() -> None:
    config = quic_config(443)  # port 0
    config["workers"] = 2
    with pytest.raises(Exception, match="port other than 0"):
        load_config(config)
    config["listeners"][0]["port"] = 8443
    assert load_config(config).workers == 2


def test_with_two_workers_every_flow_stays_with_the_worker_that_routed_it(
    quic_server: QuicServer, quic_ca: trustme.CA, tmp_path: Path
) -> None:
    """Each worker has its own socket on the port (SO_REUSEPORT): a flow that landed on one
    worker would break if its later datagrams reached the other (it would drop them as not
    the start of a connection). Eight connections, each byte-exact, one log line each."""
    access_log = tmp_path / "access.log"
    port, proc, stderr = spawn_quic_proxy(
        tmp_path, quic_config(quic_server.port, workers=2), access_log=str(access_log)
    )
    try:
        _wait_for(lambda: "2 workers serving" in stderr.read_text() or proc.poll() is not None)
        data = os.urandom(1 << 16)
        for _ in range(8):
            assert echo_through(port, quic_ca, data) == data
        deadline = time.monotonic() + 15
        while len(records := _lines(access_log)) < 8:  # each flow ends when idle (1 s)
            assert time.monotonic() < deadline, records
            time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, stderr.read_text()
    assert {(r["transport"], r["decision"], r["reason"]) for r in records} == {
        ("quic", "allow", "idle_timeout")
    }
    assert {r["worker"] for r in records} <= {0, 1}


def test_sigusr2_hands_a_quic_listener_to_the_new_proxy(
    quic_server: QuicServer, quic_ca: trustme.CA, tmp_path: Path
) -> None:
    """The successor binds its own socket beside the old one (SO_REUSEPORT) instead of
    failing on the busy port; once the old proxy stops, QUIC connections reach the new one."""
    port, old, stderr = spawn_quic_proxy(tmp_path, quic_config(quic_server.port), access_log=None)
    successor = None
    try:
        listening = f"listening on 127.0.0.1:{port}/udp (quic)"
        _wait_for(lambda: listening in stderr.read_text() or old.poll() is not None)
        assert echo_through(port, quic_ca, b"before") == b"before"
        old.send_signal(signal.SIGUSR2)
        marker = "SIGUSR2: the new proxy (pid "
        _wait_for(lambda: marker in stderr.read_text() or old.poll() is not None)
        text = stderr.read_text()
        assert marker in text, text
        successor = int(text.split(marker)[1].split(")")[0])
        assert old.wait(15) == 0, stderr.read_text()
        assert echo_through(port, quic_ca, b"after") == b"after"
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
        if successor is not None:
            os.kill(successor, signal.SIGTERM)
            _wait_for(lambda: not os.path.exists(f"/proc/{successor}"))
    assert "ERROR" not in stderr.read_text()


def spawn_quic_proxy(
    tmp_path: Path, config: dict[str, Any], *, access_log: str | None
) -> tuple[int, subprocess.Popen[bytes], Path]:
    """``python -m trio_sni`` with ``config``'s listener on a free UDP port (a worker binds
    its own socket to it, so it cannot be 0); the port, the process and its stderr file."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    config["listeners"] = [{"host": "127.0.0.1", "port": port, "protocol": "quic"}]
    config["log"] = {"access_log": access_log, "level": "info"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trio_sni", "--config", str(path)], stderr=err
        )
    return port, proc, stderr


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_a_quic_listener_beside_a_tcp_one_on_the_same_port() -> None:
    tcp_and_udp = [
        {"host": "127.0.0.1", "port": 8443},
        {"host": "127.0.0.1", "port": 8443, "protocol": "quic"},
    ]
    config = load_config(quic_config(443, listeners=tcp_and_udp))
    assert [lst.protocol for lst in config.listeners] == ["tls", "quic"]
    assert config.listeners[1].target_port == 443


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {
                "listeners": [
                    {"host": "::1", "port": 0, "protocol": "quic", "accept_proxy_protocol": True}
                ]
            },
            "cannot take one",
        ),
    ],
)
def test_quic_listener_configs_that_cannot_work_are_refused(
    overrides: dict[str, Any], words: str
) -> None:
    with pytest.raises(Exception, match=words):
        load_config(quic_config(443, **overrides))
