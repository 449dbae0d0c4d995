"""Maps against the kernel: CRUD, iteration, batch, per-CPU, LRU, LPM, pinning, sockets."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

import pytest
import trio_sni_loader as loader
from trio_sni_loader import Int, Map, MapFlag, MapSpec, MapType, Struct, UpdateFlag
from trio_sni_loader.features import reset_cache

from .conftest import bpftool  # type: ignore[import-not-found]

pytestmark = pytest.mark.bpf


def test_hash_crud_and_witness() -> None:
    spec = MapSpec("crud", MapType.HASH, 4, 8, 16)
    with Map.create(spec, key=Int(), value=Int()) as m:
        assert m.lookup(1) is None
        m[1] = 100
        m.update(2, 200, UpdateFlag.NOEXIST)
        with pytest.raises(loader.BPFSyscallError) as exc:
            m.update(2, 201, UpdateFlag.NOEXIST)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(loader.BPFSyscallError, match="BPF_EXIST"):
            m.update(3, 300, UpdateFlag.EXIST)
        assert m[1] == 100
        assert m.lookup(2) == 200
        assert 2 in m
        assert 3 not in m
        assert sorted(m.keys()) == [1, 2]
        assert sorted(m.items()) == [(1, 100), (2, 200)]
        assert len(m) == 2
        del m[1]
        with pytest.raises(KeyError):
            del m[1]
        with pytest.raises(KeyError):
            m[1]
        info = m.info()
        seen = bpftool("map", "show", "id", str(info.id))
        assert seen["name"] == "crud"
        assert seen["type"] == "hash"
        assert (seen["bytes_key"], seen["bytes_value"], seen["max_entries"]) == (4, 8, 16)
        dump = bpftool("map", "dump", "id", str(info.id))
        assert len(dump) == 1
        assert int.from_bytes(bytes(int(b, 16) for b in dump[0]["key"]), "little") == 2


def test_closed_map_refuses_use() -> None:
    m = Map.create(MapSpec("closed", MapType.HASH, 4, 4, 2))
    m.close()
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.lookup(1)
    with pytest.raises(ValueError, match="closed"):
        m[1] = 1


def test_full_map_says_so() -> None:
    with Map.create(MapSpec("full", MapType.HASH, 4, 4, 2)) as m:
        m[1] = 1
        m[2] = 2
        with pytest.raises(loader.BPFSyscallError, match="max_entries") as exc:
            m[3] = 3
        assert exc.value.errno == errno.E2BIG


def test_struct_codec_and_raw_sizes() -> None:
    with Map.create(MapSpec("codec", MapType.HASH, 8, 8, 4), value=Struct("<II")) as m:
        m[b"12345678"] = (1, 2)
        assert m[b"12345678"] == (1, 2)
        with pytest.raises(ValueError, match="expected 8 bytes"):
            m[b"short"] = (1, 2)


def test_batch_lookup_reads_everything() -> None:
    with Map.create(MapSpec("batch", MapType.HASH, 4, 8, 1024), key=Int(), value=Int()) as m:
        for i in range(700):
            m[i] = i * 3
        entries = m.lookup_batch(batch_size=64)
        assert sorted(entries) == [(i, i * 3) for i in range(700)]
        assert m.count_batch(batch_size=64) == 700
        del m[5]
        assert m.count_batch() == 699
    with Map.create(MapSpec("batcharr", MapType.ARRAY, 4, 4, 10), key=Int(), value=Int()) as a:
        a[3] = 9
        assert dict(a.lookup_batch(batch_size=4)) == {i: (9 if i == 3 else 0) for i in range(10)}
        assert a.count_batch(batch_size=4) == 10  # an array always has all its slots


def test_percpu_values() -> None:
    ncpu = loader.possible_cpus()
    with open("/sys/devices/system/cpu/possible") as f:
        assert ncpu == int(f.read().strip().split(",")[-1].split("-")[-1]) + 1
    # value_size 4 is padded to 8 per CPU in userspace (docs/kernel-facts.md, fact 22).
    spec = MapSpec("percpu", MapType.PERCPU_ARRAY, 4, 4, 2)
    with Map.create(spec, key=Int(), value=Int()) as m:
        assert m[0] == [0] * ncpu
        m[1] = list(range(10, 10 + ncpu))
        assert m[1] == list(range(10, 10 + ncpu))
        assert dict(m.lookup_batch()) == {0: [0] * ncpu, 1: list(range(10, 10 + ncpu))}
        with pytest.raises(ValueError, match="one per possible CPU"):
            m[0] = [1]
    with Map.create(MapSpec("pchash", MapType.PERCPU_HASH, 4, 8, 4), key=Int(), value=Int()) as h:
        h[7] = [5] * ncpu
        assert h[7] == [5] * ncpu


def test_lru_evicts_oldest() -> None:
    spec = MapSpec("lru", MapType.LRU_HASH, 4, 4, 64)
    with Map.create(spec, key=Int(), value=Int()) as m:
        for i in range(200):
            m[i] = i
        keys = set(m.keys())
        assert 0 < len(keys) <= 64
        assert 199 in keys
        assert 0 not in keys


def test_lpm_trie_longest_prefix() -> None:
    spec = MapSpec("allow", MapType.LPM_TRIE, 8, 4, 16, flags=MapFlag.NO_PREALLOC)

    def key(prefix: str) -> bytes:
        net = ipaddress.ip_network(prefix)
        return struct.pack("<I", net.prefixlen) + net.network_address.packed

    with Map.create(spec, value=Int()) as m:
        m[key("192.0.2.0/24")] = 24
        m[key("192.0.2.128/25")] = 25
        assert m[key("192.0.2.200/32")] == 25
        assert m[key("192.0.2.1/32")] == 24
        assert m.lookup(key("198.51.100.1/32")) is None
        assert len(list(m.keys())) == 2


def test_lpm_trie_without_no_prealloc_explains() -> None:
    with pytest.raises(loader.BPFSyscallError, match="BPF_F_NO_PREALLOC") as exc:
        Map.create(MapSpec("bad_lpm", MapType.LPM_TRIE, 8, 4, 16))
    assert exc.value.errno == errno.EINVAL


def test_unknown_map_type_names_feature_and_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL for a type the kernel lacks becomes NotSupportedError(feature, min_kernel)."""
    from trio_sni_loader._sys import bpf

    real = bpf.map_create

    def old_kernel(map_type: int, *args: object, **kwargs: object) -> object:
        if map_type == MapType.SOCKHASH:
            raise bpf.error_for(bpf.Cmd.MAP_CREATE, errno.EINVAL)
        return real(map_type, *args, **kwargs)  # type: ignore[arg-type]

    reset_cache()
    monkeypatch.setattr(bpf, "map_create", old_kernel)
    try:
        with pytest.raises(loader.NotSupportedError) as exc:
            Map.create(MapSpec("sh", MapType.SOCKHASH, 8, 8, 4))
        assert (exc.value.feature, exc.value.min_kernel) == ("BPF_MAP_TYPE_SOCKHASH", "4.18")
        assert "Linux 4.18" in str(exc.value)
    finally:
        reset_cache()


def test_global_data_rodata_is_frozen() -> None:
    spec = loader.load_collection_spec(
        os.path.join(os.path.dirname(__file__), "..", "data", "bpf", "loader_test.bpf.o")
    )
    with Map.create(spec.maps[".rodata"], key=Int(), value=Int()) as ro:
        assert ro[0] == 2
        assert bpftool("map", "show", "id", str(ro.info().id))["frozen"] == 1
        with pytest.raises(loader.BPFSyscallError):
            ro[0] = 3
    with Map.create(spec.maps[".bss"], key=Int(), value=Int()) as bss:
        assert bss[0] == 0


def test_sockhash_insert_real_socket() -> None:
    spec = MapSpec("socks", MapType.SOCKHASH, 8, 8, 4)
    with socket.create_server(("127.0.0.1", 0)) as srv, Map.create(spec, key=Int()) as m:
        cli = socket.create_connection(srv.getsockname())
        acc, _ = srv.accept()
        with cli, acc:
            cookie = cli.getsockopt(socket.SOL_SOCKET, 57, 8)  # SO_COOKIE
            cookie = int.from_bytes(cookie, "little")
            m.insert_socket(cookie, cli)
            assert list(m.keys()) == [cookie]
            assert int.from_bytes(m[cookie], "little") == cookie  # lookups give the cookie
            udp_unbound = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            with udp_unbound, pytest.raises(loader.BPFSyscallError, match="ESTABLISHED") as e:
                m.insert_socket(1, udp_unbound)  # a fresh TCP socket is in CLOSE state
            assert e.value.errno == errno.EOPNOTSUPP
        assert list(m.keys()) == []  # closing the last fd removes the entry


def test_pin_and_open_pinned(pin_dir: str) -> None:
    spec = MapSpec("shared", MapType.HASH, 4, 4, 8)
    path = os.path.join(pin_dir, "shared")
    with Map.create(spec, key=Int(), value=Int()) as m:
        m.pin(path)
        m[1] = 11
    with Map.open_pinned(path, spec, key=Int(), value=Int()) as again:
        assert again[1] == 11
        assert again.pinned_path == path
    with Map.open_pinned(path) as untyped:
        assert (untyped.spec.type, untyped.spec.key_size) == (MapType.HASH, 4)


def test_pinned_mismatch_lists_every_difference(pin_dir: str) -> None:
    path = os.path.join(pin_dir, "shared")
    with Map.create(MapSpec("shared", MapType.ARRAY, 4, 16, 32)) as m:
        m.pin(path)
    want = MapSpec("shared", MapType.HASH, 8, 8, 16, flags=MapFlag.NO_PREALLOC)
    with pytest.raises(loader.MapIncompatibleError) as exc:
        Map.open_pinned(path, want)
    assert exc.value.differences == [
        "type: HASH changed to ARRAY",
        "key_size: 8 changed to 4",
        "value_size: 8 changed to 16",
        "max_entries: 16 changed to 32",
        "flags: 0x1 changed to 0x0",
    ]
    assert path in str(exc.value)
