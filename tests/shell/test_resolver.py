"""The resolver against a real DNS server on loopback (tests/dnsserver.py).

Times are exact: the tests run on trio's autojump clock, and an exchange with the loopback
server takes zero virtual time (see tests/dnsserver.py), so a lookup that answers leaves
``trio.current_time()`` unchanged and one that hangs ends exactly on its deadline.
"""

from __future__ import annotations

import ipaddress
import socket

import attrs
import pytest
import trio
import trio.testing
from dnsserver import DNSServer

from trio_sni.errors import ResolveError
from trio_sni.resolver import (
    RESOLUTION_DELAY,
    IPAddress,
    LruAddressCache,
    Resolver,
    ResolverStatistics,
    order_addresses,
)
from trio_sni.sansio import config
from trio_sni.sansio.dns_record import DnsRecord, Families


def ips(*texts: str) -> tuple[IPAddress, ...]:
    return tuple(ipaddress.ip_address(t) for t in texts)


def dual_stack(server: DNSServer, name: str, *, ttl: int = 300) -> None:
    """Two A and two AAAA records for ``name``."""
    server.add(name, "A", "192.0.2.1", ttl=ttl)
    server.add(name, "A", "192.0.2.2", ttl=ttl)
    server.add(name, "AAAA", "2001:db8::1", ttl=ttl)
    server.add(name, "AAAA", "2001:db8::2", ttl=ttl)


# -- answers and family order ------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "expected", "queried"),
    [
        ("any", ("2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"), {"A", "AAAA"}),
        ("prefer_ipv6", ("2001:db8::1", "2001:db8::2", "192.0.2.1", "192.0.2.2"), {"A", "AAAA"}),
        ("prefer_ipv4", ("192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"), {"A", "AAAA"}),
        ("ipv4", ("192.0.2.1", "192.0.2.2"), {"A"}),
        ("ipv6", ("2001:db8::1", "2001:db8::2"), {"AAAA"}),
    ],
)
async def test_family_orders_and_filters(
    dns_server: DNSServer,
    autojump_clock: trio.testing.MockClock,
    family: config.Family,
    expected: tuple[str, ...],
    queried: set[str],
) -> None:
    dual_stack(dns_server, "dual.test")
    resolver = Resolver(dns_server.resolver_settings(family=family), timeout=5.0)

    assert await resolver.resolve("dual.test") == ips(*expected)
    assert trio.current_time() == 0
    for rdtype in ("A", "AAAA"):
        assert dns_server.query_count("dual.test", rdtype) == (1 if rdtype in queried else 0)


def test_any_interleaves_uneven_families_starting_with_ipv6() -> None:
    v6 = ips("2001:db8::1", "2001:db8::2", "2001:db8::3")
    v4 = ips("192.0.2.1")
    assert order_addresses(v6, v4, "any") == ips(
        "2001:db8::1", "192.0.2.1", "2001:db8::2", "2001:db8::3"
    )
    assert order_addresses((), v4, "any") == v4
    assert order_addresses(v6, (), "prefer_ipv4") == v6


async def test_only_one_family_published(dns_server: DNSServer) -> None:
    dns_server.add("v4only.test", "A", "192.0.2.7")
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    assert await resolver.resolve("v4only.test") == ips("192.0.2.7")


async def test_cname_is_followed(dns_server: DNSServer) -> None:
    dns_server.add("alias.test", "CNAME", "real.test", ttl=60)
    dns_server.add("real.test", "A", "192.0.2.8", ttl=60)
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    assert await resolver.resolve("alias.test") == ips("192.0.2.8")


async def test_name_is_case_and_trailing_dot_insensitive(dns_server: DNSServer) -> None:
    dns_server.add("mixed.test", "A", "192.0.2.9")
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    assert await resolver.resolve("Mixed.TEST.") == ips("192.0.2.9")
    assert await resolver.resolve("mixed.test") == ips("192.0.2.9")
    assert dns_server.query_count("mixed.test", "A") == 1


async def test_large_answer_falls_back_to_tcp(dns_server: DNSServer) -> None:
    # 100 A records are about 1.6 kB: more than the 1232-byte EDNS payload we advertise, so
    # the server truncates over UDP and the resolver must retry over TCP.
    addresses = [f"192.0.2.{i}" for i in range(1, 101)]
    for address in addresses:
        dns_server.add("many.test", "A", address)
    resolver = Resolver(dns_server.resolver_settings(family="ipv4"), timeout=5.0)
    assert await resolver.resolve("many.test") == ips(*addresses)
    assert dns_server.tcp_queries == 1


async def test_invalid_name() -> None:
    resolver = Resolver(config.Resolver(nameservers=("127.0.0.1:9",)), timeout=5.0)
    with pytest.raises(ResolveError, match=r"^'a\.\.b': not a valid DNS name \("):
        await resolver.resolve("a..b")


# -- static hosts ------------------------------------------------------------------------


async def test_static_hosts_never_query(dns_server: DNSServer) -> None:
    dual_stack(dns_server, "pinned.test")
    settings = dns_server.resolver_settings(hosts={"Pinned.Test.": ("192.0.2.50", "2001:db8::50")})
    resolver = Resolver(settings, timeout=5.0)

    assert await resolver.resolve("pinned.test") == ips("2001:db8::50", "192.0.2.50")
    assert await resolver.resolve("PINNED.test.") == ips("2001:db8::50", "192.0.2.50")
    assert dns_server.query_count("pinned.test") == 0
    assert resolver.statistics().static_hits == 2
    assert resolver.statistics().misses == 0


async def test_static_hosts_follow_family() -> None:
    settings = config.Resolver(
        nameservers=("127.0.0.1:9",),
        family="ipv4",
        hosts={"pinned.test": ("2001:db8::50", "192.0.2.50"), "v6.test": ("2001:db8::51",)},
    )
    resolver = Resolver(settings, timeout=5.0)
    assert await resolver.resolve("pinned.test") == ips("192.0.2.50")
    with pytest.raises(ResolveError) as exc_info:
        await resolver.resolve("v6.test")
    assert str(exc_info.value) == (
        "v6.test: the static hosts entry has no IPv4 address (resolver.family is ipv4)"
    )


# -- the cache: TTLs, clamps, negative answers -------------------------------------------


async def test_answer_cached_until_ttl_exactly(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    dns_server.add("ttl.test", "A", "192.0.2.1", ttl=30)
    resolver = Resolver(dns_server.resolver_settings(family="ipv4"), timeout=5.0)

    assert await resolver.resolve("ttl.test") == ips("192.0.2.1")
    assert trio.current_time() == 0
    dns_server.zone["ttl.test"] = [("A", "192.0.2.2", 30)]

    await trio.sleep_until(29.999)
    assert await resolver.resolve("ttl.test") == ips("192.0.2.1")
    assert dns_server.query_count("ttl.test", "A") == 1

    await trio.sleep_until(30.0)
    assert await resolver.resolve("ttl.test") == ips("192.0.2.2")
    assert dns_server.query_count("ttl.test", "A") == 2
    assert trio.current_time() == 30.0
    assert resolver.statistics() == ResolverStatistics(
        hits=1, misses=2, negative_hits=0, entries=1, static_hits=0, coalesced=0
    )


@pytest.mark.parametrize(
    ("record_ttl", "min_ttl", "max_ttl", "lives"),
    [
        (1, 5.0, 3600.0, 5.0),  # raised to min_ttl
        (86400, 5.0, 60.0, 60.0),  # cut to max_ttl
        (42, 5.0, 60.0, 42.0),  # inside the range: as published
    ],
)
async def test_ttl_clamped(
    dns_server: DNSServer,
    autojump_clock: trio.testing.MockClock,
    record_ttl: int,
    min_ttl: float,
    max_ttl: float,
    lives: float,
) -> None:
    dns_server.add("clamp.test", "A", "192.0.2.1", ttl=record_ttl)
    settings = dns_server.resolver_settings(family="ipv4", min_ttl=min_ttl, max_ttl=max_ttl)
    resolver = Resolver(settings, timeout=5.0)

    await resolver.resolve("clamp.test")
    await trio.sleep_until(lives - 0.001)
    await resolver.resolve("clamp.test")
    assert dns_server.query_count("clamp.test") == 1
    await trio.sleep_until(lives)
    await resolver.resolve("clamp.test")
    assert dns_server.query_count("clamp.test") == 2


async def test_zero_ttl_is_not_cached(dns_server: DNSServer) -> None:
    dns_server.add("zero.test", "A", "192.0.2.1", ttl=0)
    resolver = Resolver(dns_server.resolver_settings(family="ipv4", min_ttl=0.0), timeout=5.0)
    await resolver.resolve("zero.test")
    await resolver.resolve("zero.test")
    assert dns_server.query_count("zero.test") == 2
    assert resolver.statistics().entries == 0


async def test_cname_chain_uses_the_smallest_ttl(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    dns_server.add("alias.test", "CNAME", "real.test", ttl=10)
    dns_server.add("real.test", "A", "192.0.2.8", ttl=300)
    resolver = Resolver(dns_server.resolver_settings(family="ipv4"), timeout=5.0)
    await resolver.resolve("alias.test")
    await trio.sleep_until(9.999)
    await resolver.resolve("alias.test")
    assert dns_server.query_count("alias.test") == 1
    await trio.sleep_until(10.0)
    await resolver.resolve("alias.test")
    assert dns_server.query_count("alias.test") == 2


async def test_nxdomain_negatively_cached(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    resolver = Resolver(dns_server.resolver_settings(negative_ttl=30.0), timeout=5.0)
    with pytest.raises(ResolveError) as exc_info:
        await resolver.resolve("bench.test")
    assert str(exc_info.value) == "bench.test: no such domain (NXDOMAIN)"
    assert exc_info.value.reason == "resolve_failed"
    queries = dns_server.query_count("bench.test")

    # The name appears, but the failure is remembered for negative_ttl.
    dns_server.add("bench.test", "A", "192.0.2.1")
    await trio.sleep_until(29.999)
    with pytest.raises(ResolveError, match=r"^bench\.test: no such domain \(NXDOMAIN\)$"):
        await resolver.resolve("bench.test")
    assert dns_server.query_count("bench.test") == queries
    assert resolver.statistics().negative_hits == 1

    await trio.sleep_until(30.0)
    assert await resolver.resolve("bench.test") == ips("192.0.2.1")


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ("any", "nodata.test: no A/AAAA records"),
        ("prefer_ipv4", "nodata.test: no A/AAAA records"),
        ("ipv4", "nodata.test: no A records"),
        ("ipv6", "nodata.test: no AAAA records"),
    ],
)
async def test_no_address_records(
    dns_server: DNSServer, family: config.Family, message: str
) -> None:
    dns_server.add("nodata.test", "TXT", '"hello"')
    resolver = Resolver(dns_server.resolver_settings(family=family), timeout=5.0)
    for _ in range(2):
        with pytest.raises(ResolveError) as exc_info:
            await resolver.resolve("nodata.test")
        assert str(exc_info.value) == message
    assert resolver.statistics().negative_hits == 1
    assert dns_server.query_count("nodata.test") == (1 if family in ("ipv4", "ipv6") else 2)


async def test_ipv4_only_name_with_family_ipv6(dns_server: DNSServer) -> None:
    dns_server.add("v4only.test", "A", "192.0.2.7")
    resolver = Resolver(dns_server.resolver_settings(family="ipv6"), timeout=5.0)
    with pytest.raises(ResolveError, match=r"^v4only\.test: no AAAA records$"):
        await resolver.resolve("v4only.test")


async def test_lru_bound(dns_server: DNSServer) -> None:
    for name in ("a.test", "b.test", "c.test"):
        dns_server.add(name, "A", "192.0.2.1")
    resolver = Resolver(dns_server.resolver_settings(family="ipv4", cache_size=2), timeout=5.0)
    await resolver.resolve("a.test")
    await resolver.resolve("b.test")
    await resolver.resolve("a.test")  # a is now the most recently used
    await resolver.resolve("c.test")  # evicts b
    assert resolver.statistics().entries == 2
    await resolver.resolve("a.test")
    assert dns_server.query_count("a.test") == 1
    await resolver.resolve("b.test")
    assert dns_server.query_count("b.test") == 2


def test_lru_cache_expiry_and_eviction() -> None:
    cache = LruAddressCache(2)
    cache.put("a", ips("192.0.2.1"), 10.0)
    cache.put("n", (), 5.0, error="n: no such domain (NXDOMAIN)")
    entry = cache.get("n", 4.0)
    assert entry is not None
    assert entry.error == "n: no such domain (NXDOMAIN)"
    assert cache.get("n", 5.0) is None  # expired exactly at expires_at, and dropped
    assert len(cache) == 1
    cache.put("b", ips("192.0.2.2"), 10.0)
    cache.put("c", ips("192.0.2.3"), 10.0)
    assert cache.get("a", 0.0) is None  # the least recently used went first
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="at least 1"):
        LruAddressCache(0)


# -- concurrency: one query per burst ----------------------------------------------------


async def test_concurrent_lookups_coalesce(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    dual_stack(dns_server, "burst.test")
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    results: list[tuple[IPAddress, ...]] = []

    async def lookup() -> None:
        results.append(await resolver.resolve("burst.test"))

    # All ten start before the first query is answered: the first sends the queries, the
    # other nine wait for its answer.
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(lookup)

    assert results == [ips("2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2")] * 10
    assert dns_server.query_count("burst.test", "A") == 1
    assert dns_server.query_count("burst.test", "AAAA") == 1
    stats = resolver.statistics()
    assert (stats.misses, stats.coalesced, stats.hits) == (1, 9, 0)
    assert trio.current_time() == 0


async def test_concurrent_failures_coalesce(dns_server: DNSServer) -> None:
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    errors: list[str] = []

    async def lookup() -> None:
        try:
            await resolver.resolve("missing.test")
        except ResolveError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lookup)
    assert errors == ["missing.test: no such domain (NXDOMAIN)"] * 5
    assert dns_server.query_count("missing.test", "A") <= 1
    assert dns_server.query_count("missing.test", "AAAA") == 1


async def test_waiter_takes_over_when_the_first_caller_is_cancelled(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    dns_server.add("slow.test", "A", "192.0.2.1")
    dns_server.hang.add("slow.test")
    resolver = Resolver(dns_server.resolver_settings(family="ipv4"), timeout=5.0)
    result: list[tuple[IPAddress, ...]] = []

    async def leader() -> None:
        with trio.move_on_after(1.0):  # the leader's client goes away at t=1
            await resolver.resolve("slow.test")

    async def follower() -> None:
        result.append(await resolver.resolve("slow.test"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follower)
        await trio.sleep(0.5)
        dns_server.hang.clear()

    assert result == [ips("192.0.2.1")]
    assert trio.current_time() == 1.0  # the follower queried again as soon as the leader left
    assert dns_server.query_count("slow.test", "A") == 2
    assert resolver.statistics().misses == 2


# -- failures ----------------------------------------------------------------------------


async def test_timeout_exact(dns_server: DNSServer, autojump_clock: trio.testing.MockClock) -> None:
    dns_server.hang.add("x.test")
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    with pytest.raises(ResolveError) as exc_info:
        await resolver.resolve("x.test")
    assert str(exc_info.value) == (
        f"x.test: DNS timed out after 5.0 s (nameservers 127.0.0.1:{dns_server.port})"
    )
    assert trio.current_time() == 5.0
    # Timeouts are transient: not cached.
    assert resolver.statistics().entries == 0


async def test_timeout_names_every_nameserver(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    dns_server.hang.add("x.test")
    settings = config.Resolver(nameservers=(dns_server.nameserver, dns_server.nameserver))
    resolver = Resolver(settings, timeout=0.5)
    with pytest.raises(ResolveError) as exc_info:
        await resolver.resolve("x.test")
    ns = dns_server.nameserver
    assert str(exc_info.value) == f"x.test: DNS timed out after 0.5 s (nameservers {ns}, {ns})"
    assert trio.current_time() == 0.5


async def test_other_family_gets_the_resolution_delay(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    # A nameserver that drops AAAA queries must not hold connections for the whole timeout.
    dns_server.add("noaaaa.test", "A", "192.0.2.1", ttl=300)
    dns_server.hang.add(("noaaaa.test", "AAAA"))
    resolver = Resolver(dns_server.resolver_settings(negative_ttl=30.0), timeout=5.0)

    assert await resolver.resolve("noaaaa.test") == ips("192.0.2.1")
    assert trio.current_time() == RESOLUTION_DELAY
    # A partial answer is kept only as long as a failure would be, then asked again.
    await trio.sleep_until(RESOLUTION_DELAY + 30.0 - 0.001)
    await resolver.resolve("noaaaa.test")
    assert dns_server.query_count("noaaaa.test", "A") == 1
    await trio.sleep_until(RESOLUTION_DELAY + 30.0)
    await resolver.resolve("noaaaa.test")
    assert dns_server.query_count("noaaaa.test", "A") == 2


async def test_servfail(dns_server: DNSServer) -> None:
    dns_server.servfail.add("x.test")
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    for _ in range(2):
        with pytest.raises(ResolveError) as exc_info:
            await resolver.resolve("x.test")
        assert str(exc_info.value) == "x.test: DNS server failure (SERVFAIL)"
    # A server failure is transient: not cached, asked again.
    assert dns_server.query_count("x.test", "A") == 2
    assert resolver.statistics().negative_hits == 0


async def test_servfail_on_one_family_still_answers(dns_server: DNSServer) -> None:
    dns_server.add("half.test", "A", "192.0.2.1")
    dns_server.servfail.add(("half.test", "AAAA"))
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    assert await resolver.resolve("half.test") == ips("192.0.2.1")


async def test_nameserver_not_running(autojump_clock: trio.testing.MockClock) -> None:
    # dnspython's trio backend uses unconnected UDP sockets, so the ICMP "port unreachable"
    # is not reported: a nameserver that is not there reads as a timeout naming it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    resolver = Resolver(config.Resolver(nameservers=(f"127.0.0.1:{port}",)), timeout=5.0)
    with pytest.raises(ResolveError) as exc_info:
        await resolver.resolve("x.test")
    assert str(exc_info.value) == (
        f"x.test: DNS timed out after 5.0 s (nameservers 127.0.0.1:{port})"
    )
    assert trio.current_time() == 5.0


# -- reconfigure and statistics ----------------------------------------------------------


async def test_reconfigure_clears_the_cache_and_applies_settings(dns_server: DNSServer) -> None:
    dual_stack(dns_server, "re.test")
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    await resolver.resolve("re.test")
    await resolver.resolve("re.test")
    assert dns_server.query_count("re.test", "A") == 1
    assert resolver.statistics().entries == 1

    resolver.reconfigure(dns_server.resolver_settings(family="ipv4"))
    assert resolver.statistics().entries == 0
    assert await resolver.resolve("re.test") == ips("192.0.2.1", "192.0.2.2")
    assert dns_server.query_count("re.test", "A") == 2

    resolver.reconfigure(dns_server.resolver_settings(hosts={"re.test": ("192.0.2.99",)}))
    assert await resolver.resolve("re.test") == ips("192.0.2.99")
    assert dns_server.query_count("re.test", "A") == 2


async def test_lookup_in_flight_during_reconfigure_is_not_cached(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    dns_server.add("old.test", "A", "192.0.2.1")
    dns_server.hang.add("old.test")
    resolver = Resolver(dns_server.resolver_settings(family="ipv4"), timeout=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.resolve, "old.test")
        await trio.testing.wait_all_tasks_blocked()
        resolver.reconfigure(dns_server.resolver_settings(family="ipv4"))
        dns_server.hang.clear()
    assert resolver.statistics().entries == 0


def test_statistics_is_a_frozen_record() -> None:
    resolver = Resolver(config.Resolver(nameservers=("127.0.0.1:9",)), timeout=5.0)
    stats = resolver.statistics()
    assert stats == ResolverStatistics(
        hits=0, misses=0, negative_hits=0, entries=0, static_hits=0, coalesced=0
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.hits = 1  # type: ignore[misc]


async def test_reconfigure_can_change_the_timeout(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    dns_server.hang.add("x.test")
    resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
    resolver.reconfigure(dns_server.resolver_settings(), timeout=1.5)
    with pytest.raises(ResolveError, match=r"DNS timed out after 1\.5 s"):
        await resolver.resolve("x.test")
    assert trio.current_time() == 1.5


# -- a shared tier behind the in-process cache (no kernel: a dict stands in for the map) --


@attrs.define
class DictSharedCache:
    """The SharedCache protocol over a dict, expiring on trio's clock."""

    entries: dict[str, tuple[DnsRecord, float]] = attrs.Factory(dict)
    lookups: int = 0

    def get(self, name: str, needed: Families) -> tuple[DnsRecord, float] | None:
        self.lookups += 1
        found = self.entries.get(name)
        if found is None or not found[0].covers(needed):
            return None
        left = found[1] - trio.current_time()
        return (found[0], left) if left > 0 else None

    def put(
        self, name: str, addresses: tuple[IPAddress, ...], ttl: float, families: Families
    ) -> None:
        record = DnsRecord.from_addresses(addresses, families, 0)
        self.entries[name] = (record, trio.current_time() + ttl)


async def test_lookup_order_is_local_then_shared_then_dns(
    dns_server: DNSServer, autojump_clock: trio.testing.MockClock
) -> None:
    dual_stack(dns_server, "a.test", ttl=60)
    shared = DictSharedCache()
    one = Resolver(dns_server.resolver_settings(), timeout=5.0)
    two = Resolver(dns_server.resolver_settings(family="prefer_ipv4"), timeout=5.0)
    one.use_shared_cache(shared)
    two.use_shared_cache(shared)
    await one.resolve("a.test")
    assert dns_server.query_count("a.test") == 2
    assert set(shared.entries) == {"a.test"}  # written to both tiers
    await trio.sleep_until(30)
    assert await two.resolve("a.test") == ips(
        "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"
    )  # ordered for two's family
    assert dns_server.query_count("a.test") == 2
    lookups = shared.lookups
    await trio.sleep_until(59.999)
    await two.resolve("a.test")  # its own tier until the shared entry's expiry
    assert shared.lookups == lookups
    await trio.sleep_until(60)  # the answer's TTL is over in both tiers
    await two.resolve("a.test")
    assert dns_server.query_count("a.test") == 4
    with pytest.raises(ResolveError, match="NXDOMAIN"):
        await one.resolve("missing.test")
    assert set(shared.entries) == {"a.test"}  # failures stay in the process
