"""The XDP guard in front of a real proxy, on a veth pair into a namespace the test creates.

The proxy runs in this namespace, bound to the host end of the veth, with the guard attached
there; clients run inside the namespace (``ns.socket()``), from addresses the test adds to the
far end. A blocked client never completes a handshake (its SYN is dropped before the TCP
stack: the proxy's accept counter does not move), an allowed one gets a real TLS answer from
the backend, a reload changes the lists without detaching, a SYN flood from one source is
held to its bucket while another source connects, and QUIC gets a port unreachable. After
every test the interface has no XDP program left.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio
import trio_sni_loader as loader
from netns import VethNamespace, ip, veth_namespace, xdp_prog_on
from prometheus_client import generate_latest
from proxytest import drain
from statusclient import metric_samples, sample

from trio_sni.accel.xdp import XdpGuard
from trio_sni.features import XdpFeature
from trio_sni.sansio.config import Clients, XdpConfig
from trio_sni.sansio.config_load import load_config
from trio_sni.server import Proxy
from trio_sni.status import ebpf_status_document

pytestmark = pytest.mark.bpf

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
#: How long a blocked client waits for its handshake: a SYN that passed would be answered in
#: well under a millisecond on a veth pair; the first SYN retransmission comes after 1 s.
BLOCKED_WAIT = 1.0


@pytest.fixture
def ns() -> Iterator[VethNamespace]:
    """The namespace, with extra client addresses .3 and .4 (and ::3) beside .2 (and ::2)."""
    with veth_namespace(0) as ns:
        for address in (v4(ns, 3), v4(ns, 4)):
            ip("addr", "add", f"{address}/24", "dev", ns.peer_if, netns=ns.name)
        ip("addr", "add", f"{v6(ns, 3)}/64", "dev", ns.peer_if, "nodad", netns=ns.name)
        yield ns


def v4(ns: VethNamespace, host: int) -> str:
    return ns.peer_v4.rsplit(".", 1)[0] + f".{host}"


def v6(ns: VethNamespace, host: int) -> str:
    return ns.peer_v6.rsplit(":", 1)[0] + f":{host}"


def guarded_config(
    ns: VethNamespace, backend_port: int, *, clients: dict[str, Any], **xdp: Any
) -> dict[str, Any]:
    return {
        "listeners": [
            {"host": ns.host_v4, "port": 0, "target_port": backend_port},
            {"host": ns.host_v6, "port": 0, "target_port": backend_port},
        ],
        "rules": [{"suffix": "bench.test", "allow_private": True}],
        "resolver": {"hosts": {"bench.test": ["127.0.0.1"]}},
        "clients": clients,
        "log": {"access_log": None},
        "ebpf": {
            "sockmap": {"enabled": False},
            "xdp": {"enabled": True, "interface": ns.host_if, **xdp},
        },
    }


def xdp_links_on(ifindex: int) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["bpftool", "-j", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return [
        link
        for link in json.loads(out or "[]")
        if link.get("type") == "xdp" and link.get("ifindex") == ifindex
    ]


@asynccontextmanager
async def running_proxy(config: dict[str, Any], ns: VethNamespace) -> AsyncIterator[Proxy]:
    """The proxy for the ``async with`` block; afterwards nothing is attached to the veth."""
    proxy = Proxy(load_config(config), access_log=lambda record: None)
    ifindex = socket.if_nametoindex(ns.host_if)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            proxy.shutdown()
    assert xdp_prog_on(ns.host_if) is None
    assert xdp_links_on(ifindex) == []


def port_for(proxy: Proxy, family: int) -> tuple[str, int]:
    for listener in proxy.listeners:
        if listener.socket.family == family:
            host, port = listener.socket.getsockname()[:2]
            return host, port
    raise AssertionError("no listener of that family")


async def connect_from(ns: VethNamespace, source: str, proxy: Proxy) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = trio.socket.from_stdlib_socket(ns.socket(family))
    try:
        await sock.bind((source, 0))
        await sock.connect(port_for(proxy, family))
    except BaseException:
        sock.close()
        raise
    return sock


async def tls_get_from(ns: VethNamespace, source: str, proxy: Proxy, ctx: ssl.SSLContext) -> bytes:
    with trio.fail_after(10):
        sock = await connect_from(ns, source, proxy)
        tls = trio.SSLStream(trio.SocketStream(sock), ctx, server_hostname="bench.test")
        try:
            await tls.send_all(REQUEST)
            return await drain(tls)
        finally:
            await trio.aclose_forcefully(tls)


async def handshake_fails(ns: VethNamespace, source: str, proxy: Proxy) -> bool:
    """True if ``source`` cannot complete a TCP handshake with the proxy in BLOCKED_WAIT."""
    with trio.move_on_after(BLOCKED_WAIT) as waited:
        sock = await connect_from(ns, source, proxy)
        sock.close()
    return waited.cancelled_caught


def accepted(proxy: Proxy) -> int:
    return proxy.metrics.finished + len(proxy.context.live)


def scrape(proxy: Proxy) -> Callable[..., float | None]:
    samples = metric_samples(generate_latest(proxy.metrics.registry).decode())
    return lambda name, **labels: sample(samples, name, **labels)


# ------------------------------------------------------------------------------------------


async def test_blocked_clients_never_reach_accept_and_allowed_ones_work(
    ns: VethNamespace, tls_backend: Any, client_context: ssl.SSLContext
) -> None:
    allowed4, allowed6, unlisted4, unlisted6, denied4 = (
        ns.peer_v4,
        ns.peer_v6,
        v4(ns, 3),
        v6(ns, 3),
        v4(ns, 4),
    )
    # .4 is both allowed (the /31) and denied: deny wins.
    clients = {
        "allow": [f"{ns.peer_v4}/32", f"{denied4}/31", f"{ns.peer_v6}/128"],
        "deny": [f"{denied4}/32"],
    }
    async with running_proxy(guarded_config(ns, tls_backend.port, clients=clients), ns) as proxy:
        status: Any = ebpf_status_document(proxy)
        assert status["features"]["xdp"] == "active"
        assert status["details"]["xdp"]["mode"] == "native"  # veth has a native XDP driver
        assert status["details"]["xdp"]["interface"] == ns.host_if
        for source in (unlisted4, unlisted6, denied4):
            assert await handshake_fails(ns, source, proxy), source
        assert accepted(proxy) == 0
        for source in (allowed4, allowed6):
            response = await tls_get_from(ns, source, proxy, client_context)
            assert response.endswith(b"hello from the backend\n")
        assert accepted(proxy) == 2
        metric = scrape(proxy)
        assert metric("trio_sni_ebpf_xdp_dropped_total", reason="not_allowed") >= 2
        assert metric("trio_sni_ebpf_xdp_dropped_total", reason="denied") >= 1
        assert metric("trio_sni_ebpf_xdp_passed_total") >= 10  # two whole TLS exchanges
        assert metric("trio_sni_ebpf_feature_state", feature="xdp", state="active") == 1
        doc: Any = ebpf_status_document(proxy)
        denied = metric("trio_sni_ebpf_xdp_dropped_total", reason="denied")
        assert doc["counters"]["xdp_dropped_denied"] == denied
        assert doc["maps"]["xdp_allow"] == {"entries": 3, "max_entries": 65536}
        # Other traffic on the interface passes: blocked sources reach another port.
        for source, host in ((unlisted4, ns.host_v4), (unlisted6, ns.host_v6)):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with (
                socket.create_server((host, 0), family=family) as other,
                ns.socket(family) as client,
            ):
                client.settimeout(BLOCKED_WAIT)
                client.bind((source, 0))
                client.connect(other.getsockname()[:2])
                other.accept()[0].close()


async def test_reload_changes_the_lists_without_detaching(
    ns: VethNamespace, tls_backend: Any, client_context: ssl.SSLContext
) -> None:
    first = guarded_config(ns, tls_backend.port, clients={"allow": [f"{ns.peer_v4}/32"]})
    async with running_proxy(first, ns) as proxy:
        [edge_guard] = [f for f in proxy.features if isinstance(f, XdpFeature)]
        assert edge_guard.guard is not None
        link = edge_guard.guard.link_info()
        prog = xdp_prog_on(ns.host_if)
        assert prog is not None
        assert await handshake_fails(ns, v4(ns, 3), proxy)
        await tls_get_from(ns, ns.peer_v4, proxy, client_context)

        swapped = {"allow": [f"{v4(ns, 3)}/32"], "deny": [f"{ns.peer_v4}/32"]}
        second = guarded_config(ns, tls_backend.port, clients=swapped)
        proxy.reload(load_config(second))
        assert (await tls_get_from(ns, v4(ns, 3), proxy, client_context)).endswith(
            b"hello from the backend\n"
        )
        assert await handshake_fails(ns, ns.peer_v4, proxy)
        assert edge_guard.guard.link_info() == link
        assert xdp_prog_on(ns.host_if) == prog
        assert accepted(proxy) == 2


# The flood: raw SYNs from one source, sent from inside the namespace at a steady pace (a
# child process, so this process's Trio loop keeps serving the other client meanwhile).
FLOOD_SCRIPT = r"""
import socket, struct, sys, time
src, dst = sys.argv[1], sys.argv[2]
port, count, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
def csum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.bind((src, 0))
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, 20)
start = time.monotonic()
for i in range(count):
    header = struct.pack("!HHIIBBHHH", 20000 + i % 40000, port, i, 0, 5 << 4, 0x02, 64240, 0, 0)
    header = header[:16] + struct.pack("!H", csum(pseudo + header)) + header[18:]
    s.sendto(header, (dst, 0))
    pause = start + seconds * (i + 1) / count - time.monotonic()
    if pause > 0:
        time.sleep(pause)
print(time.monotonic() - start)
"""


async def test_a_syn_flood_is_held_to_its_bucket_while_another_source_connects(
    ns: VethNamespace, tls_backend: Any, client_context: ssl.SSLContext
) -> None:
    rate, burst, count, seconds = 20, 10, 2000, 1.5
    config = guarded_config(
        ns,
        tls_backend.port,
        clients={},
        flood_guard={"per_source_rate": rate, "per_source_burst": burst},
    )
    flooder, other = v4(ns, 4), ns.peer_v4
    async with running_proxy(config, ns) as proxy:
        host, port = port_for(proxy, socket.AF_INET)
        elapsed: list[float] = []

        async def flood() -> None:
            result = await trio.run_process(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns.name,
                    sys.executable,
                    "-c",
                    FLOOD_SCRIPT,
                    flooder,
                    host,
                    str(port),
                    str(count),
                    str(seconds),
                ],
                capture_stdout=True,
                capture_stderr=True,
            )
            elapsed.append(float(result.stdout))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await trio.sleep(seconds / 3)  # in the middle of the flood
            response = await tls_get_from(ns, other, proxy, client_context)
            assert response.endswith(b"hello from the backend\n")
        counters = proxy.acceleration_status().counters
        admitted = count - counters["xdp_dropped_syn_flood"]
        # Generous bounds: the bucket admits `burst` at once and `rate` per second after.
        assert burst <= admitted <= burst + rate * elapsed[0] + 5, (admitted, elapsed)
        assert counters["xdp_syn_offenders"] == 1
        assert accepted(proxy) == 1  # the flood's SYNs never became connections


@contextmanager
def xdp_on_peer(ns: VethNamespace) -> Iterator[None]:
    """An XDP program (the guard with nothing to guard: it passes everything) on the far end.

    veth delivers native-mode XDP_TX frames to its peer promptly only when the peer has an XDP
    program too (``veth_xdp_flush`` schedules the peer's NAPI only then); otherwise they wait
    for the peer's next packet. A real NIC transmits them itself.
    """
    with XdpGuard.load(XdpConfig(), Clients(), []) as passer:
        link = ns.call(lambda: loader.attach_xdp(passer.program, ns.peer_if, mode="native"))
        with link:
            yield


@pytest.mark.parametrize("mode", ["native", "generic"])
async def test_quic_gets_a_port_unreachable_at_once(
    ns: VethNamespace, tls_backend: Any, mode: str
) -> None:
    config = guarded_config(ns, tls_backend.port, clients={}, reject_quic=True, mode=mode)
    with ExitStack() as stack:
        if mode == "native":
            stack.enter_context(xdp_on_peer(ns))
        await quic_is_refused(config, ns)


async def quic_is_refused(config: dict[str, Any], ns: VethNamespace) -> None:
    mode = config["ebpf"]["xdp"]["mode"]
    async with running_proxy(config, ns) as proxy:
        status: Any = ebpf_status_document(proxy)
        assert status["details"]["xdp"]["mode"] == mode
        for family, host in ((socket.AF_INET, ns.host_v4), (socket.AF_INET6, ns.host_v6)):
            sock = trio.socket.from_stdlib_socket(ns.socket(family, socket.SOCK_DGRAM))
            with sock:
                await sock.connect((host, 443))
                started = time.monotonic()
                with trio.fail_after(2):
                    # The port unreachable comes back as an error on the next call after the
                    # send: a fresh socket has no pending error, so the send itself succeeds.
                    await sock.send(b"\xc0" + bytes(1199))  # a QUIC Initial's size
                    with pytest.raises(ConnectionRefusedError):
                        await sock.recv(2048)
                assert time.monotonic() - started < 1
        counters = proxy.acceleration_status().counters
        assert counters["xdp_quic_answered"] == counters["xdp_dropped_quic"] == 2


async def test_udp_to_a_quic_listener_passes_while_other_quic_is_refused(
    ns: VethNamespace, tls_backend: Any
) -> None:
    """With ``reject_quic`` on, the ``quic`` listener's port is the proxy's own: a datagram to
    it reaches the listener (an unreadable one: the proxy logs it, answers nothing, and no
    port unreachable comes back), while UDP to 443 is still answered at once."""
    config = guarded_config(ns, tls_backend.port, clients={}, reject_quic=True, mode="generic")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((ns.host_v4, 0))
        quic_port = probe.getsockname()[1]
    config["listeners"].append({"host": ns.host_v4, "port": quic_port, "protocol": "quic"})
    config["workers"] = 1
    records: list[dict[str, object]] = []
    proxy = Proxy(load_config(config), access_log=records.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            status: Any = ebpf_status_document(proxy)
            assert status["details"]["xdp"]["quic_ports"] == [quic_port]
            for port in (quic_port, 443):
                sock = trio.socket.from_stdlib_socket(ns.socket(socket.AF_INET, socket.SOCK_DGRAM))
                with sock:
                    await sock.connect((ns.host_v4, port))
                    await sock.send(b"\xc0" + bytes(1199))
                    if port == 443:
                        with trio.fail_after(2), pytest.raises(ConnectionRefusedError):
                            await sock.recv(2048)
                        continue
                    with trio.move_on_after(0.5) as quiet:
                        await sock.recv(2048)  # neither an answer nor a port unreachable
                    assert quiet.cancelled_caught
                    assert [r["reason"] for r in records] in (
                        ["not_quic_initial"],
                        ["malformed_hello"],
                    )
            counters = proxy.acceleration_status().counters
            assert counters["xdp_quic_answered"] == 1
        finally:
            proxy.shutdown()
    assert xdp_prog_on(ns.host_if) is None


async def test_no_such_interface_is_a_logged_degradation(
    tls_backend: Any, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": tls_backend.port}],
        "rules": [{"suffix": "bench.test", "allow_private": True}],
        "resolver": {"hosts": {"bench.test": ["127.0.0.1"]}},
        "clients": {"deny": ["192.0.2.0/24"]},
        "log": {"access_log": None},
        "ebpf": {
            "sockmap": {"enabled": False},
            "xdp": {"enabled": True, "interface": "tsni-none0"},
        },
    }
    caplog.set_level(logging.WARNING, "trio_sni.xdp")
    proxy = Proxy(load_config(config), access_log=lambda record: None)
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(proxy.serve)
        port = listener.socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(stream, client_context, server_hostname="bench.test")
        await tls.send_all(REQUEST)
        assert (await drain(tls)).endswith(b"hello from the backend\n")
        await trio.aclose_forcefully(tls)
        doc: Any = ebpf_status_document(proxy)
        assert doc["features"]["xdp"] == "unavailable"
        reason = doc["reasons"]["xdp"]
        assert "no network interface named 'tsni-none0'" in reason
        proxy.shutdown()
    warnings = [r.getMessage() for r in caplog.records if r.name == "trio_sni.xdp"]
    assert len(warnings) == 1
    assert "tsni-none0" in warnings[0]


WITHOUT_PRIVILEGE_SCRIPT = r"""
import json, logging, sys
import trio
from trio_sni.sansio.config_load import load_config
from trio_sni.server import Proxy
from trio_sni.status import ebpf_status_document

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

async def main():
    proxy = Proxy(load_config(json.loads(sys.argv[1])), access_log=lambda record: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        doc = ebpf_status_document(proxy)
        proxy.shutdown()
    print(json.dumps([doc["features"]["xdp"], doc["reasons"].get("xdp")]))

trio.run(main)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_privilege_the_proxy_starts_and_says_why_once(ns: VethNamespace) -> None:
    config = guarded_config(ns, 9, clients={"deny": ["192.0.2.0/24"]})
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--",
            sys.executable,
            "-c",
            WITHOUT_PRIVILEGE_SCRIPT,
            json.dumps(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    state, reason = json.loads(result.stdout)
    assert state == "unavailable"
    assert ns.host_if in reason, reason
    assert "CAP_BPF" in reason, reason
    warnings = [line for line in result.stderr.splitlines() if "trio_sni.xdp" in line]
    assert len(warnings) == 1, result.stderr
    assert reason in warnings[0], result.stderr
    assert xdp_prog_on(ns.host_if) is None
