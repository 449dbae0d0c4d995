"""Async DNS for upstream targets: A and AAAA at once, a TTL-aware cache, one query per name.

Theory of operation
-------------------

``Resolver.resolve(name)`` answers, in this order:

1. From the static ``hosts`` overrides, with no DNS at all (the operator pinned the name).
2. From the cache (:class:`LruAddressCache`). Positive entries live for the answer's TTL
   clamped to ``[min_ttl, max_ttl]``; NXDOMAIN and "no A/AAAA records" are cached for
   ``negative_ttl`` and re-raised with the same message. Expiry is measured on
   ``trio.current_time()``, so tests drive it with trio's autojump clock, and an entry is
   expired at exactly ``expires_at``.
3. From a lookup already in flight for the same name: the first caller (the *leader*) sends
   the queries, later callers wait for its outcome, so a burst of N connections to a cold
   name costs one A and one AAAA query, not N of each. If the leader is cancelled (its client
   went away), a waiter takes over and sends the queries itself.
4. From DNS: the leader queries A and AAAA concurrently (dnspython's async resolver on its
   trio backend) under one trio deadline of ``timeout`` seconds. As soon as one family has
   addresses, the other gets at most :data:`RESOLUTION_DELAY` more (RFC 8305 section 3), so a
   nameserver that drops AAAA queries does not hold every connection for the whole timeout.

The deadline is trio's, not dnspython's: dnspython measures its ``lifetime`` on the wall
clock, which neither follows the autojump clock nor agrees with the caller's cancel scopes,
so its lifetime is set to infinity and the trio deadline alone bounds a lookup. dnspython's
per-attempt timeout (2 s, or resolv.conf's ``options timeout``) still paces retransmission;
it subtracts elapsed wall-clock time, so on the autojump clock the retransmission instants are
not exact, while the deadline and the resolution delay are.

Addresses come back ordered by ``family``: ``any`` interleaves IPv6 and IPv4 starting with
IPv6 (RFC 8305 section 4), ``prefer_*`` puts the preferred family first, ``ipv4``/``ipv6``
query and return only that family. The connector (:mod:`.upstream`) then tries them in this
order.

The cache is a small class behind the :class:`AddressCache` protocol. With a shared tier
(:meth:`Resolver.use_shared_cache`: the pinned BPF LRU map every proxy on the host shares,
:mod:`trio_sni.accel.dns_cache`), it is a :class:`TieredAddressCache`: the in-process dict
first (tens of nanoseconds), then the shared map (one ``bpf()`` syscall, about a
microsecond), then DNS; a DNS answer is written to both, and an answer from the shared map is
copied into the in-process tier for its remaining TTL. Only positive answers are shared:
failures stay in the process, so a flood of random names cannot push other processes' good
answers out of the shared map.
"""

from __future__ import annotations

import collections
import ipaddress
import math
from collections.abc import Callable
from typing import Protocol

import attrs
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import trio

from .errors import ResolveError
from .sansio import config
from .sansio.config import parse_host_port
from .sansio.dns_record import DnsRecord, Families, families_for

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: EDNS0 UDP payload size advertised to nameservers (DNS Flag Day 2020 recommendation).
_EDNS_PAYLOAD = 1232

#: RFC 8305 section 3 ("Resolution Delay"): once one family has answered with addresses,
#: wait at most this long (50 ms, the RFC's recommended value) for the other one.
RESOLUTION_DELAY = 0.05


@attrs.frozen
class CacheEntry:
    """One cached answer.

    ``error`` is set on negative entries (NXDOMAIN, no records): the operator-readable message
    to raise again, so a cached failure reads exactly like the original one.
    """

    addresses: tuple[IPAddress, ...]
    expires_at: float
    error: str | None = None


class AddressCache(Protocol):
    """What the resolver needs from a cache tier; times are ``trio.current_time()`` values."""

    def get(self, name: str, now: float) -> CacheEntry | None:
        """The live entry for ``name``, or None if absent or expired at ``now``."""
        ...

    def put(
        self,
        name: str,
        addresses: tuple[IPAddress, ...],
        expires_at: float,
        *,
        error: str | None = None,
    ) -> None:
        """Store an answer (or, with ``error``, a negative entry) until ``expires_at``."""
        ...

    def clear(self) -> None:
        """Forget everything (SIGHUP: the nameservers or overrides may have changed)."""
        ...

    def __len__(self) -> int: ...


class LruAddressCache:
    """An in-process cache bounded to ``max_entries``, evicting the least recently used.

    Bounded because names come from clients' SNI: without a bound, a client sending random
    names (all NXDOMAIN, all negatively cached) could grow the cache without limit. Expired
    entries are dropped when they are next looked up or when they reach the LRU end, so
    ``len()`` may count a few expired entries.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        self._entries: collections.OrderedDict[str, CacheEntry] = collections.OrderedDict()

    def get(self, name: str, now: float) -> CacheEntry | None:
        """The live entry for ``name``; an entry is expired from ``now == expires_at`` on."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if now >= entry.expires_at:
            del self._entries[name]
            return None
        self._entries.move_to_end(name)
        return entry

    def put(
        self,
        name: str,
        addresses: tuple[IPAddress, ...],
        expires_at: float,
        *,
        error: str | None = None,
    ) -> None:
        """Store an entry, evicting the least recently used ones beyond ``max_entries``."""
        self._entries[name] = CacheEntry(addresses, expires_at, error)
        self._entries.move_to_end(name)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class SharedCache(Protocol):
    """A cache shared with other processes (:class:`trio_sni.accel.dns_cache.SharedDnsCache`).

    Its time is its own (seconds left, not ``trio.current_time()`` values): processes do not
    share a trio clock.
    """

    def get(self, name: str, needed: Families) -> tuple[DnsRecord, float] | None:
        """The record for ``name`` and its seconds left, if live and asked for ``needed``."""
        ...

    def put(
        self, name: str, addresses: tuple[IPAddress, ...], ttl: float, families: Families
    ) -> None:
        """Share ``addresses`` for ``ttl`` seconds; ``families`` were asked for."""
        ...


class TieredAddressCache:
    """The in-process cache in front of a shared one (lookup order: local, shared, DNS).

    Args:
        local: the in-process tier; it alone holds negative entries.
        shared: the tier shared with the other processes on the host.
        family: ``resolver.family``: which families a shared entry must cover, and how its
            addresses are ordered for this process.
        max_ttl: ``resolver.max_ttl``: a shared entry lives no longer than this here, whatever
            another process wrote.
        clock: ``trio.current_time``, to turn ``expires_at`` into a TTL for the shared tier.
    """

    def __init__(
        self,
        local: AddressCache,
        shared: SharedCache,
        *,
        family: config.Family,
        max_ttl: float,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.local = local
        self.shared = shared
        self._family = family
        self._needed = families_for(family)
        self._max_ttl = max_ttl
        self._clock = clock

    def get(self, name: str, now: float) -> CacheEntry | None:
        """From the local tier, else from the shared one (then kept locally too)."""
        entry = self.local.get(name, now)
        if entry is not None:
            return entry
        found = self.shared.get(name, self._needed)
        if found is None:
            return None
        record, left = found
        addresses = order_addresses(record.v6, record.v4, self._family)
        if not addresses:
            return None  # e.g. only IPv4 shared, IPv6 wanted: DNS says what this means here
        expires_at = now + min(left, self._max_ttl)
        self.local.put(name, addresses, expires_at)
        return CacheEntry(addresses, expires_at)

    def put(
        self,
        name: str,
        addresses: tuple[IPAddress, ...],
        expires_at: float,
        *,
        error: str | None = None,
    ) -> None:
        """Store locally; share positive answers."""
        self.local.put(name, addresses, expires_at, error=error)
        if error is None and addresses:
            self.shared.put(name, addresses, expires_at - self._clock(), self._needed)

    def clear(self) -> None:
        """Forget the local tier only: the shared one belongs to every proxy on the host."""
        self.local.clear()

    def __len__(self) -> int:
        return len(self.local)


@attrs.frozen
class ResolverStatistics:
    """Counters since the resolver was created (``reconfigure`` keeps them; ``entries`` is now).

    Attributes:
        hits: answered from a positive cache entry.
        misses: lookups that sent DNS queries (one per coalesced burst).
        negative_hits: answered from a negative cache entry (re-raised ResolveError).
        entries: entries in the cache now.
        static_hits: answered from the static ``hosts`` overrides.
        coalesced: callers that waited for another caller's lookup instead of querying.
    """

    hits: int
    misses: int
    negative_hits: int
    entries: int
    static_hits: int
    coalesced: int


@attrs.define(eq=False)
class _Flight:
    """A lookup in progress; ``outcome`` stays None if the leader was cancelled."""

    done: trio.Event = attrs.Factory(trio.Event)
    outcome: _Outcome | None = None


@attrs.frozen
class _Outcome:
    addresses: tuple[IPAddress, ...] = ()
    error: str | None = None

    def unwrap(self) -> tuple[IPAddress, ...]:
        if self.error is not None:
            raise ResolveError(self.error)
        return self.addresses


_A = dns.rdatatype.RdataType.A
_AAAA = dns.rdatatype.RdataType.AAAA

_RDTYPES: dict[str, tuple[dns.rdatatype.RdataType, ...]] = {
    "any": (_AAAA, _A),
    "prefer_ipv6": (_AAAA, _A),
    "prefer_ipv4": (_A, _AAAA),
    "ipv4": (_A,),
    "ipv6": (_AAAA,),
}

_NO_RECORDS: dict[str, str] = {
    "any": "no A/AAAA records",
    "prefer_ipv6": "no A/AAAA records",
    "prefer_ipv4": "no A/AAAA records",
    "ipv4": "no A records",
    "ipv6": "no AAAA records",
}

# What the rcode in a failed answer means, in words an operator can act on.
_RCODE_MESSAGES: dict[str, str] = {
    "SERVFAIL": "DNS server failure (SERVFAIL)",
    "REFUSED": "DNS server refused the query (REFUSED)",
    "NOTIMP": "DNS server does not implement the query (NOTIMP)",
    "FORMERR": "DNS server rejected the query as malformed (FORMERR)",
}


def order_addresses(
    v6: tuple[IPAddress, ...], v4: tuple[IPAddress, ...], family: config.Family
) -> tuple[IPAddress, ...]:
    """Order addresses for connection attempts according to ``family``.

    ``any`` interleaves the families starting with IPv6 (RFC 8305 section 4, "First Address
    Family Count" of 1): if one family is broken, the second attempt already uses the other.
    """
    if family == "ipv4":
        return v4
    if family == "ipv6":
        return v6
    if family == "prefer_ipv4":
        return v4 + v6
    if family == "prefer_ipv6":
        return v6 + v4
    interleaved: list[IPAddress] = []
    for i in range(max(len(v6), len(v4))):
        interleaved.extend(v6[i : i + 1])
        interleaved.extend(v4[i : i + 1])
    return tuple(interleaved)


def _normalise(name: str) -> str:
    """Lower-case and drop one trailing dot: the cache and ``hosts`` key."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def _format_nameserver(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _dedupe(addresses: list[IPAddress]) -> tuple[IPAddress, ...]:
    return tuple(dict.fromkeys(addresses))


class Resolver:
    """Resolve target names to addresses, with a cache and coalescing (see the module doc).

    Args:
        settings: the ``resolver`` section of the config.
        timeout: the whole lookup's deadline in seconds (``timeouts.resolve``).

    ``reconfigure`` swaps settings in place (SIGHUP), so connections hold one long-lived
    Resolver and never see a half-applied configuration.
    """

    def __init__(self, settings: config.Resolver, *, timeout: float) -> None:
        self._timeout = timeout
        self._shared: SharedCache | None = None
        self._backend = dns.asyncbackend.get_backend("trio")
        self._hits = 0
        self._misses = 0
        self._negative_hits = 0
        self._static_hits = 0
        self._coalesced = 0
        self.reconfigure(settings)

    def reconfigure(self, settings: config.Resolver, *, timeout: float | None = None) -> None:
        """Apply new settings (and optionally a new lookup timeout) and clear the cache.

        The cache is cleared because the nameservers or overrides may have changed, so old
        answers (and old failures) may no longer be what the operator wants. Lookups already
        in flight finish under the old settings but their answers are not cached, and new
        callers do not join them. On error nothing changes, so a bad reload keeps the old
        resolver working.

        Raises:
            ResolveError: ``nameservers`` is empty and the system configuration
                (``/etc/resolv.conf``) cannot be read.
        """
        hosts = {
            _normalise(name): tuple(ipaddress.ip_address(a) for a in addresses)
            for name, addresses in settings.hosts.items()
        }
        dns_resolver, nameservers_text = self._make_dns_resolver(settings)
        self._settings = settings
        self._hosts = hosts
        self._dns, self._nameservers_text = dns_resolver, nameservers_text
        if timeout is not None:
            self._timeout = timeout
        self._cache = self._make_cache()
        self._inflight: dict[str, _Flight] = {}
        self._generation = getattr(self, "_generation", 0) + 1

    def use_shared_cache(self, shared: SharedCache | None) -> None:
        """Put ``shared`` behind the in-process cache (None: the in-process tier alone).

        The in-process tier starts empty, as after a reload.
        """
        self._shared = shared
        self._cache = self._make_cache()

    def _make_cache(self) -> AddressCache:
        local = LruAddressCache(self._settings.cache_size)
        if self._shared is None:
            return local
        return TieredAddressCache(
            local, self._shared, family=self._settings.family, max_ttl=self._settings.max_ttl
        )

    @staticmethod
    def _make_dns_resolver(settings: config.Resolver) -> tuple[dns.asyncresolver.Resolver, str]:
        if settings.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            servers = [parse_host_port(text, default_port=53) for text in settings.nameservers]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration as exc:
                raise ResolveError(
                    "no nameservers configured and the system's could not be read "
                    f"({exc}); set resolver.nameservers"
                ) from None
            servers = []
            for server in resolver.nameservers:
                if isinstance(server, str):
                    port = resolver.nameserver_ports.get(server, resolver.port)
                    servers.append((server, port))
                elif isinstance(server, dns.nameserver.AddressAndPortNameserver):
                    servers.append((server.address, server.port))
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in servers]
        # EDNS0 with a 1232-byte UDP payload (the DNS Flag Day 2020 value, which avoids IP
        # fragmentation): a name with many addresses still fits in one datagram instead of
        # costing a truncated reply and a TCP retry.
        resolver.use_edns(0, 0, _EDNS_PAYLOAD)
        # The trio deadline bounds the lookup; dnspython's wall-clock lifetime must never
        # fire first (see the module docstring).
        resolver.lifetime = math.inf
        return resolver, ", ".join(_format_nameserver(a, p) for a, p in servers)

    def statistics(self) -> ResolverStatistics:
        """A snapshot of the counters (trio's ``statistics()`` convention)."""
        return ResolverStatistics(
            hits=self._hits,
            misses=self._misses,
            negative_hits=self._negative_hits,
            entries=len(self._cache),
            static_hits=self._static_hits,
            coalesced=self._coalesced,
        )

    async def resolve(self, name: str) -> tuple[IPAddress, ...]:
        """The addresses of ``name``, ordered for connection attempts by ``family``.

        Always a checkpoint, also when answered from ``hosts`` or the cache.

        Args:
            name: a host name (case and one trailing dot do not matter).

        Returns:
            At least one address.

        Raises:
            ResolveError: with a message naming the name and the cause, such as
                ``"x.test: no such domain (NXDOMAIN)"``, ``"x.test: no A/AAAA records"``,
                ``"x.test: DNS server failure (SERVFAIL)"`` or
                ``"x.test: DNS timed out after 5.0 s (nameservers 127.0.0.53:53)"``.
        """
        await trio.lowlevel.checkpoint()
        key = _normalise(name)
        family = self._settings.family
        pinned = self._hosts.get(key)
        if pinned is not None:
            self._static_hits += 1
            return self._from_hosts(key, pinned)
        try:
            qname = dns.name.from_text(key)
        except dns.exception.DNSException as exc:
            raise ResolveError(f"{name!r}: not a valid DNS name ({exc})") from None
        deadline = trio.current_time() + self._timeout
        while True:
            entry = self._cache.get(key, trio.current_time())
            if entry is not None:
                if entry.error is not None:
                    self._negative_hits += 1
                    raise ResolveError(entry.error)
                self._hits += 1
                return entry.addresses
            flight = self._inflight.get(key)
            if flight is None:
                break
            self._coalesced += 1
            with trio.move_on_at(deadline):
                await flight.done.wait()
            if not flight.done.is_set():
                raise ResolveError(self._timeout_message(key))
            if flight.outcome is not None:
                return flight.outcome.unwrap()
            # The leader was cancelled before it finished: look again, and lead if needed.

        flight = _Flight()
        inflight = self._inflight
        inflight[key] = flight
        self._misses += 1
        try:
            flight.outcome = await self._lookup(key, qname, family, deadline)
        finally:
            if inflight.get(key) is flight:
                del inflight[key]
            flight.done.set()
        return flight.outcome.unwrap()

    def _from_hosts(self, key: str, pinned: tuple[IPAddress, ...]) -> tuple[IPAddress, ...]:
        family = self._settings.family
        v6 = tuple(a for a in pinned if a.version == 6)
        v4 = tuple(a for a in pinned if a.version == 4)
        addresses = order_addresses(v6, v4, family)
        if not addresses:
            wanted = "IPv4" if family == "ipv4" else "IPv6"
            raise ResolveError(
                f"{key}: the static hosts entry has no {wanted} address "
                f"(resolver.family is {family})"
            )
        return addresses

    def _timeout_message(self, key: str) -> str:
        return (
            f"{key}: DNS timed out after {float(self._timeout)} s "
            f"(nameservers {self._nameservers_text})"
        )

    async def _lookup(
        self, key: str, qname: dns.name.Name, family: config.Family, deadline: float
    ) -> _Outcome:
        """Query every family's record type at once and turn the results into an outcome."""
        rdtypes = _RDTYPES[family]
        settings, generation, dns_resolver = self._settings, self._generation, self._dns
        results: dict[dns.rdatatype.RdataType, dns.resolver.Answer | dns.exception.DNSException]
        results = {}

        async def query(rdtype: dns.rdatatype.RdataType) -> None:
            try:
                answer = await dns_resolver.resolve(
                    qname,
                    rdtype,
                    raise_on_no_answer=False,
                    search=False,
                    backend=self._backend,
                )
            except dns.resolver.NXDOMAIN as exc:
                results[rdtype] = exc
                # The name does not exist, whatever the type: stop waiting for the other one.
                nursery.cancel_scope.cancel()
                return
            except dns.exception.DNSException as exc:
                results[rdtype] = exc
                return
            results[rdtype] = answer
            if answer.rrset is not None and len(results) < len(rdtypes):
                # RFC 8305 section 3: addresses in hand; the other family gets a short grace.
                grace = trio.current_time() + RESOLUTION_DELAY
                deadline_scope.deadline = min(deadline_scope.deadline, grace)

        with trio.move_on_at(deadline) as deadline_scope:
            async with trio.open_nursery() as nursery:
                for rdtype in rdtypes:
                    nursery.start_soon(query, rdtype)

        outcome, expires_at = self._classify(key, rdtypes, results, settings)
        if generation == self._generation and expires_at is not None:
            now = trio.current_time()
            if expires_at > now:
                self._cache.put(key, outcome.addresses, expires_at, error=outcome.error)
        return outcome

    def _classify(
        self,
        key: str,
        rdtypes: tuple[dns.rdatatype.RdataType, ...],
        results: dict[dns.rdatatype.RdataType, dns.resolver.Answer | dns.exception.DNSException],
        settings: config.Resolver,
    ) -> tuple[_Outcome, float | None]:
        """Turn per-type results into an outcome and its cache expiry (None: do not cache)."""
        now = trio.current_time()
        answers = [r for r in results.values() if isinstance(r, dns.resolver.Answer)]
        errors = [r for r in results.values() if not isinstance(r, dns.resolver.Answer)]
        v6: list[IPAddress] = []
        v4: list[IPAddress] = []
        ttls: list[int] = []
        for answer in answers:
            if answer.rrset is None:
                continue
            ttls.append(answer.chaining_result.minimum_ttl)
            for rdata in answer.rrset:
                address = ipaddress.ip_address(rdata.address)
                (v6 if address.version == 6 else v4).append(address)
        addresses = order_addresses(_dedupe(v6), _dedupe(v4), settings.family)
        if addresses:
            ttl = min(max(min(ttls), settings.min_ttl), settings.max_ttl)
            expires_at = now + ttl
            if len(answers) < len(rdtypes):
                # One family failed or was cut short: retry it about as soon as a failure.
                expires_at = min(expires_at, now + settings.negative_ttl)
            return _Outcome(addresses=addresses), expires_at

        negative = now + settings.negative_ttl
        if any(isinstance(e, dns.resolver.NXDOMAIN) for e in errors):
            return _Outcome(error=f"{key}: no such domain (NXDOMAIN)"), negative
        if len(answers) == len(rdtypes):
            return _Outcome(error=f"{key}: {_NO_RECORDS[settings.family]}"), negative
        for error in errors:
            if not isinstance(error, dns.exception.Timeout):
                return _Outcome(error=f"{key}: {self._describe(error)}"), None
        return _Outcome(error=self._timeout_message(key)), None

    def _describe(self, error: dns.exception.DNSException) -> str:
        """Words for a failed query, with the server's rcode when there is one."""
        if isinstance(error, dns.resolver.NoNameservers):
            problems: list[str] = []
            for server, _tcp, port, problem, _response in error.kwargs.get("errors", []):
                if isinstance(problem, str):
                    text = _RCODE_MESSAGES.get(problem, f"DNS server answered {problem}")
                    if text not in problems:
                        problems.append(text)
                else:
                    problems.append(
                        f"DNS query to {_format_nameserver(server, port)} failed: {problem}"
                    )
            if problems:
                return "; ".join(problems)
            return f"no DNS server answered (nameservers {self._nameservers_text})"
        if isinstance(error, dns.resolver.YXDOMAIN):
            return "name too long after DNAME substitution (YXDOMAIN)"
        return f"DNS lookup failed: {error}"
