"""Who may connect, to which names, and how often: the proxy's access policy, with no I/O.

Theory of operation
-------------------

The policy answers three questions, in the order the shell asks them:

1. :meth:`Policy.check_client` -- may this client IP talk to us at all? (``clients.allow`` /
   ``clients.deny`` CIDR lists; deny wins; an empty allow list allows everyone.)
2. :meth:`ClientLimiter.acquire` -- may it open *another* connection right now? (global
   ``max_connections``, then the per-client concurrent limit, then a per-client token bucket.)
3. :meth:`Policy.decide` -- may it reach the name it put in its SNI, and where does that go?

Domain rules are compiled once, by :meth:`Policy.from_config`, into hash tables keyed by name.
A lookup walks the *label suffixes* of the SNI (``a.b.example.com``, ``b.example.com``,
``example.com``, ``com``) and probes each table, so the cost is O(labels) dictionary lookups
whatever the number of rules, and a match can only ever happen on a label boundary:
``notexample.com`` and ``example.com.evil.net`` never produce the key ``example.com``. This is
the bypass class the anchors warn about (dlundquist's unanchored regexes, mosajjal's
cross-label ``suffix``), closed by construction instead of by careful string slicing. Regex
rules, which cannot be tabulated, are compiled once and applied with ``fullmatch`` (anchored at
both ends) and ``re.IGNORECASE``.

The default is deny. A matching deny rule wins over every allow rule, wherever it sits in the
config; among allow rules the first in config order wins, so an operator can put a specific
rule with a fixed ``target`` before a broad one. Each table keeps, per key, the index of the
first rule with that key, and a lookup keeps the smallest index seen.

Names given to :meth:`Policy.decide` must already be normalised by
:mod:`trio_sni.sansio.hostname` (lower case, no trailing dot, valid LDH labels); the policy
does not re-validate them.

The limiter never reads a clock: the caller passes ``now`` (``trio.current_time()``), so the
token bucket arithmetic is exact in tests. Its memory is bounded, see :class:`ClientLimiter`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from typing import Final, Literal, TypeAlias

import attrs

from .addresses import IPAddress, unwrap_mapped
from .config import Clients, Config, Limits, Listener, Rule, parse_host_port

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "ClientLimiter",
    "Deny",
    "DenyReason",
    "Policy",
    "Route",
    "check_proxy_sender",
]

#: Stable tokens for access logs and metric labels (a bounded set, unlike ``detail``).
DenyReason: TypeAlias = Literal[
    "denied_domain",
    "denied_client",
    "rate_limited",
    "too_many_connections",
    "max_connections",
    "untrusted_proxy",
]

_IPV4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
# IPv4-mapped clients are judged as IPv4 (see addresses.unwrap_mapped): a dual-stack listener
# would otherwise let every IPv4 client past ``clients.deny: ["10.0.0.0/8"]``.


@attrs.frozen
class Route:
    """Where an allowed connection goes.

    ``host`` is the SNI name itself, or the host of the rule's fixed ``target`` (a name or an
    IP literal; the shell resolves names). ``port`` is the target's port, or the listener's
    ``target_port`` when the connection is routed by its SNI. ``allow_private`` tells the SSRF
    guard that this rule may reach loopback/private/link-local addresses.
    """

    host: str
    port: int
    rule: Rule
    allow_private: bool
    fixed_target: bool


@attrs.frozen
class Deny:
    """A refusal: ``reason`` is a stable token for logs and metrics, ``detail`` a sentence for
    the operator that names the client or name and the rule or limit responsible."""

    reason: DenyReason
    detail: str


# --------------------------------------------------------------------------------------------
# Client CIDR lists


@attrs.frozen(eq=False)
class _CidrSet:
    """CIDR membership in O(distinct prefix lengths), not O(networks).

    Networks are grouped by prefix length; a lookup masks the address once per length present
    (longest first, so the most specific network is reported) and probes a dict.
    """

    # ((prefixlen, mask, {network int: network text}), ...) per family, longest prefix first.
    _v4: tuple[tuple[int, int, dict[int, str]], ...]
    _v6: tuple[tuple[int, int, dict[int, str]], ...]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> _CidrSet:
        groups: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
        for text in texts:
            net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.ip_network(
                text, strict=False
            )
            # "::ffff:10.0.0.0/104" means the IPv4 network 10.0.0.0/8; clients are matched as
            # unwrapped IPv4 addresses, so store it as such or it could never match.
            if (
                isinstance(net, ipaddress.IPv6Network)
                and net.prefixlen >= 96
                and net.subnet_of(_IPV4_MAPPED)
            ):
                net = ipaddress.IPv4Network(
                    (int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96)
                )
            by_len = groups[net.version].setdefault(net.prefixlen, {})
            by_len.setdefault(int(net.network_address), str(net))
        return cls(v4=_by_length(groups[4], 32), v6=_by_length(groups[6], 128))

    def find(self, ip: IPAddress) -> str | None:
        """Return the most specific listed network containing ``ip`` (IPv4-mapped ones as IPv4)."""
        value = int(ip)
        for _length, mask, networks in self._v4 if ip.version == 4 else self._v6:
            hit = networks.get(value & mask)
            if hit is not None:
                return hit
        return None

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)


@functools.lru_cache(maxsize=64)
def _cidr_set(texts: tuple[str, ...]) -> _CidrSet:
    return _CidrSet.from_texts(texts)


def check_proxy_sender(listener: Listener, ip: IPAddress) -> Deny | None:
    """May ``ip``, the socket's peer, send PROXY headers to ``listener``?

    Only the networks in its ``proxy_protocol_from`` may, when that list is set: otherwise
    anyone who reaches the listener could claim any client address and walk past
    ``clients.allow`` and the per-client limits.
    """
    if not listener.proxy_protocol_from:
        return None
    ip = unwrap_mapped(ip)
    if _cidr_set(listener.proxy_protocol_from).find(ip) is None:
        return Deny(
            "untrusted_proxy",
            f"{ip} may not send PROXY headers to {listener.label}: it is not in the "
            "listener's proxy_protocol_from",
        )
    return None


def _by_length(
    groups: dict[int, dict[int, str]], bits: int
) -> tuple[tuple[int, int, dict[int, str]], ...]:
    full = (1 << bits) - 1
    return tuple(
        (length, full ^ (full >> length), groups[length]) for length in sorted(groups, reverse=True)
    )


# --------------------------------------------------------------------------------------------
# Domain rules


_NO_MATCH: Final = 1 << 62  # larger than any rule index


@attrs.frozen(eq=False)
class _RuleTable:
    """The rules of one action, compiled for O(labels) lookup.

    Every dict maps a normalised name to the index (in ``config.rules``) of the first rule
    with that key; the lookup returns the smallest index among all rules that match.
    """

    exact: dict[str, int]  # match: "a.example.com"
    below: dict[str, int]  # match: "*.example.com" -> key "example.com", strictly below it
    at_or_below: dict[str, int]  # suffix: "example.com" -> itself and below
    regexes: tuple[tuple[int, re.Pattern[str]], ...]  # in config order

    @classmethod
    def build(cls, indexed: Iterable[tuple[int, Rule]]) -> _RuleTable:
        exact: dict[str, int] = {}
        below: dict[str, int] = {}
        at_or_below: dict[str, int] = {}
        regexes: list[tuple[int, re.Pattern[str]]] = []
        for index, rule in indexed:
            if rule.match is not None:
                name = _normalise_pattern(rule.match)
                if name.startswith("*."):
                    below.setdefault(name[2:], index)
                else:
                    exact.setdefault(name, index)
            elif rule.suffix is not None:
                # Config accepts ".example.com" and means the same as "example.com".
                at_or_below.setdefault(_normalise_pattern(rule.suffix).lstrip("."), index)
            else:
                assert rule.regex is not None  # Rule guarantees exactly one of the three
                regexes.append((index, re.compile(rule.regex, re.IGNORECASE)))
        return cls(exact=exact, below=below, at_or_below=at_or_below, regexes=tuple(regexes))

    def first_match(self, name: str) -> int | None:
        """Return the index of the first rule in this table matching ``name``, or None."""
        best = min(self.exact.get(name, _NO_MATCH), self.at_or_below.get(name, _NO_MATCH))
        # Walk the proper label suffixes: "a.b.c" -> "b.c" -> "c". Each key starts right after
        # a dot, which is what makes every match a label-boundary match.
        dot = name.find(".")
        while dot != -1:
            parent = name[dot + 1 :]
            best = min(
                best, self.below.get(parent, _NO_MATCH), self.at_or_below.get(parent, _NO_MATCH)
            )
            dot = name.find(".", dot + 1)
        for index, pattern in self.regexes:
            if index > best:
                break  # regexes are in config order: nothing later can win
            if pattern.fullmatch(name):
                best = index
                break
        return None if best == _NO_MATCH else best


def _normalise_pattern(text: str) -> str:
    # Names are compared after normalisation (lower case, no trailing dot), so patterns are
    # normalised the same way; a case or trailing-dot mismatch between routing and policy is a
    # known bypass class (Traefik GHSA-9cr8-q42q-g8m7).
    return text.lower().rstrip(".")


def _split_target(target: str) -> tuple[str, int | None]:
    # Port 0 is never valid in a config, so it marks "no port given: use the listener's".
    host, port = parse_host_port(target, default_port=0)
    return host, (port or None)


@attrs.frozen(eq=False)
class Policy:
    """The compiled domain rules and client lists of one :class:`Config`.

    Immutable: a SIGHUP reload builds a new ``Policy`` and swaps it in, so a connection that
    already decided keeps the decision it got.
    """

    _rules: tuple[Rule, ...]
    _targets: tuple[tuple[str, int | None] | None, ...]
    _deny: _RuleTable
    _allow: _RuleTable
    #: Rules with ``alpn``, one table per ALPN id they name (a rule is in each of its ids').
    _deny_by_alpn: dict[str, _RuleTable]
    _allow_by_alpn: dict[str, _RuleTable]
    _clients_allow: _CidrSet
    _clients_deny: _CidrSet

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        """Compile ``config.rules`` and ``config.clients`` (once; lookups never re-parse)."""
        return cls.from_rules(config.rules, config.clients)

    @classmethod
    def from_rules(cls, rules: Iterable[Rule], clients: Clients | None = None) -> Policy:
        """Compile rules and client lists directly (for tools and tests without a listener)."""
        rules = tuple(rules)
        clients = Clients() if clients is None else clients
        indexed = list(enumerate(rules))

        def table(action: str, alpn: str | None) -> _RuleTable:
            return _RuleTable.build(
                (i, r)
                for i, r in indexed
                if r.action == action
                and (r.alpn is None if alpn is None else alpn in (r.alpn or ()))
            )

        named = sorted({p for r in rules for p in r.alpn or ()})
        return cls(
            rules=rules,
            targets=tuple(None if r.target is None else _split_target(r.target) for r in rules),
            deny=table("deny", None),
            allow=table("allow", None),
            deny_by_alpn={p: table("deny", p) for p in named},
            allow_by_alpn={p: table("allow", p) for p in named},
            clients_allow=_CidrSet.from_texts(clients.allow),
            clients_deny=_CidrSet.from_texts(clients.deny),
        )

    def check_client(self, ip: IPAddress) -> Deny | None:
        """Apply ``clients.deny`` then ``clients.allow`` to a client address.

        IPv4-mapped IPv6 clients (a dual-stack listener) are checked as their IPv4 address.

        Returns:
            None if the client may connect, else ``Deny("denied_client", ...)``.
        """
        ip = unwrap_mapped(ip)
        network = self._clients_deny.find(ip)
        if network is not None:
            return Deny("denied_client", f"client {ip} is in clients.deny ({network})")
        if self._clients_allow and self._clients_allow.find(ip) is None:
            return Deny("denied_client", f"client {ip} is not in clients.allow")
        return None

    def decide(self, sni: str, target_port: int, alpn: Iterable[str] = ()) -> Route | Deny:
        """Route a normalised SNI name, or refuse it.

        Args:
            sni: the server name, already normalised (lower case, no trailing dot, LDH).
            target_port: the listener's ``target_port``, used unless the rule's fixed target
                names a port.
            alpn: the ALPN protocol ids the client offers (for rules with ``alpn``).

        Returns:
            A :class:`Route` from the first matching allow rule, or
            ``Deny("denied_domain", ...)`` if a deny rule matches or no rule allows the name.
        """
        denied = _first_match(self._deny, self._deny_by_alpn, sni, alpn)
        if denied is not None:
            label = self._rules[denied].label
            return Deny("denied_domain", f'rule "{label}" denies "{sni}"')
        allowed = _first_match(self._allow, self._allow_by_alpn, sni, alpn)
        if allowed is None:
            return Deny("denied_domain", f'no rule allows "{sni}"')
        rule = self._rules[allowed]
        target = self._targets[allowed]
        if target is None:
            return Route(sni, target_port, rule, rule.allow_private, fixed_target=False)
        host, port = target
        return Route(
            host, target_port if port is None else port, rule, rule.allow_private, fixed_target=True
        )


def _first_match(
    plain: _RuleTable, by_alpn: dict[str, _RuleTable], sni: str, alpn: Iterable[str]
) -> int | None:
    """The first rule (by index) matching ``sni`` whose ALPN condition, if any, the offered
    ``alpn`` meets: the earliest over the plain table and the table of each offered id."""
    best = plain.first_match(sni)
    if by_alpn:
        for protocol in alpn:
            table = by_alpn.get(protocol)
            found = None if table is None else table.first_match(sni)
            if found is not None and (best is None or found < best):
                best = found
    return best


# --------------------------------------------------------------------------------------------
# Per-client limits

#: Default cap on the number of clients the limiter remembers. One entry is ~200 bytes, so
#: 100k entries is ~20 MB: enough to remember every recent client of a busy proxy, small
#: enough that a spoofed-source flood cannot exhaust memory.
DEFAULT_MAX_CLIENTS: Final = 100_000

_IPV6_CLIENT_PREFIX: Final = 64
_IPV6_HOST_MASK: Final = (1 << (128 - _IPV6_CLIENT_PREFIX)) - 1

ClientKey: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Network


@attrs.define(eq=False, slots=True)
class _ClientState:
    active: int
    tokens: float
    stamp: float  # the time ``tokens`` was last brought up to date


def client_key(ip: IPAddress) -> ClientKey:
    """The unit a limit applies to: an IPv4 address, or an IPv6 /64.

    An IPv6 subscriber (or cloud VM) is routinely given a whole /64 and may pick a fresh source
    address from it for every connection (RFC 4941 privacy addresses, or on purpose), so
    limiting single IPv6 addresses limits nothing; a /64 is the smallest prefix that is
    reliably one customer.
    """
    ip = unwrap_mapped(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return ipaddress.IPv6Network((int(ip) & ~_IPV6_HOST_MASK, _IPV6_CLIENT_PREFIX))


def live_connections(count: int) -> str:
    return f"{count} live connection" + ("" if count == 1 else "s")


def describe_client_key(key: ClientKey) -> str:
    return f"client {key}" if isinstance(key, ipaddress.IPv4Address) else f"client network {key}"


@attrs.define(eq=False)
class ClientLimiter:
    """Connection accounting: a global cap, a per-client cap and a per-client rate.

    ``acquire`` before serving a connection and ``release`` exactly once when it ends
    (in the handler's ``finally``). The per-client rate is a token bucket holding up to
    ``max(per_client_burst, 1)`` tokens, refilled at ``per_client_rate`` tokens per second;
    each admitted connection takes one token. A rate of 0 disables the bucket; a burst of 0
    means no burst (one connection at a time, spaced by ``1 / rate`` seconds).

    Memory: per-client state exists while the client has live connections, and afterwards
    only until its bucket is certainly full again (``max(burst, 1) / rate`` seconds after the
    latest ``now`` seen when it went idle), because a full bucket is exactly what a new entry
    starts with, so forgetting it changes no decision. Idle entries are forgotten lazily by
    :meth:`acquire`, oldest first, at O(1) amortised cost. The table is also capped at
    ``max_clients`` entries (raised to ``max_connections + 1`` if smaller, so that some entry
    is always idle when the cap is hit): when a new client arrives at the cap, the least
    recently released idle client is forgotten early, which can only grant that client a
    fresh burst sooner than its rate allows; clients with live connections are never
    forgotten, so concurrency limits stay exact.

    Args:
        limits: the per-client limits (0 disables ``per_client_connections`` or the rate).
        max_connections: the global cap on live connections.
        max_clients: the cap on remembered clients (see above).
    """

    _limits: Limits
    _max_connections: int
    _max_clients_setting: int = attrs.field(
        default=DEFAULT_MAX_CLIENTS, kw_only=True, alias="max_clients"
    )
    _table: dict[ClientKey, _ClientState] = attrs.field(factory=dict, init=False, repr=False)
    # Idle clients (no live connections) with the time after which their bucket is certainly
    # full; insertion order is release order, which (for a non-decreasing clock) is also
    # deadline order, so expired entries are always at the front.
    _idle: dict[ClientKey, float] = attrs.field(factory=dict, init=False, repr=False)
    _now: float = attrs.field(default=float("-inf"), init=False)  # latest time acquire() saw
    _active: int = attrs.field(default=0, init=False)
    # Derived from the settings by reconfigure():
    _max_clients: int = attrs.field(default=0, init=False)
    _rate: float = attrs.field(default=0.0, init=False)
    _capacity: float = attrs.field(default=1.0, init=False)

    def __attrs_post_init__(self) -> None:
        self.reconfigure(self._limits, self._max_connections)

    @property
    def active(self) -> int:
        """Live connections admitted and not yet released, over all clients."""
        return self._active

    @property
    def tracked_clients(self) -> int:
        """How many clients (IPv4 addresses or IPv6 /64s) the limiter currently remembers."""
        return len(self._table)

    def active_for(self, ip: IPAddress) -> int:
        """Live connections of the client (or IPv6 /64) that ``ip`` belongs to."""
        state = self._table.get(client_key(ip))
        return 0 if state is None else state.active

    def reconfigure(self, limits: Limits, max_connections: int) -> None:
        """Apply new limits (SIGHUP reload) without losing the count of live connections.

        Connections already admitted stay admitted even if they now exceed a lowered limit;
        the new limits apply to the next :meth:`acquire`. Buckets keep their tokens (clamped
        to the new burst); refill since a client's last connection is credited at the new rate.
        """
        self._limits = limits
        self._max_connections = max_connections
        self._max_clients = max(self._max_clients_setting, max_connections + 1)
        self._rate = limits.per_client_rate
        self._capacity = float(max(limits.per_client_burst, 1))
        for state in self._table.values():
            state.tokens = min(state.tokens, self._capacity)
        idle = list(self._idle)
        self._idle.clear()
        for key in idle:
            if self._rate == 0:
                del self._table[key]  # without a bucket an idle client has nothing to remember
            else:
                # Conservative: every idle stamp is <= self._now, and an empty bucket refills
                # in capacity / rate seconds.
                self._idle[key] = self._now + self._capacity / self._rate

    def acquire(self, ip: IPAddress, now: float) -> Deny | None:
        """Admit a new connection from ``ip`` at time ``now``, or refuse it.

        Checks, in order: the global ``max_connections``, the client's concurrent
        connections, the client's token bucket. A refused connection takes no token and is
        not counted; every admitted one must be given back with :meth:`release` exactly once.

        Args:
            ip: the client address (IPv4-mapped addresses count as their IPv4 address).
            now: the current time in seconds (``trio.current_time()``); should not decrease.
                If it does, the bucket earns nothing for the backwards step.
        """
        if now > self._now:
            self._now = now
        self._forget_expired(now)
        if self._active >= self._max_connections:
            return Deny(
                "max_connections",
                f"the proxy has {live_connections(self._active)} "
                f"(max_connections = {self._max_connections})",
            )
        key = client_key(ip)
        state = self._table.get(key)
        limit = self._limits.per_client_connections
        if state is not None and limit and state.active >= limit:
            return Deny(
                "too_many_connections",
                f"{describe_client_key(key)} has {live_connections(state.active)} "
                f"(per_client_connections = {limit})",
            )
        if state is None:
            state = self._new_state(key, now)
        elif self._rate:
            elapsed = now - state.stamp
            if elapsed > 0:
                state.tokens = min(self._capacity, state.tokens + elapsed * self._rate)
                state.stamp = now
        if self._rate:
            if state.tokens < 1:
                # Nothing taken, so the time the bucket is full again is unchanged and an idle
                # client keeps its place (and deadline) in the idle queue.
                return Deny(
                    "rate_limited",
                    f"{describe_client_key(key)} exceeded per_client_rate "
                    f"({self._rate:g}/s, burst {self._limits.per_client_burst})",
                )
            state.tokens -= 1
        if state.active == 0:
            self._idle.pop(key, None)
        state.active += 1
        self._active += 1
        return None

    def release(self, ip: IPAddress) -> None:
        """End a connection admitted by :meth:`acquire`.

        Raises:
            ValueError: if ``ip``'s client has no live connection: a release without its
                acquire is a bug in the caller and would corrupt every later count.
        """
        key = client_key(ip)
        state = self._table.get(key)
        if state is None or state.active == 0:
            raise ValueError(
                f"release() for {describe_client_key(key)} without a matching acquire()"
            )
        state.active -= 1
        self._active -= 1
        if state.active == 0:
            if self._rate == 0:
                del self._table[key]
            else:
                # The bucket was last refilled at or before self._now, and refills completely
                # within capacity / rate seconds of that.
                self._idle[key] = self._now + self._capacity / self._rate

    def _new_state(self, key: ClientKey, now: float) -> _ClientState:
        if len(self._table) >= self._max_clients:
            # At the cap: forget the least recently released idle client early. There is
            # one, because _max_clients > max_connections >= clients with live connections
            # (the global check ran first).
            victim = next(iter(self._idle))
            del self._idle[victim]
            del self._table[victim]
        state = _ClientState(active=0, tokens=self._capacity, stamp=now)
        self._table[key] = state
        return state

    def _forget_expired(self, now: float) -> None:
        while self._idle:
            key, deadline = next(iter(self._idle.items()))
            if deadline > now:
                break
            del self._idle[key]
            del self._table[key]
