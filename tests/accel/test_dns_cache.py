"""The shared DNS cache tier (trio_sni.accel.dns_cache) on the real kernel.

Every test pins in its own directory under /sys/fs/bpf (the ``pin_dir`` fixture), removed at
the end. Time is a fake CLOCK_BOOTTIME (``FakeClock``) wherever expiry matters.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import subprocess
import sys
import threading

import pytest
import trio_sni_loader as loader
from proxytest import loader_fds_opened_since

from trio_sni.accel import dns_cache
from trio_sni.accel.dns_cache import SharedDnsCache
from trio_sni.errors import SharedCacheUnavailable
from trio_sni.sansio import dns_record
from trio_sni.sansio.dns_record import Families

pytestmark = pytest.mark.bpf

BOTH = Families.IPV4 | Families.IPV6
A1 = ipaddress.ip_address("192.0.2.1")
AAAA1 = ipaddress.ip_address("2001:db8::1")
SECOND = 1_000_000_000


class FakeClock:
    """Nanoseconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 10**15

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_answers_are_shared_between_openers_and_survive_a_close(
    pin_dir: str, clock: FakeClock
) -> None:
    before = loader.live_fds()
    with_close = SharedDnsCache.open(pin_dir, 100, clock=clock)
    other = SharedDnsCache.open(pin_dir, 100, clock=clock)
    try:
        assert with_close.replaced is None
        assert other.replaced is None
        assert sorted(os.listdir(pin_dir)) == ["dns_cache", "dns_cache_stats"]
        with_close.put("a.test", (AAAA1, A1), 30, BOTH)
        found = other.get("a.test", BOTH)
        assert found is not None
        record, left = found
        assert (record.v6, record.v4, record.families) == ((AAAA1,), (A1,), BOTH)
        assert left == 30.0
    finally:
        with_close.close()
    reopened = SharedDnsCache.open(pin_dir, 100, clock=clock)
    try:
        assert reopened.get("a.test", BOTH) is not None  # the pinned map outlived its opener
        stats = reopened.statistics()
        assert (stats.entries, stats.hits, stats.misses, stats.evictions) == (1, 1, 0, 0)
    finally:
        reopened.close()
        other.close()
    assert not loader_fds_opened_since(before)


def test_entries_expire_at_their_ttl_on_the_shared_clock(pin_dir: str, clock: FakeClock) -> None:
    with SharedDnsCache.open(pin_dir, 100, clock=clock) as cache:
        cache.put("a.test", (A1,), 2.5, Families.IPV4)
        clock.now += int(2.4 * SECOND)
        found = cache.get("a.test", Families.IPV4)
        assert found is not None
        assert round(found[1], 6) == 0.1
        clock.now += SECOND // 10  # exactly at the expiry: gone
        assert cache.get("a.test", Families.IPV4) is None
        cache.put("a.test", (A1,), 10, Families.IPV4)  # a refresh overwrites the expired entry
        assert cache.get("a.test", Families.IPV4) is not None
        stats = cache.statistics()
        assert (stats.entries, stats.hits, stats.misses, stats.evictions) == (1, 2, 1, 0)
        assert stats.hit_rate == round(2 / 3, 4)
        cache.put("b.test", (A1,), 0, Families.IPV4)  # already expired: not shared
        assert cache.get("b.test", Families.IPV4) is None


def test_an_entry_lacking_a_needed_family_is_a_miss(pin_dir: str, clock: FakeClock) -> None:
    cache = SharedDnsCache.open(pin_dir, 100, clock=clock)
    try:
        cache.put("a.test", (A1,), 30, Families.IPV4)  # written by an ipv4-only process
        assert cache.get("a.test", Families.IPV4) is not None
        assert cache.get("a.test", BOTH) is None
        cache.put("a.test", (A1,), 30, BOTH)  # asked both, got no AAAA: good for everyone
        assert cache.get("a.test", Families.IPV6) is not None
    finally:
        cache.close()


def test_names_that_cannot_be_keys_stay_private(pin_dir: str, clock: FakeClock) -> None:
    cache = SharedDnsCache.open(pin_dir, 100, clock=clock)
    try:
        cache.put("x" * 254, (A1,), 30, BOTH)
        assert cache.get("x" * 254, BOTH) is None
        stats = cache.statistics()
        assert (stats.entries, stats.hits, stats.misses) == (0, 0, 0)
    finally:
        cache.close()


def test_evictions_are_counted_host_wide(pin_dir: str, clock: FakeClock) -> None:
    first = SharedDnsCache.open(pin_dir, 64, clock=clock)
    second = SharedDnsCache.open(pin_dir, 64, clock=clock)
    try:
        for i in range(300):
            (first if i % 2 else second).put(f"n{i}.test", (A1,), 60, BOTH)
        for i in range(290, 300):  # refreshes of names still there are not inserts
            first.put(f"n{i}.test", (A1,), 60, BOTH)
        a, b = first.statistics(), second.statistics()
        assert 0 < a.entries <= 64
        assert a.entries == b.entries
        assert dns_cache._read_u64(first._stats, dns_record.Stat.INSERTS) == 300
        # Every name entered the map once and none was deleted: the rest were evicted.
        assert a.evictions == b.evictions == 300 - a.entries
    finally:
        first.close()
        second.close()


def test_corrupt_entries_are_deleted_and_counted(pin_dir: str, clock: FakeClock) -> None:
    cache = SharedDnsCache.open(pin_dir, 100, clock=clock)
    try:
        cache.put("a.test", (A1,), 30, BOTH)
        raw = loader.Map.open_pinned(os.path.join(pin_dir, "dns_cache"))
        with raw:
            key = dns_record.pack_key("a.test")
            raw.update(key, b"\xff" * dns_record.VALUE_SIZE)
            assert cache.get("a.test", BOTH) is None
            assert raw.lookup(key) is None  # deleted, never trusted
        stats = cache.statistics()
        assert (stats.corrupt, stats.misses, stats.entries, stats.evictions) == (1, 1, 0, 0)
        assert dns_cache._read_u64(cache._stats, dns_record.Stat.DELETES) == 1
    finally:
        cache.close()


def pin_foreign_map(path: str, spec: loader.MapSpec) -> None:
    with loader.Map.create(spec) as m:
        m.pin(path)


OLD_LAYOUT = loader.MapSpec("dns_cache", loader.MapType.LRU_HASH, 256, 100, 100)


@pytest.mark.parametrize(
    ("prepare", "problem"),
    [
        (
            lambda d: pin_foreign_map(os.path.join(d, "dns_cache"), OLD_LAYOUT),
            "dns_cache: value_size: 176 changed to 100; dns_cache_stats: missing",
        ),
        (
            lambda d: pin_foreign_map(
                os.path.join(d, "dns_cache"),
                OLD_LAYOUT.copy(type=loader.MapType.HASH, value_size=176, max_entries=50),
            ),
            "dns_cache: type: LRU_HASH changed to HASH, max_entries: 100 changed to 50; "
            "dns_cache_stats: missing",
        ),
    ],
)
def test_incompatible_pinned_maps_are_reported_and_replaced(
    pin_dir: str,
    clock: FakeClock,
    prepare,
    problem: str,  # type: ignore[no-untyped-def]
) -> None:
    prepare(pin_dir)
    old_id = loader.Map.open_pinned(os.path.join(pin_dir, "dns_cache"))
    with old_id:
        old = old_id.info().id
    cache = SharedDnsCache.open(pin_dir, 100, clock=clock)
    try:
        assert cache.replaced == problem
        with loader.Map.open_pinned(os.path.join(pin_dir, "dns_cache")) as now:
            assert now.info().id != old
            assert (now.spec.value_size, now.spec.max_entries) == (dns_record.VALUE_SIZE, 100)
        cache.put("a.test", (A1,), 30, BOTH)
        assert cache.get("a.test", BOTH) is not None
    finally:
        cache.close()
    again = SharedDnsCache.open(pin_dir, 100, clock=clock)
    again.close()
    assert again.replaced is None  # what it wrote is reused


def test_another_layout_version_or_size_is_replaced(pin_dir: str, clock: FakeClock) -> None:
    cache = SharedDnsCache.open(pin_dir, 100, clock=clock)
    cache.put("a.test", (A1,), 30, BOTH)
    cache.close()
    with loader.Map.open_pinned(os.path.join(pin_dir, "dns_cache_stats")) as stats:
        stats.update(int(dns_record.Stat.LAYOUT), 99)
    cache = SharedDnsCache.open(pin_dir, 100, clock=clock)
    try:
        assert cache.replaced == "dns_cache_stats: layout version 99, expected 1"
        assert cache.get("a.test", BOTH) is None  # nothing of the old layout is trusted
    finally:
        cache.close()
    resized = SharedDnsCache.open(pin_dir, 200, clock=clock)
    resized.close()
    assert resized.replaced == "dns_cache: max_entries: 200 changed to 100"


def test_a_held_lock_makes_it_unavailable(pin_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = loader.live_fds()
    monkeypatch.setattr(dns_cache, "LOCK_TIMEOUT", 0.05)
    fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(SharedCacheUnavailable, match="stayed locked by another process"):
            SharedDnsCache.open(pin_dir, 100)
    finally:
        os.close(fd)
    assert os.listdir(pin_dir) == []
    assert not loader_fds_opened_since(before)


def test_not_a_bpffs_path_is_unavailable_with_the_reason(tmp_path: os.PathLike[str]) -> None:
    before = loader.live_fds()
    with pytest.raises(SharedCacheUnavailable, match=r"pins is on \w+, not on a bpffs"):
        SharedDnsCache.open(os.path.join(str(tmp_path), "pins"), 100)
    assert not loader_fds_opened_since(before)


def _why_unavailable(pin_dir: str, *setpriv: str) -> str:
    """What ``SharedDnsCache.open(pin_dir)`` says in a process started by ``setpriv`` with
    these options (a real process with other privileges)."""
    code = (
        "from trio_sni.accel.dns_cache import SharedDnsCache\n"
        "from trio_sni.errors import SharedCacheUnavailable\n"
        "try:\n"
        f"    SharedDnsCache.open({pin_dir!r}, 100)\n"
        "except SharedCacheUnavailable as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        ["setpriv", *setpriv, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert os.listdir(pin_dir) == []  # nothing left pinned
    return result.stdout


def test_without_capabilities_it_is_unavailable_with_the_reason(pin_dir: str) -> None:
    """A real process without capabilities (root's bounding set emptied by setpriv) gets a
    reason, not a crash, and leaves nothing pinned."""
    why = _why_unavailable(pin_dir, "--bounding-set", "-all")
    assert why.startswith("not permitted: "), why
    assert "CAP_BPF" in why


def test_with_cap_bpf_a_pin_directory_of_another_user_is_named_as_the_cause(
    pin_dir: str,
) -> None:
    """A process holding CAP_BPF (and nothing that overrides file permissions) in front of
    a pin directory another user owns: the message says whose directory it is, not that
    CAP_BPF is missing. It stays uid 0 (so it can read the checkout and the venv wherever CI
    put them); the directory is given to uid 65534."""
    os.chown(pin_dir, 65534, 65534)
    why = _why_unavailable(pin_dir, "--bounding-set=-all,+bpf", "--inh-caps=-all")
    assert why.startswith("not permitted: "), why
    assert f"CAP_BPF is held, but {pin_dir} belongs to uid 65534" in why
    assert "this process is uid 0" in why


def test_processes_starting_together_end_up_on_one_map(pin_dir: str) -> None:
    """The flock serialises creation: eight openers at once, one map pair, one creator."""
    opened: list[SharedDnsCache] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(SharedDnsCache.open(pin_dir, 100))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert len({cache._cache.info().id for cache in opened}) == 1
        assert all(cache.replaced is None for cache in opened)
    finally:
        for cache in opened:
            cache.close()
