"""The shipped objects in prebuilt/: the expected spec (unprivileged) and a byte-identical rebuild.

cilium's TestLoadCollectionSpec for the product's own object, plus the CI check of STYLE rule 14
done inside the suite: ``bpf/`` is copied to a temporary folder, rebuilt there with the pinned
clang, and every object must equal the committed bytes (BUILDINFO too, but for the header
packages' revisions, which do not decide the bytes) (a different folder also
proves no build path leaks into the objects, docs/kernel-facts.md, fact 40).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio_sni_loader as loader
from trio_sni_loader import AttachType, MapFlag, MapSpec, MapType, PinType, ProgType

from .conftest import PREBUILT  # type: ignore[import-not-found]

BPF_SOURCES = PREBUILT.parent / "bpf"

SOCKHASH_MAPS = {
    "sock_hash": MapSpec("sock_hash", MapType.SOCKHASH, 8, 8, 65536),
    "targets": MapSpec("targets", MapType.SOCKHASH, 8, 8, 65536),
    "peer": MapSpec("peer", MapType.HASH, 8, 24, 65536, flags=MapFlag.NO_PREALLOC),
    "progress": MapSpec("progress", MapType.HASH, 8, 24, 65536, flags=MapFlag.NO_PREALLOC),
    "counters": MapSpec("counters", MapType.PERCPU_ARRAY, 4, 8, 9),
    "stops": MapSpec("stops", MapType.RINGBUF, 0, 0, 4096),
}


XDP_GUARD_MAPS = {
    "allow_v4": MapSpec("allow_v4", MapType.LPM_TRIE, 8, 1, 65536, flags=1),
    "allow_v6": MapSpec("allow_v6", MapType.LPM_TRIE, 20, 1, 65536, flags=1),
    "deny_v4": MapSpec("deny_v4", MapType.LPM_TRIE, 8, 1, 65536, flags=1),
    "deny_v6": MapSpec("deny_v6", MapType.LPM_TRIE, 20, 1, 65536, flags=1),
    "ports": MapSpec("ports", MapType.HASH, 2, 1, 256),
    "config": MapSpec("config", MapType.ARRAY, 4, 40, 1),
    "syn_sources": MapSpec("syn_sources", MapType.LRU_HASH, 16, 16, 65536),
    "syn_global": MapSpec("syn_global", MapType.ARRAY, 4, 8, 1),
    "counters": MapSpec("counters", MapType.PERCPU_ARRAY, 4, 8, 9),
}


TC_SHAPER_MAPS = {
    "buckets": MapSpec("buckets", MapType.LRU_HASH, 20, 16, 65536),
    "rates": MapSpec("rates", MapType.ARRAY, 4, 24, 3),
    "ports": MapSpec("ports", MapType.HASH, 2, 1, 64),
    "exempt": MapSpec("exempt", MapType.LPM_TRIE, 20, 1, 1024, flags=MapFlag.NO_PREALLOC),
    "counters": MapSpec("counters", MapType.PERCPU_ARRAY, 4, 32, 5),
}


DNS_CACHE_MAPS = {
    "dns_cache": MapSpec("dns_cache", MapType.LRU_HASH, 256, 176, 10000, pinning=PinType.BY_NAME),
    "dns_cache_stats": MapSpec("dns_cache_stats", MapType.ARRAY, 4, 8, 3, pinning=PinType.BY_NAME),
}


def test_prebuilt_objects_are_exactly_these() -> None:
    assert sorted(p.name for p in PREBUILT.glob("*.bpf.o")) == [
        "dns_cache.bpf.o",
        "quic_redirect.bpf.o",
        "sockhash.bpf.o",
        "tc_shaper.bpf.o",
        "xdp_guard.bpf.o",
    ]


def test_xdp_guard_spec() -> None:
    spec = loader.load_collection_spec(PREBUILT / "xdp_guard.bpf.o")
    assert spec.license == "GPL"
    assert dict(spec.maps) == XDP_GUARD_MAPS
    assert list(spec.programs) == ["xdp_guard"]
    guard = spec.programs["xdp_guard"]
    assert (guard.section, guard.type, guard.attach_type) == ("xdp", ProgType.XDP, AttachType.XDP)
    assert {r.map for r in guard.references} == set(XDP_GUARD_MAPS)


def test_dns_cache_spec() -> None:
    spec = loader.load_collection_spec(PREBUILT / "dns_cache.bpf.o")
    assert spec.license == "GPL"
    assert dict(spec.maps) == DNS_CACHE_MAPS
    assert list(spec.programs) == ["dns_stat_add"]
    counter = spec.programs["dns_stat_add"]
    assert (counter.section, counter.type) == ("socket", ProgType.SOCKET_FILTER)
    assert {(r.map, r.kind) for r in counter.references} == {("dns_cache_stats", "map")}


def test_sockhash_spec() -> None:
    spec = loader.load_collection_spec(PREBUILT / "sockhash.bpf.o")
    assert spec.license == "GPL"
    assert dict(spec.maps) == SOCKHASH_MAPS
    assert list(spec.programs) == ["stream_verdict"]
    verdict = spec.programs["stream_verdict"]
    assert verdict.section == "sk_skb/stream_verdict"
    assert (verdict.type, verdict.attach_type, verdict.expected_attach_type) == (
        ProgType.SK_SKB,
        AttachType.SK_SKB_STREAM_VERDICT,
        5,
    )
    assert {r.map for r in verdict.references} == {
        "targets",
        "peer",
        "progress",
        "counters",
        "stops",
    }
    assert all(r.kind == "map" for r in verdict.references)


def test_tc_shaper_spec() -> None:
    spec = loader.load_collection_spec(PREBUILT / "tc_shaper.bpf.o")
    assert spec.license == "GPL"
    assert dict(spec.maps) == TC_SHAPER_MAPS
    assert list(spec.programs) == ["tc_shaper"]
    shaper = spec.programs["tc_shaper"]
    assert shaper.section == "tcx/egress"
    assert (shaper.type, shaper.attach_type) == (ProgType.SCHED_CLS, AttachType.TCX_EGRESS)
    assert {r.map for r in shaper.references} == set(TC_SHAPER_MAPS)


def test_buildinfo_names_the_pinned_toolchain() -> None:
    info = (PREBUILT / "BUILDINFO").read_text()
    lines = info.splitlines()
    assert lines[0].startswith("clang: Debian clang version 19.")
    assert lines[1].startswith("cflags: -O2 -g -Wall -Werror -target bpfel -mcpu=v3 ")
    assert "-ffile-prefix-map=<dir>/=" in lines[1]
    assert lines[2].startswith("headers: libbpf-dev ")
    assert [line.split()[1] for line in lines[3:]] == [
        "shared.h",
        "sockhash.bpf.c",
        "xdp_guard.bpf.c",
        "tc_shaper.bpf.c",
        "dns_cache.bpf.c",
        "quic_redirect.bpf.c",
    ]


@pytest.mark.skipif(
    shutil.which("clang-19") is None or shutil.which("make") is None,
    reason="needs clang-19 and make (a build check; CI installs them)",
)
def test_prebuilt_rebuilds_byte_identical(tmp_path: Path) -> None:
    src = tmp_path / "bpf"
    shutil.copytree(BPF_SOURCES, src)
    out = tmp_path / "out"
    subprocess.run(["make", "-s", "-C", str(src), f"OUT={out}"], check=True, capture_output=True)
    built = sorted(p.name for p in out.iterdir())
    committed = sorted(p.name for p in PREBUILT.iterdir() if not p.name.startswith("."))
    assert built == committed
    for name in built:
        rebuilt, shipped = (out / name).read_bytes(), (PREBUILT / name).read_bytes()
        if name == "BUILDINFO":
            rebuilt, shipped = _what_decides_the_bytes(rebuilt), _what_decides_the_bytes(shipped)
        assert rebuilt == shipped, (
            f"prebuilt/{name} is stale: run `make -C bpf` and commit prebuilt/"
        )


def _what_decides_the_bytes(buildinfo: bytes) -> bytes:
    """BUILDINFO without its ``headers:`` line.

    That line records the Debian revisions of the header packages, which the distribution
    bumps without changing a byte the objects are built from (linux-libc-dev 6.1.192-2 became
    -3 and every object still rebuilt identical). The objects' own bytes, compared above, are
    the proof that the headers gave the same code; the compiler, the flags and the source
    hashes are compared here.
    """
    return b"\n".join(line for line in buildinfo.split(b"\n") if not line.startswith(b"headers:"))
