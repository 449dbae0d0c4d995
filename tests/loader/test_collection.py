"""Collection.load: everything or nothing; pinned maps are reused or refused."""

from __future__ import annotations

import os

import pytest
from proxytest import loader_fds_opened_since

import loader
from loader import Collection, Int, Map, MapSpec, MapType

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
