"""trio_sni.accel: the version gate, the probe, the layout mirror, and sockhash registration
on real sockets (entries always removed, a half-closed socket refused)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import trio_sni_loader as loader
from proxytest import loader_fds_opened_since
from trio_sni_loader.btf import Kind, parse_btf

from trio_sni import accel
from trio_sni.accel import layout, objects
from trio_sni.accel.quic_plane import QuicPlane

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("release", "safe"),
    [
        ("6.18.44-fc-v782", True),
        ("6.16.0", True),
        ("7.1.2", True),
        ("6.15.3", True),
        ("6.15.2", False),
        ("6.12.34-1-amd64", True),
        ("6.12.33", False),
        ("6.6.94", True),
        ("6.6.93", False),
        ("6.14.11", False),  # never fixed
        ("6.13.12", False),
        ("6.11.0", False),
        ("6.8.0-45-generic", False),
        ("6.1.142", False),  # fixed, but older than the 6.4 kick
        ("5.15.186", False),
        ("4.19.0", False),
        ("nonsense", False),
    ],
)
def test_sockmap_kernel_gate(release: str, safe: bool) -> None:
    why = accel.sockmap_kernel_gate(release)
    assert (why is None) == safe, why


def test_gate_reasons_say_what_to_do() -> None:
    assert accel.sockmap_kernel_gate("6.12.33") == (
        "Linux 6.12.33 has the sockmap duplicated-data bug; fixed in 6.12.34 (commit 3b4f14b7)"
    )
    assert "never got the sockmap duplicated-data fix" in (accel.sockmap_kernel_gate("6.8.1") or "")


def test_probe_explains_a_missing_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_effective_caps", lambda: 0)
    found = accel.probe()
    if accel.sockmap_kernel_gate(found.kernel_release) is not None:
        pytest.skip("the kernel gate already refuses this kernel")
    assert not found.sockmap
    assert found.why_not(
        "sockmap",
    ).startswith("missing CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")  # type: ignore[union-attr]


def test_prebuilt_object_is_found_and_checked() -> None:
    spec = objects.prebuilt_spec("sockhash.bpf.o", layout.SOCKHASH_MAPS, [layout.SOCKHASH_PROGRAM])
    assert set(layout.SOCKHASH_MAPS) <= set(spec.maps)
    assert layout.SOCKHASH_PROGRAM in spec.programs
    with pytest.raises(
        loader.LoaderError, match=r"sockhash\.bpf\.o lacks no_such_map, no_such_pro"
    ):
        objects.prebuilt_spec("sockhash.bpf.o", ["no_such_map"], ["no_such_program"])


def test_layout_matches_the_btf() -> None:
    """accel/layout.py mirrors bpf/shared.h: sizes and member offsets from the object's BTF."""
    spec = objects.prebuilt_spec("sockhash.bpf.o", layout.SOCKHASH_MAPS, [])
    assert spec.btf is not None
    btf = parse_btf(spec.btf)
    expected = {
        "peer_info": (layout.PEER_INFO, ["peer", "bound", "direction", "_pad"]),
        "progress": (layout.PROGRESS, ["redirected", "stopped", "started", "peer_seq0", "_pad"]),
    }
    for name, (codec, members) in expected.items():
        t = btf.by_name(name, Kind.STRUCT)
        assert t is not None, name
        assert t.size == codec.size
        assert [m.name for m in t.members] == members
        offsets = [m.offset // 8 for m in t.members]
        sizes = [struct.calcsize("<" + c) for c in codec.format.lstrip("<")]
        assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    assert spec.maps["peer"].value_size == layout.PEER_INFO.size
    assert spec.maps["progress"].value_size == layout.PROGRESS.size
    assert spec.maps["counters"].max_entries == layout.COUNTER_MAX


# ------------------------------------------------------------------------------------------
# Real kernel


@pytest.fixture
def plane() -> Iterator[accel.SockhashPlane]:
    before = loader.live_fds()
    with accel.SockhashPlane.load(max_entries=64) as p:
        yield p
    assert not loader_fds_opened_since(before)


def _pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    return server, client, accepted


@pytest.mark.bpf
def test_register_inserts_and_always_removes(plane: accel.SockhashPlane) -> None:
    s1, outside_client, proxy_client = _pair()
    s2, proxy_upstream, outside_upstream = _pair()
    socks = (s1, s2, outside_client, proxy_client, proxy_upstream, outside_upstream)
    try:

        def use_then_fail() -> None:
            with plane.register(proxy_client, proxy_upstream, bound=1 << 20) as registered:
                assert plane.entries() == {"sock_hash": 2, "targets": 2, "peer": 2, "progress": 2}
                assert registered.stopped_at_insert == ()
                outside_client.sendall(b"x" * 1000)
                outside_upstream.settimeout(5)
                assert outside_upstream.recv(1000) == b"x" * 1000  # redirected by the kernel
                assert registered.progress("client") == (1000, False)
                raise RuntimeError("inside")

        with pytest.raises(RuntimeError, match="inside"):
            use_then_fail()
        assert plane.entries() == {"sock_hash": 0, "targets": 0, "peer": 0, "progress": 0}
        counters = plane.counters()
        assert counters["bytes_to_upstream"] >= 1000
        assert counters["skbs_to_upstream"] >= 1
    finally:
        for s in socks:
            s.close()


@pytest.mark.bpf
def test_a_release_before_closing_leaves_the_sockhash_entries_to_the_close(
    plane: accel.SockhashPlane,
) -> None:
    s1, outside_client, proxy_client = _pair()
    s2, proxy_upstream, outside_upstream = _pair()
    others = (s1, s2, outside_client, outside_upstream)
    try:
        plane.register(proxy_client, proxy_upstream, bound=1 << 20).release(closing=True)
        assert plane.entries() == {"sock_hash": 2, "targets": 2, "peer": 0, "progress": 0}
        outside_client.sendall(b"late")  # no peer entry: passed to its own queue, not lost
        proxy_client.settimeout(5)
        assert proxy_client.recv(4) == b"late"
        proxy_client.close()
        proxy_upstream.close()
        assert plane.entries() == {"sock_hash": 0, "targets": 0, "peer": 0, "progress": 0}
    finally:
        for s in (*others, proxy_client, proxy_upstream):
            s.close()


@pytest.mark.bpf
def test_a_half_closed_client_is_refused_and_leaves_nothing(plane: accel.SockhashPlane) -> None:
    s1, outside_client, proxy_client = _pair()
    s2, proxy_upstream, outside_upstream = _pair()
    socks = (s1, s2, outside_client, proxy_client, proxy_upstream, outside_upstream)
    try:
        outside_client.shutdown(socket.SHUT_WR)  # proxy_client is now CLOSE_WAIT
        proxy_client.settimeout(5)
        assert proxy_client.recv(1) == b""
        with pytest.raises(OSError, match="not supported") as exc:
            plane.register(proxy_client, proxy_upstream, bound=1 << 20).__enter__()
        assert exc.value.errno in (errno.EOPNOTSUPP, errno.ENOTSUP)
        assert plane.entries() == {"sock_hash": 0, "targets": 0, "peer": 0, "progress": 0}
    finally:
        for s in socks:
            s.close()


@pytest.mark.bpf
def test_over_the_bound_the_program_stops_and_keeps_the_bytes(
    plane: accel.SockhashPlane,
) -> None:
    """The program bounds what the peer has not taken yet by itself: with the upstream reader
    stalled, the client socket is stopped and later bytes wait in its own queue, in order."""
    s1, outside_client, proxy_client = _pair()
    s2, proxy_upstream, outside_upstream = _pair()
    socks = (s1, s2, outside_client, proxy_client, proxy_upstream, outside_upstream)
    payload = os.urandom(4 * MiB)
    proxy_upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender = threading.Thread(target=outside_client.sendall, args=(payload,))
    try:
        with plane.register(proxy_client, proxy_upstream, bound=64 * 1024) as registered:
            sender.start()
            deadline = time.monotonic() + 10
            while not registered.progress("client")[1]:  # outside_upstream reads nothing yet
                assert time.monotonic() < deadline, "never stopped"
                time.sleep(0.01)
            assert plane.counters()["budget_stops"] == 1
            assert plane.stopped_cookies() == [registered.client_cookie]
            assert plane.stopped_cookies() == []  # read once
            redirected, _ = registered.progress("client")
            assert redirected < MiB  # the bound plus the peer's (small) socket buffers
            assert plane.all_progress()[registered.client_cookie] == (redirected, True)
            outside_upstream.settimeout(5)
            proxy_client.settimeout(5)
            got = _recv_exactly(outside_upstream, redirected) + _recv_exactly(
                proxy_client, len(payload) - redirected
            )
            assert got == payload
        sender.join()
    finally:
        for s in socks:
            s.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk
        data += chunk
    return bytes(data)


@pytest.mark.bpf
def test_a_second_insert_failing_otherwise_leaves_that_side_to_userspace(
    plane: accel.SockhashPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the client socket is in the sockhash, a failure of the upstream insert (any errno)
    does not abort the registration (the client may have redirected bytes already): the
    upstream side is left to userspace, and every entry still goes at the end."""
    s1, outside_client, proxy_client = _pair()
    s2, proxy_upstream, outside_upstream = _pair()
    socks = (s1, s2, outside_client, proxy_client, proxy_upstream, outside_upstream)
    real_insert = plane.sock_hash.insert_socket

    def insert(cookie: int, sock: socket.socket) -> None:
        if sock is proxy_upstream:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        real_insert(cookie, sock)

    monkeypatch.setattr(plane.sock_hash, "insert_socket", insert)
    try:
        with plane.register(proxy_client, proxy_upstream, bound=1 << 20) as registered:
            assert registered.stopped_at_insert == ("upstream",)
            assert plane.entries() == {"sock_hash": 1, "targets": 2, "peer": 2, "progress": 2}
            outside_client.sendall(b"up" * 1000)
            outside_upstream.settimeout(5)
            assert _recv_exactly(outside_upstream, 2000) == b"up" * 1000  # by the kernel
            outside_upstream.sendall(b"down" * 1000)
            proxy_upstream.settimeout(5)
            assert _recv_exactly(proxy_upstream, 4000) == b"down" * 1000  # for userspace
            assert registered.progress("upstream") == (0, True)
        assert plane.entries() == {"sock_hash": 0, "targets": 0, "peer": 0, "progress": 0}
    finally:
        for s in socks:
            s.close()


@pytest.mark.bpf
def test_a_first_insert_failing_otherwise_raises_and_leaves_nothing(
    plane: accel.SockhashPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    s1, outside_client, proxy_client = _pair()
    s2, proxy_upstream, outside_upstream = _pair()
    socks = (s1, s2, outside_client, proxy_client, proxy_upstream, outside_upstream)

    def insert(cookie: int, sock: socket.socket) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(plane.sock_hash, "insert_socket", insert)
    try:
        with pytest.raises(OSError, match="Cannot allocate"):
            plane.register(proxy_client, proxy_upstream, bound=1 << 20).__enter__()
        assert plane.entries() == {"sock_hash": 0, "targets": 0, "peer": 0, "progress": 0}
    finally:
        for s in socks:
            s.close()


@pytest.mark.bpf
def test_the_stop_ring_reports_every_stop_across_wrap_arounds() -> None:
    """300 stops (the 4 KiB ring holds 256 records) read in batches of 100: each one exactly
    once, in order; closing the plane releases the ring's mappings and fds."""
    fds_before = len(os.listdir("/proc/self/fd"))
    s1, outside_client, proxy_client = _pair()
    s2, proxy_upstream, outside_upstream = _pair()
    socks = (s1, s2, outside_client, proxy_client, proxy_upstream, outside_upstream)
    proxy_client.setblocking(False)  # a blocking recv() here sleeps out its timeout first

    def receive_10() -> bytes:
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(BlockingIOError):
                return proxy_client.recv(10)
            assert time.monotonic() < deadline
            time.sleep(0.001)

    try:
        with accel.SockhashPlane.load(max_entries=4) as plane:
            cookie = accel.socket_cookie(proxy_client)
            for batch in range(3):
                for _ in range(100):
                    # bound 1: the first skb over it stops the socket and stays in its queue
                    with plane.register(proxy_client, proxy_upstream, bound=1) as registered:
                        outside_client.sendall(b"0123456789")
                        assert receive_10() == b"0123456789"
                        assert registered.progress("client") == (0, True)
                assert plane.stopped_cookies() == [cookie] * 100, batch
            assert plane.counters()["budget_stops"] == 300
    finally:
        for s in socks:
            s.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.bpf
def test_an_empty_plane_takes_kernel_memory_for_its_buckets_only() -> None:
    """The per-connection hash maps are not preallocated (docs/kernel-facts.md, fact 53): at
    the default size a worker's empty TCP and QUIC planes take about 8 MiB each, not 28 and
    25 (their entries take memory as connections and flows register)."""
    with (
        accel.SockhashPlane.load(max_entries=65536) as tcp,
        QuicPlane.load(max_flows=65536) as quic,
    ):
        maps = [*tcp._collection.maps.values(), *quic._collection.maps.values()]
        ids = {m.info().id for m in maps}
        out = subprocess.run(
            ["bpftool", "-j", "map", "show"], check=True, capture_output=True, text=True
        ).stdout
        memlock = {m["id"]: m["bytes_memlock"] for m in json.loads(out) if m["id"] in ids}
        assert len(memlock) == len(ids)
        assert sum(memlock.values()) < 17 << 20
        for m in (tcp.peer_map, tcp.progress_map, quic.peer_map, quic.counts_map):
            assert memlock[m.info().id] < 3 << 20, m.name
