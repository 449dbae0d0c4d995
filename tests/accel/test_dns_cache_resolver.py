"""Two resolvers ("processes") sharing the pinned DNS cache map, against the loopback DNS
server, on trio's autojump clock: lookup order in-process -> shared map -> DNS, TTLs exact.

The shared tier's clock is the autojump clock (in nanoseconds), so expiry is tested to the
nanosecond without waiting.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing
from dnsserver import DNSServer

from trio_sni.accel.dns_cache import SharedDnsCache
from trio_sni.errors import ResolveError
from trio_sni.resolver import Resolver, TieredAddressCache

pytestmark = pytest.mark.bpf


def trio_clock_ns() -> int:
    return round(trio.current_time() * 1e9)


@pytest.fixture
def shared_pair(pin_dir: str) -> Iterator[tuple[SharedDnsCache, SharedDnsCache]]:
    """Two openers of one pinned map, as two proxy processes would have."""
    with (
        SharedDnsCache.open(pin_dir, 100, clock=trio_clock_ns) as first,
        SharedDnsCache.open(pin_dir, 100, clock=trio_clock_ns) as second,
    ):
        yield first, second


def resolver(dns_server: DNSServer, shared: SharedDnsCache, **settings: object) -> Resolver:
    r = Resolver(dns_server.resolver_settings(**settings), timeout=5.0)
    r.use_shared_cache(shared)
    return r


async def test_the_second_process_answers_from_the_map_without_dns(
    dns_server: DNSServer,
    shared_pair: tuple[SharedDnsCache, SharedDnsCache],
    autojump_clock: trio.testing.MockClock,
) -> None:
    dns_server.add("a.test", "A", "192.0.2.1", ttl=60)
    dns_server.add("a.test", "AAAA", "2001:db8::1", ttl=60)
    one, two = (resolver(dns_server, s) for s in shared_pair)
    addresses = await one.resolve("a.test")
    assert [str(a) for a in addresses] == ["2001:db8::1", "192.0.2.1"]
    assert dns_server.query_count("a.test") == 2
    await trio.sleep_until(20)
    assert await two.resolve("A.test.") == addresses
    assert dns_server.query_count("a.test") == 2  # no new query
    assert shared_pair[1].hits == 1
    assert shared_pair[0].misses == 1
    # Now in two's own tier for the 40 s left: no map lookup either.
    await trio.sleep_until(59.999)
    assert await two.resolve("a.test") == addresses
    assert shared_pair[1].hits == 1
    assert two.statistics().hits == 2
    assert two.statistics().misses == 0
    await trio.sleep_until(60)  # the answer's TTL is over in both tiers
    assert await two.resolve("a.test") == addresses
    assert dns_server.query_count("a.test") == 4
    assert shared_pair[1].misses == 1


async def test_max_ttl_of_the_reader_caps_a_shared_entry(
    dns_server: DNSServer,
    shared_pair: tuple[SharedDnsCache, SharedDnsCache],
    autojump_clock: trio.testing.MockClock,
) -> None:
    dns_server.add("a.test", "A", "192.0.2.1", ttl=600)
    one = resolver(dns_server, shared_pair[0], family="ipv4")
    two = resolver(dns_server, shared_pair[1], family="ipv4", max_ttl=10.0)
    await one.resolve("a.test")
    await two.resolve("a.test")  # from the map, kept locally for 10 s, not 600
    assert dns_server.query_count("a.test") == 1
    await trio.sleep_until(10)
    shared_hits = shared_pair[1].hits
    await two.resolve("a.test")  # local entry gone: the map again (still live there)
    assert shared_pair[1].hits == shared_hits + 1
    assert dns_server.query_count("a.test") == 1


async def test_failures_are_not_shared(
    dns_server: DNSServer,
    shared_pair: tuple[SharedDnsCache, SharedDnsCache],
    autojump_clock: trio.testing.MockClock,
) -> None:
    one, two = (resolver(dns_server, s) for s in shared_pair)
    for r in (one, two):
        with pytest.raises(ResolveError, match="NXDOMAIN"):
            await r.resolve("missing.test")
    assert dns_server.query_count("missing.test") == 4  # each process asked for itself
    assert shared_pair[0].statistics().entries == 0


async def test_an_ipv4_only_answer_does_not_serve_a_process_that_wants_ipv6(
    dns_server: DNSServer,
    shared_pair: tuple[SharedDnsCache, SharedDnsCache],
    autojump_clock: trio.testing.MockClock,
) -> None:
    dns_server.add("a.test", "A", "192.0.2.1", ttl=60)
    dns_server.add("a.test", "AAAA", "2001:db8::1", ttl=60)
    v4_only = resolver(dns_server, shared_pair[0], family="ipv4")
    both = resolver(dns_server, shared_pair[1], family="prefer_ipv4")
    assert [str(a) for a in await v4_only.resolve("a.test")] == ["192.0.2.1"]
    assert [str(a) for a in await both.resolve("a.test")] == ["192.0.2.1", "2001:db8::1"]
    assert dns_server.query_count("a.test", "AAAA") == 1  # asked by the second one only
    # The second answer (both families) replaced the entry: the first can still use it.
    fresh = resolver(dns_server, shared_pair[0], family="ipv6")
    assert [str(a) for a in await fresh.resolve("a.test")] == ["2001:db8::1"]
    assert dns_server.query_count("a.test") == 3


async def test_reload_clears_only_the_local_tier(
    dns_server: DNSServer,
    shared_pair: tuple[SharedDnsCache, SharedDnsCache],
    autojump_clock: trio.testing.MockClock,
) -> None:
    dns_server.add("a.test", "A", "192.0.2.1", ttl=60)
    one = resolver(dns_server, shared_pair[0], family="ipv4")
    await one.resolve("a.test")
    one.reconfigure(dns_server.resolver_settings(family="ipv4"))
    assert isinstance(one._cache, TieredAddressCache)
    assert len(one._cache) == 0
    await one.resolve("a.test")
    assert dns_server.query_count("a.test") == 1  # answered from the map after the reload
    one.use_shared_cache(None)  # the proxy stopped using the map
    one.reconfigure(dns_server.resolver_settings(family="ipv4"))
    await one.resolve("a.test")
    assert dns_server.query_count("a.test") == 2
