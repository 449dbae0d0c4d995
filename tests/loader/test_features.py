"""Feature probes: conclusive, cached, and a wrong "unsupported" fails instead of skipping."""

from __future__ import annotations

import os
import re

import pytest
import trio_sni_loader as loader
from trio_sni_loader import MapType, ProgType, features
from trio_sni_loader._sys import bpf
from trio_sni_loader._sys.consts import MAP_TYPE_MIN_KERNEL, PROG_TYPE_MIN_KERNEL

pytestmark = pytest.mark.bpf


def kernel_version() -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert match
    return tuple(int(x) for x in match.groups())


def check_version(exc: loader.NotSupportedError) -> None:
    """cilium's checkVersion: "unsupported" on a kernel newer than min_kernel is a bug."""
    need = tuple(int(x) for x in exc.min_kernel.split("."))
    assert kernel_version() < need, f"probe says {exc} but this is {os.uname().release}"


@pytest.mark.parametrize(
    "map_type",
    [
        MapType.HASH,
        MapType.ARRAY,
        MapType.PERCPU_ARRAY,
        MapType.LRU_HASH,
        MapType.LPM_TRIE,
        MapType.SOCKHASH,
        MapType.SOCKMAP,
    ],
)
def test_map_type_probes(map_type: MapType) -> None:
    try:
        loader.have_map_type(map_type)
    except loader.NotSupportedError as exc:
        assert exc.min_kernel == MAP_TYPE_MIN_KERNEL[map_type]  # noqa: PT017 - see check_version
        check_version(exc)


@pytest.mark.parametrize("prog_type", sorted(PROG_TYPE_MIN_KERNEL))
def test_prog_type_probes(prog_type: ProgType) -> None:
    try:
        loader.have_prog_type(prog_type)
    except loader.NotSupportedError as exc:
        check_version(exc)


@pytest.mark.parametrize("kind", ["xdp", "tcx", "sockmap"])
def test_link_probes(kind: str) -> None:
    try:
        loader.have_link(kind)
    except loader.NotSupportedError as exc:
        check_version(exc)


def test_probe_all_on_this_kernel() -> None:
    result = loader.probe_all()
    failed = {k: v for k, v in result.items() if v is not None}
    if kernel_version() >= (6, 10):
        assert failed == {}


def test_results_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    features.reset_cache()
    loader.have_map_type(MapType.HASH)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("probe ran again")

    monkeypatch.setattr(bpf, "map_create", boom)
    loader.have_map_type(MapType.HASH)
    features.reset_cache()
