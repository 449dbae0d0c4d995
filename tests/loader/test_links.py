"""Attach and detach: XDP, TCX and sk_skb verdicts; nothing is left behind."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading

import pytest
import trio_sni_loader as loader
from trio_sni_loader import AttachType, Collection, Int

from .conftest import DATA, bpftool  # type: ignore[import-not-found]

pytestmark = [pytest.mark.bpf, pytest.mark.root]

SO_COOKIE = 57


def link_ids() -> set[int]:
    return {entry["id"] for entry in bpftool("link", "show") or []}


def xdp_prog_id(dev: str) -> int | None:
    out = subprocess.run(
        ["ip", "-j", "-d", "link", "show", "dev", dev], check=True, capture_output=True, text=True
    ).stdout
    xdp = json.loads(out)[0].get("xdp")
    return None if xdp is None else xdp.get("prog", {}).get("id")


@pytest.fixture
def test_objects() -> loader.CollectionSpec:
    return loader.load_collection_spec(DATA / "loader_test.bpf.o")


def test_xdp_generic_on_lo(test_objects: loader.CollectionSpec) -> None:
    with Collection.load(test_objects, programs=["xdp_prog"]) as coll:
        prog = coll.programs["xdp_prog"]
        with loader.attach_xdp(prog, "lo", mode="generic") as link:
            info = link.info()
            assert (info.type, info.target, info.prog_id) == (
                6,
                socket.if_nametoindex("lo"),
                prog.info().id,
            )
            assert info.id in link_ids()
            assert xdp_prog_id("lo") == prog.info().id
        assert link.closed
        assert info.id not in link_ids()
        assert xdp_prog_id("lo") is None
        link.close()  # idempotent


def test_xdp_native_on_lo_is_refused(test_objects: loader.CollectionSpec) -> None:
    with Collection.load(test_objects, programs=["xdp_prog"]) as coll:
        with pytest.raises(loader.BPFSyscallError, match="generic mode") as exc:
            loader.attach_xdp(coll.programs["xdp_prog"], "lo", mode="native")
        assert exc.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize("mode", ["native", "generic", None])
def test_xdp_on_veth(test_objects: loader.CollectionSpec, veth: str, mode: str | None) -> None:
    with Collection.load(test_objects, programs=["xdp_prog"]) as coll:
        prog = coll.programs["xdp_prog"]
        with loader.attach_xdp(prog, veth, mode=mode) as link:
            assert link.info().target == socket.if_nametoindex(veth)
            assert xdp_prog_id(veth) == prog.info().id
        assert xdp_prog_id(veth) is None


def test_tcx_ingress_and_egress(test_objects: loader.CollectionSpec, veth: str) -> None:
    with Collection.load(test_objects, programs=["tcx_in", "tcx_out", "tc_two"]) as coll:
        progs = coll.programs
        ifindex = socket.if_nametoindex(veth)
        with (
            loader.attach_tcx(progs["tcx_in"], veth) as ingress,
            loader.attach_tcx(progs["tcx_out"], ifindex) as egress,
            loader.attach_tcx(progs["tc_two"], veth, "ingress") as second,
        ):
            infos = [ingress.info(), egress.info(), second.info()]
            assert [(i.type, i.target, i.attach_type) for i in infos] == [
                (11, ifindex, AttachType.TCX_INGRESS),
                (11, ifindex, AttachType.TCX_EGRESS),
                (11, ifindex, AttachType.TCX_INGRESS),
            ]
            assert {i.id for i in infos} <= link_ids()
            with pytest.raises(loader.BPFSyscallError) as exc:
                loader.attach_tcx(progs["tcx_in"], veth)  # same program, same hook
            assert exc.value.errno == errno.EEXIST
        assert not {i.id for i in infos} & link_ids()
        with pytest.raises(ValueError, match="direction"):
            loader.attach_tcx(progs["tc_two"], veth)


def _cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _pair(server: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    return client, accepted


def _transfer(src: socket.socket, dst: socket.socket, payload: bytes) -> bytes:
    received = bytearray()

    def reader() -> None:
        while len(received) < len(payload):
            chunk = dst.recv(1 << 16)
            if not chunk:
                return
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    src.sendall(payload)
    thread.join(timeout=20)
    assert not thread.is_alive(), f"stalled after {len(received)} of {len(payload)} bytes"
    return bytes(received)


@pytest.mark.parametrize(
    ("program", "attach_type", "use_link"),
    [
        ("stream_verdict", None, False),
        ("skb_verdict", AttachType.SK_SKB_VERDICT, False),
        ("stream_verdict", None, True),
    ],
)
def test_sockhash_splices_loopback_tcp(
    program: str, attach_type: AttachType | None, use_link: bool
) -> None:
    """client -> proxy_a ==kernel==> proxy_b -> backend, and back, byte-exact."""
    spec = loader.load_collection_spec(DATA / "sockhash.bpf.o")
    payload = os.urandom(1 << 20)
    reply = os.urandom(300_000)
    with (
        Collection.load(spec, programs=[program]) as coll,
        socket.create_server(("127.0.0.1", 0)) as front,
        socket.create_server(("127.0.0.1", 0)) as back,
    ):
        sock_hash, peer = coll.maps["sock_hash"], coll.maps["peer"]
        sock_hash.key_codec = peer.key_codec = peer.value_codec = Int()
        client, proxy_a = _pair(front)
        proxy_b, backend = _pair(back)
        socks = (client, proxy_a, proxy_b, backend)
        for s in (client, backend):
            s.settimeout(20)
        try:
            with loader.attach_sk_skb(
                coll.programs[program], sock_hash, attach_type, use_link=use_link
            ) as link:
                a, b = _cookie(proxy_a), _cookie(proxy_b)
                sock_hash.insert_socket(a, proxy_a)  # sockets first, then peers
                sock_hash.insert_socket(b, proxy_b)
                peer[a] = b
                peer[b] = a
                for s in (proxy_a, proxy_b):  # the "kick" (docs/kernel-facts.md, fact 6)
                    s.setblocking(False)
                    with pytest.raises(BlockingIOError):
                        s.recv(1)
                assert _transfer(client, backend, payload) == payload
                assert _transfer(backend, client, reply) == reply
                assert sorted(sock_hash.keys()) == sorted([a, b])
                if use_link:
                    assert link.info().type == 14  # BPF_LINK_TYPE_SOCKMAP
        finally:
            for s in socks:
                s.close()
        assert list(sock_hash.keys()) == []  # closed sockets leave the sockhash
        for key in list(peer.keys()):
            del peer[key]


def test_verdict_attach_types_exclude_each_other() -> None:
    spec = loader.load_collection_spec(DATA / "sockhash.bpf.o")
    with Collection.load(spec) as coll:
        sock_hash = coll.maps["sock_hash"]
        with loader.attach_sk_skb(coll.programs["stream_verdict"], sock_hash):
            with pytest.raises(loader.BPFSyscallError, match="exclude each other") as exc:
                loader.attach_sk_skb(
                    coll.programs["skb_verdict"], sock_hash, AttachType.SK_SKB_VERDICT
                )
            assert exc.value.errno == errno.EBUSY
        # Detached: the other verdict type can attach now.
        with loader.attach_sk_skb(
            coll.programs["skb_verdict"], sock_hash, AttachType.SK_SKB_VERDICT
        ):
            pass


def test_detach_works_after_the_owners_closed() -> None:
    spec = loader.load_collection_spec(DATA / "sockhash.bpf.o")
    coll = Collection.load(spec, programs=["stream_verdict"])
    link = loader.attach_sk_skb(coll.programs["stream_verdict"], coll.maps["sock_hash"])
    coll.close()
    link.close()  # keeps its own fds, so the detach still finds map and program


def test_missing_link_type_names_the_kernel(
    test_objects: loader.CollectionSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a kernel without TCX (before 6.6), EINVAL becomes NotSupportedError."""
    from trio_sni_loader import features
    from trio_sni_loader._sys import bpf

    def old_kernel(*args: object, **kwargs: object) -> object:
        raise bpf.error_for(bpf.Cmd.LINK_CREATE, errno.EINVAL)

    with Collection.load(test_objects, programs=["tcx_in"]) as coll:
        features.reset_cache()
        monkeypatch.setattr(bpf, "link_create", old_kernel)
        try:
            with pytest.raises(loader.NotSupportedError) as exc:
                loader.attach_tcx(coll.programs["tcx_in"], "lo")
            assert (exc.value.feature, exc.value.min_kernel) == ("BPF link for tcx", "6.6")
        finally:
            features.reset_cache()
