"""Collection.load: everything or nothing; pinned maps are reused or refused."""

from __future__ import annotations

import os

import pytest
import trio_sni_loader as loader
from proxytest import loader_fds_opened_since
from trio_sni_loader import Collection, Int, Map, MapSpec, MapType

from .conftest import DATA  # type: ignore[import-not-found]

pytestmark = pytest.mark.bpf


def test_failed_load_closes_everything() -> None:
    good = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    bad = loader.load_collection_spec(DATA / "bad.bpf.o")
    mixed = good.copy(programs={**good.programs, "bad_prog": bad.programs["bad_prog"]})
    before = loader.live_fds()
    with pytest.raises(loader.VerifierError):
        Collection.load(mixed)
    assert not loader_fds_opened_since(before)


def test_missing_program_name_is_an_error() -> None:
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    with pytest.raises(loader.LoaderError, match="no_such"):
        Collection.load(spec, programs=["no_such"])


def test_close_is_idempotent() -> None:
    spec = loader.load_collection_spec(DATA / "sockhash.bpf.o")
    coll = Collection.load(spec)
    coll.close()
    coll.close()
    assert all(m.closed for m in coll.maps.values())
    assert all(p.closed for p in coll.programs.values())


def test_replacement_maps_are_used_and_left_open() -> None:
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    with Map.create(spec.maps["counters"], key=Int(), value=Int()) as counters:
        with Collection.load(
            spec, replacements={"counters": counters}, programs=["xdp_prog"]
        ) as coll:
            assert "counters" not in coll.maps
            coll.programs["xdp_prog"].test_run(bytes(64))
        assert not counters.closed
        assert counters[0] == 1


def test_pinned_map_is_reused(pin_dir: str) -> None:
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    with Collection.load(spec, pin_path=pin_dir, programs=[]) as first:
        pinned = first.maps["pinned"]
        assert pinned.pinned_path == os.path.join(pin_dir, "pinned")
        pinned.update(1, 42)
        first_id = pinned.info().id
    with Collection.load(spec, pin_path=pin_dir, programs=[]) as second:
        again = second.maps["pinned"]
        again.key_codec = again.value_codec = Int()
        assert again.info().id == first_id
        assert again[1] == 42
    assert os.listdir(pin_dir) == ["pinned"]  # only maps that ask for pinning


def test_pinned_map_mismatch_is_refused(pin_dir: str) -> None:
    with Map.create(MapSpec("pinned", MapType.HASH, 4, 8, 32)) as other:
        other.pin(os.path.join(pin_dir, "pinned"))
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    before = loader.live_fds()
    with pytest.raises(loader.MapIncompatibleError, match="value_size: 4 changed to 8"):
        Collection.load(spec, pin_path=pin_dir)
    assert not loader_fds_opened_since(before)


def test_global_data_is_named_flagged_and_mapped_as_libbpf_does() -> None:
    """``<first 8 characters of the object>.data`` in the kernel (what bpftool shows; libbpf's
    names, checked against bpftool's libbpf on another object when this was written), mmap-able,
    .rodata read-only for programs and frozen; the memory is the map's, both ways."""
    from .conftest import bpftool  # type: ignore[import-not-found]

    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    with Collection.load(spec, programs=[]) as coll:
        for section, flags, frozen in (
            (".data", 0x400, 0),
            (".bss", 0x400, 0),
            (".rodata", 0x480, 1),
        ):
            m = coll.maps[section]
            seen = bpftool("map", "show", "id", str(m.info().id))
            assert (seen["name"], seen["flags"], seen["frozen"]) == (
                f"loader_t{section}",
                flags,
                frozen,
            )
        data = coll.maps[".data"]
        with data.mmap() as memory:
            assert memory[:4] == (2).to_bytes(4, "little")  # tc_verdict's initial value
            memory[:4] = (7).to_bytes(4, "little")
            assert data.lookup(b"\0\0\0\0") == (7).to_bytes(4, "little")
        with coll.maps[".rodata"].mmap() as memory:
            assert memory[:4] == (2).to_bytes(4, "little")  # xdp_verdict
            with pytest.raises(TypeError):
                memory[:4] = bytes(4)  # mapped read-only: frozen
        with (
            Map.create(MapSpec("plain", MapType.ARRAY, 4, 4, 1)) as plain,
            pytest.raises(loader.LoaderError, match="not created with BPF_F_MMAPABLE"),
        ):
            plain.mmap()


def test_global_variables_by_name_are_read_and_written_in_place() -> None:
    """As a libbpf skeleton: by the name in the C source, the program sees a write at once;
    .rodata is frozen, so read-only."""
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    assert {
        name: (v.section, v.offset, v.size) for name, v in loader.global_variables(spec).items()
    } == {
        "xdp_verdict": (".rodata", 0, 4),
        "tc_verdict": (".data", 0, 4),
        "packets": (".bss", 0, 8),
    }
    packet = bytes(64)
    with Collection.load(spec) as coll:
        verdict = coll.variable("tc_verdict")
        assert verdict.spec.type.name == "__u32"
        assert verdict.read() == (2).to_bytes(4, "little")  # TC_ACT_SHOT, its initial value
        verdict.write((0).to_bytes(4, "little"))  # TC_ACT_OK
        assert coll.programs["tc_one"].test_run(packet).retval == 0
        coll.programs["tc_one"].test_run(packet)
        assert int.from_bytes(coll.variable("packets").read(), "little") == 2  # bumped by bump()
        rodata = coll.variable("xdp_verdict")
        assert rodata.read() == (2).to_bytes(4, "little")
        with pytest.raises(loader.LoaderError, match="read-only"):
            rodata.write(bytes(4))
        with pytest.raises(loader.LoaderError, match="is 4 bytes, not 2"):
            verdict.write(bytes(2))
        with pytest.raises(loader.LoaderError, match="no global variable 'nope'"):
            coll.variable("nope")


def test_a_map_the_kernel_refuses_is_named_with_its_object() -> None:
    """The errno and type stay (callers test them); the message names the file and the map."""
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    broken = spec.copy(maps={**spec.maps, "lru": spec.maps["lru"].copy(max_entries=0)})
    with pytest.raises(loader.BPFSyscallError) as exc:
        Collection.load(broken, programs=[])
    assert exc.value.errno == 22  # EINVAL: an LRU map needs entries
    assert str(exc.value).startswith(f"{DATA / 'loader_test.bpf.o'}: BPF_MAP_CREATE: EINVAL")
    assert "map 'lru' (LRU_HASH" in str(exc.value)
