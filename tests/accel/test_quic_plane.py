"""The QUIC kernel building block (docs/kernel-facts.md, facts 50 and 52) on real sockets on
127.0.0.1: the kernel steers a client's datagrams to a per-flow socket connected to it
(SO_REUSEPORT, no BPF), and ``quic_redirect.bpf.o`` (:class:`QuicPlane`) relays datagrams
between that socket and an upstream socket without Python reading either of them."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import trio_sni_loader as loader
from proxytest import loader_fds_opened_since
from trio_sni_loader.btf import Kind, parse_btf

from trio_sni.accel import layout, objects
from trio_sni.accel.quic_plane import QuicPlane
from trio_sni.accel.sockhash import socket_cookie

pytestmark = pytest.mark.bpf

TIMEOUT = 5.0
#: ``SO_RCVBUFFORCE`` (root): room for a whole burst in a test socket's receive queue.
SO_RCVBUFFORCE = 33
#: ``UDP_SEGMENT`` (``SOL_UDP``): the sender's GSO segment size.
UDP_SEGMENT = 103


def udp(address: tuple[str, int] = ("127.0.0.1", 0), *, reuseport: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(address)
        s.settimeout(TIMEOUT)
    except BaseException:
        s.close()
        raise
    return s


def queued(s: socket.socket) -> list[tuple[bytes, object]]:
    """Every datagram in ``s``'s receive queue now (non-blocking reads until ``EAGAIN``)."""
    out = []
    s.setblocking(False)
    try:
        while True:
            try:
                out.append(s.recvfrom(65536))
            except BlockingIOError:
                return out
    finally:
        s.settimeout(TIMEOUT)


def nothing_queued(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        s.settimeout(TIMEOUT)
    return False


class Flow:
    """A QUIC-like flow through a "proxy" on 127.0.0.1: ``listener`` (SO_REUSEPORT, not
    connected) got the client's first datagram; ``flow`` is the per-flow client-facing socket
    (same address and port, SO_REUSEPORT, connected to the client); ``upstream`` is connected
    to ``server``. The client is connected to the listener's address."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.listener = stack.enter_context(udp(reuseport=True))
        self.address = self.listener.getsockname()
        self.client = stack.enter_context(udp())
        self.server = stack.enter_context(udp())
        self.client.connect(self.address)
        self.client.send(b"first")
        data, peer = self.listener.recvfrom(2048)
        assert (data, peer) == (b"first", self.client.getsockname())
        self.flow = stack.enter_context(udp(self.address, reuseport=True))
        self.flow.connect(peer)
        self.upstream = stack.enter_context(udp())
        self.upstream.connect(self.server.getsockname())


@pytest.fixture
def plane() -> Iterator[QuicPlane]:
    before = loader.live_fds()
    with QuicPlane.load(max_flows=64) as p:
        yield p
    assert not loader_fds_opened_since(before)


def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def payload(i: int, size: int) -> bytes:
    """``size`` bytes that say which datagram they are (``size`` >= 1)."""
    head = i.to_bytes(4, "big")[-size:] if size < 4 else i.to_bytes(4, "big")
    return head + bytes((i + k) % 251 for k in range(size - len(head)))


# ------------------------------------------------------------------------------------------
# (a) Steering: a pure kernel fact, no BPF


def test_reuseport_steers_a_clients_datagrams_to_the_socket_connected_to_it() -> None:
    """The listener gets a client's first datagram; once a socket bound to the same address
    and port with SO_REUSEPORT is connected to that client, every later datagram of that client
    arrives there and none on the listener, while other clients still reach the listener."""
    for _round in range(50):
        with contextlib.ExitStack() as stack:
            listener = stack.enter_context(udp(reuseport=True))
            address = listener.getsockname()
            clients = [stack.enter_context(udp()) for _ in range(3)]
            stranger = stack.enter_context(udp())
            flows = []
            for client in clients:
                client.sendto(b"1", address)
                data, peer = listener.recvfrom(64)
                assert (data, peer) == (b"1", client.getsockname())
                flow = stack.enter_context(udp(address, reuseport=True))
                flow.connect(peer)
                flows.append(flow)
            for n in range(2, 11):
                for k, client in enumerate(clients):
                    client.sendto(b"%d:%d" % (k, n), address)
                stranger.sendto(b"s:%d" % n, address)
            for k, flow in enumerate(flows):
                got = [flow.recvfrom(64) for _ in range(2, 11)]
                assert got == [(b"%d:%d" % (k, n), clients[k].getsockname()) for n in range(2, 11)]
            got = [listener.recvfrom(64) for _ in range(2, 11)]
            assert got == [(b"s:%d" % n, stranger.getsockname()) for n in range(2, 11)]
            # Nothing else anywhere: a last datagram from the stranger comes after all of them.
            stranger.sendto(b"last", address)
            assert listener.recvfrom(64) == (b"last", stranger.getsockname())
            assert all(nothing_queued(s) for s in (listener, *flows))


def test_a_connected_socket_keeps_its_clients_datagrams_when_the_group_changes() -> None:
    """With workers, every worker's listener socket is in the reuseport group and a worker can
    be replaced: the group shrinks, then grows. A socket connected to a client keeps getting
    that client's datagrams throughout (a flow relayed by the kernel does not move)."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(udp(reuseport=True))
        address = first.getsockname()
        second = udp(address, reuseport=True)
        client = stack.enter_context(udp())
        flow = stack.enter_context(udp(address, reuseport=True))
        flow.connect(client.getsockname())
        client.sendto(b"before", address)
        second.close()  # a worker dies: the group shrinks
        client.sendto(b"between", address)
        third = stack.enter_context(udp(address, reuseport=True))  # its successor binds
        client.sendto(b"after", address)
        got = [flow.recvfrom(64)[0] for _ in range(3)]
        assert got == [b"before", b"between", b"after"]
        assert nothing_queued(first)
        assert nothing_queued(third)


# ------------------------------------------------------------------------------------------
# The object and its mirror (no privileges needed, but loaded with the rest)


def test_layout_matches_the_btf() -> None:
    spec = objects.prebuilt_spec(layout.QUIC_OBJECT, layout.QUIC_MAPS, [layout.QUIC_PROGRAM])
    assert spec.btf is not None
    t = parse_btf(spec.btf).by_name("quic_count", Kind.STRUCT)
    assert t is not None
    assert t.size == layout.QUIC_COUNT.size
    assert [(m.name, m.offset // 8) for m in t.members] == [("datagrams", 0), ("bytes", 8)]
    assert spec.maps["quic_counts"].value_size == layout.QUIC_COUNT.size
    assert spec.maps["quic_peer"].value_size == 8
    assert spec.maps["counters"].max_entries == layout.QUIC_COUNTER_MAX
    verdict = spec.programs[layout.QUIC_PROGRAM]
    assert verdict.section == "sk_skb/verdict"
    assert verdict.attach_type == loader.AttachType.SK_SKB_VERDICT


def test_a_failed_load_leaves_nothing_open(monkeypatch: pytest.MonkeyPatch) -> None:
    before = loader.live_fds()
    with pytest.raises(ValueError, match="max_flows"):
        QuicPlane.load(max_flows=0)
    real = objects.object_bytes
    monkeypatch.setattr(objects, "object_bytes", lambda name: real("sockhash.bpf.o"))
    with pytest.raises(loader.LoaderError, match=r"quic_redirect\.bpf\.o lacks quic_socks"):
        QuicPlane.load()
    assert not loader_fds_opened_since(before)


# ------------------------------------------------------------------------------------------
# (b) The plane relays both ways


def test_the_kernel_relays_datagrams_both_ways_exactly(plane: QuicPlane) -> None:
    """200 datagrams of 1 to 1,400 bytes each way, in bursts of 20: the server gets the
    client's byte-exact and in order, the client gets every answer, Python never reads the
    proxy's sockets, and the counts are exactly what was sent."""
    with contextlib.ExitStack() as stack:
        f = Flow(stack)
        pair = stack.enter_context(plane.register(f.flow, f.upstream))
        assert plane.entries() == dict.fromkeys(
            ("quic_socks", "quic_targets", "quic_peer", "quic_counts"), 2
        )
        sizes = [1400 if i % 7 == 0 else 1 + (i * 389) % 1400 for i in range(200)]
        requests = [payload(i, n) for i, n in enumerate(sizes)]
        answers = [payload(i + 1000, 1 + (n * 7) % 1400) for i, n in enumerate(sizes)]
        upstream_address = f.upstream.getsockname()
        for start in range(0, 200, 20):
            for request in requests[start : start + 20]:
                f.client.send(request)
            for request in requests[start : start + 20]:
                assert f.server.recvfrom(2048) == (request, upstream_address)
            for answer in answers[start : start + 20]:
                f.server.sendto(answer, upstream_address)
            for answer in answers[start : start + 20]:
                assert f.client.recvfrom(2048) == (answer, f.address)
        assert pair.counts() == {
            "client": (200, sum(map(len, requests))),
            "upstream": (200, sum(map(len, answers))),
        }
        assert plane.all_counts() == {
            socket_cookie(f.flow): pair.counts()["client"],
            socket_cookie(f.upstream): pair.counts()["upstream"],
        }
        counters = plane.counters()
        assert counters["redirected"] == 400
        assert counters["redirected_bytes"] == sum(map(len, requests + answers))
        dropped = ("redirect_failures", "no_peer", "empty", "pull_failures")
        assert {name: counters[name] for name in dropped} == dict.fromkeys(dropped, 0)
        assert all(nothing_queued(s) for s in (f.flow, f.upstream, f.listener))


def test_a_gso_burst_leaves_one_datagram_for_each_received(plane: QuicPlane) -> None:
    """A client sending with UDP_SEGMENT (as QUIC stacks do) hands loopback one GSO skb; the
    proxy's socket receives it as paged segments, and each must still leave as one datagram
    (without bpf_skb_pull_data, 100 such datagrams of 1,200 bytes left as 103)."""
    with contextlib.ExitStack() as stack:
        f = Flow(stack)
        stack.enter_context(plane.register(f.flow, f.upstream))
        f.client.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 1200)
        for burst in range(5):
            segments = [payload(burst * 20 + i, 1200) for i in range(20)]
            f.client.send(b"".join(segments))
            assert [f.server.recv(65536) for _ in segments] == segments
        assert plane.counters()["redirected"] == 100
        assert nothing_queued(f.server)


# ------------------------------------------------------------------------------------------
# Registration: nothing lost, nothing passed


def test_datagrams_around_the_registration_are_relayed_or_stay_whole_in_the_queue(
    plane: QuicPlane,
) -> None:
    """A client sends while the flow is registered: every datagram reaches the server through
    the kernel or waits, whole and with its address, in the flow socket's own queue (Python
    relays those); none is lost, none arrives twice."""
    for _round in range(20):
        with contextlib.ExitStack() as stack:
            f = Flow(stack)
            for s in (f.flow, f.server):
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            sent = [payload(i, 100) for i in range(200)]

            def send_all(client: socket.socket = f.client, sent: list[bytes] = sent) -> None:
                for datagram in sent:
                    client.send(datagram)

            sender = threading.Thread(target=send_all)
            sender.start()
            try:
                select.select([f.flow], [], [], TIMEOUT)  # some datagrams queued already
                pair = stack.enter_context(plane.register(f.flow, f.upstream))
            finally:
                sender.join()
            kept = queued(f.flow)
            assert {peer for _data, peer in kept} <= {f.client.getsockname()}
            relayed = [f.server.recv(2048) for _ in range(len(sent) - len(kept))]
            assert sorted(relayed + [data for data, _peer in kept]) == sorted(sent)
            assert nothing_queued(f.server)
            assert pair.counts()["client"] == (len(relayed), 100 * len(relayed))


def test_each_arrival_redirects_the_oldest_queued_datagram(plane: QuicPlane) -> None:
    """Datagrams queued before the registration stay in the socket's queue; each later arrival
    makes the kernel run the verdict on one queued datagram only (udp_read_skb takes one skb),
    so an unread backlog never shrinks by itself: the caller reads it."""
    with contextlib.ExitStack() as stack:
        f = Flow(stack)
        early = [b"early%d" % i for i in range(5)]
        late = [b"late%d" % i for i in range(3)]
        for datagram in early:
            f.client.send(datagram)
        eventually(lambda: len(select.select([f.flow], [], [], 0)[0]) == 1)
        stack.enter_context(plane.register(f.flow, f.upstream))
        for datagram in late:
            f.client.send(datagram)
        assert [f.server.recv(64) for _ in late] == early[:3]
        eventually(lambda: plane.counters()["redirected"] == 3)
        assert [data for data, _peer in queued(f.flow)] == early[3:] + late
        assert nothing_queued(f.server)


def test_what_cannot_be_redirected_is_dropped_never_passed(plane: QuicPlane) -> None:
    """An empty datagram is dropped (redirected, it would stop the peer with EPIPE; passed, a
    recv() of it fails with EFAULT) and the flow goes on; once the upstream socket is closed,
    the client's datagrams are dropped and counted, not queued on the flow socket."""
    with contextlib.ExitStack() as stack:
        f = Flow(stack)
        pair = stack.enter_context(plane.register(f.flow, f.upstream))
        f.client.send(b"before")
        f.client.send(b"")
        f.client.send(b"after")
        assert [f.server.recv(64) for _ in range(2)] == [b"before", b"after"]
        assert f.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert plane.counters()["empty"] == 1
        assert pair.counts()["client"] == (2, 11)
        f.upstream.close()  # leaves both sockhashes by itself
        f.client.send(b"orphan")
        f.client.send(b"")  # a marker: the verdict ran on "orphan" before this one
        eventually(lambda: plane.counters()["empty"] == 2)
        assert plane.counters()["redirect_failures"] == 1
        assert nothing_queued(f.flow)
        pair.release()
        assert plane.entries() == dict.fromkeys(
            ("quic_socks", "quic_targets", "quic_peer", "quic_counts"), 0
        )


def test_register_refuses_what_it_cannot_relay_and_leaves_nothing(plane: QuicPlane) -> None:
    empty = dict.fromkeys(("quic_socks", "quic_targets", "quic_peer", "quic_counts"), 0)
    with contextlib.ExitStack() as stack:
        f = Flow(stack)
        unconnected = stack.enter_context(udp())
        tcp = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        with pytest.raises(ValueError, match="the upstream socket is not connected"):
            plane.register(f.flow, unconnected)
        with pytest.raises(ValueError, match="the client socket is not a UDP socket"):
            plane.register(tcp, f.upstream)
        with pytest.raises(ValueError, match="are the same"):
            plane.register(f.flow, f.flow)
        assert plane.entries() == empty
        with plane.register(f.flow, f.upstream) as pair:
            other = stack.enter_context(udp())
            other.connect(f.server.getsockname())
            with pytest.raises(OSError, match="EEXIST") as exc:
                plane.register(f.flow, other)
            assert exc.value.errno == errno.EEXIST
            # The first registration is intact and still relays.
            assert plane.entries() == {name: 2 for name in empty}
            f.client.send(b"still")
            assert f.server.recv(64) == b"still"
            assert pair.counts()["client"] == (1, 5)
        assert plane.entries() == empty


# ------------------------------------------------------------------------------------------
# (c) Release and close


def test_after_release_the_sockets_are_plain_and_close_leaves_nothing() -> None:
    with contextlib.ExitStack() as stack:
        f = Flow(stack)
        fds_before = set(os.listdir("/proc/self/fd"))
        live_before = loader.live_fds()
        plane = QuicPlane.load(max_flows=4)
        try:
            pair = plane.register(f.flow, f.upstream)
            f.client.send(b"kernel")
            assert f.server.recv(64) == b"kernel"
            pair.release()
            pair.release()  # idempotent
            assert plane.entries() == dict.fromkeys(
                ("quic_socks", "quic_targets", "quic_peer", "quic_counts"), 0
            )
            assert pair.counts() == {"client": (0, 0), "upstream": (0, 0)}
            # Not redirected any more: each datagram waits in its own socket's queue, whole.
            f.client.send(b"to the flow socket")
            f.client.send(b"and one more")
            f.server.sendto(b"to the upstream socket", f.upstream.getsockname())
            assert f.flow.recvfrom(64) == (b"to the flow socket", f.client.getsockname())
            assert f.flow.recvfrom(64) == (b"and one more", f.client.getsockname())
            assert f.upstream.recvfrom(64) == (b"to the upstream socket", f.server.getsockname())
            assert nothing_queued(f.server)
            assert plane.counters()["redirected"] == 1
        finally:
            plane.close()
        plane.close()  # idempotent
        pair.release()  # a no-op once the plane is closed
        assert not loader_fds_opened_since(live_before)
        assert set(os.listdir("/proc/self/fd")) <= fds_before


def test_closing_the_plane_with_a_flow_registered_frees_everything() -> None:
    """close() takes the registered sockets out first: the program holds quic_targets and a
    socket in quic_targets holds the program, so closing the fds alone would keep the maps,
    the program and the relaying alive until the sockets close (docs/kernel-facts.md, fact 52).
    """
    with contextlib.ExitStack() as stack:
        f = Flow(stack)
        plane = QuicPlane.load(max_flows=4)
        try:
            plane.register(f.flow, f.upstream)
            ids = {
                m.info().id for m in (plane.socks, plane.targets, plane.peer_map, plane.counts_map)
            }
        finally:
            plane.close()
        f.client.send(b"after close")
        assert f.flow.recvfrom(64) == (b"after close", f.client.getsockname())
        assert nothing_queued(f.server)
        # The kernel frees the maps in a work item after their last reference goes.
        eventually(lambda: not ids & _map_ids())


def _map_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "map", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {m["id"] for m in json.loads(out or "[]")}
