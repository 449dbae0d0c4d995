"""The SSRF guard: which resolved addresses the proxy must never connect to. Pure, no I/O.

Theory of operation
-------------------

An SNI proxy connects wherever a client's SNI name resolves, and the client often controls that
name's DNS. Without a guard, ``metadata.attacker.test -> 169.254.169.254`` reads the cloud
instance's credentials, ``admin.attacker.test -> 127.0.0.1`` reaches services bound to
loopback, and a name resolving to the proxy's own listener makes it connect to itself until it
runs out of sockets (envoyproxy/envoy #19429 and #45664, dlundquist/sniproxy #243, mosajjal
commit 9c23ee2). So the shell resolves once, asks :func:`refusal_reason` about each address,
and connects to exactly an address that passed (no second lookup, so no DNS-rebinding race).

The check is a table of ``(network, reason)`` rows built once from the IANA special-purpose
address registries; the first row containing the address wins, so specific rows come before
broad ones. IPv6 addresses that *carry* an IPv4 address (IPv4-mapped ``::ffff:0:0/96``,
IPv4-compatible ``::/96``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo ``2001::/32``)
are unwrapped and the IPv4 address is checked too, because connecting to ``::ffff:127.0.0.1``
on a dual-stack socket, or to ``64:ff9b::a00:1`` through a NAT64 gateway, reaches the IPv4
address inside. IPv6 outside the global unicast block ``2000::/3`` is refused as reserved: IANA
has allocated nothing else for unicast use.

Rows marked *private* (loopback, RFC 1918, unique local, CGNAT, link-local, benchmarking, and
the deprecated or local-use site-local and ``64:ff9b:1::/48`` blocks) are
what a rule's ``allow_private`` lifts, so tests, benchmarks and local backends can be reached
on purpose. Unspecified, multicast, broadcast and reserved addresses are never a sensible
destination and stay refused; so does the proxy's own listen address, which would be a loop.

Documentation ranges (``192.0.2.0/24``, ``198.51.100.0/24``, ``203.0.113.0/24``,
``2001:db8::/32``) are deliberately *not* refused: they are never routed on the Internet, so
they cannot reach anything real, and our namespace tests use them as the "public" addresses
that must pass the guard.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Collection
from typing import Final, TypeAlias

import attrs

__all__ = ["OWN_ADDRESS", "IPAddress", "refusal_reason", "unwrap_mapped"]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The reason for a destination that is one of the proxy's own listeners (a loop). Callers can
#: compare against it to tell a loop from the address categories in their logs.
OWN_ADDRESS: Final = "the proxy's own listen address"


@attrs.frozen
class _Row:
    value: int
    mask: int
    reason: str
    private: bool  # lifted by a rule's allow_private

    def __contains__(self, address: int) -> bool:
        return address & self.mask == self.value


def _rows(bits: int, spec: tuple[tuple[str, str, bool], ...]) -> tuple[_Row, ...]:
    full = (1 << bits) - 1
    rows = []
    for text, reason, private in spec:
        net = ipaddress.ip_network(text)
        mask = full ^ (full >> net.prefixlen)
        rows.append(_Row(int(net.network_address), mask, reason, private))
    return tuple(rows)


_PRIVATE = True
_ALWAYS = False

# First match wins: keep specific rows above the broad rows that contain them.
_IPV4_ROWS: Final = _rows(
    32,
    (
        # connect(0.0.0.0) reaches the local host on Linux.
        ("0.0.0.0/32", "unspecified", _ALWAYS),
        ("0.0.0.0/8", "this network (0.0.0.0/8)", _ALWAYS),
        ("10.0.0.0/8", "private (RFC 1918)", _PRIVATE),
        ("100.64.0.0/10", "carrier-grade NAT (100.64.0.0/10)", _PRIVATE),
        ("127.0.0.0/8", "loopback", _PRIVATE),
        # Includes 169.254.169.254, the cloud instance metadata service.
        ("169.254.0.0/16", "link-local", _PRIVATE),
        ("172.16.0.0/12", "private (RFC 1918)", _PRIVATE),
        ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)", _ALWAYS),
        ("192.88.99.0/24", "reserved (deprecated 6to4 relay anycast)", _ALWAYS),
        ("192.168.0.0/16", "private (RFC 1918)", _PRIVATE),
        ("198.18.0.0/15", "benchmarking (198.18.0.0/15)", _PRIVATE),
        ("224.0.0.0/4", "multicast", _ALWAYS),
        ("255.255.255.255/32", "broadcast", _ALWAYS),
        ("240.0.0.0/4", "reserved", _ALWAYS),
    ),
)

_IPV6_ROWS: Final = _rows(
    128,
    (
        ("::/128", "unspecified", _ALWAYS),
        ("::1/128", "loopback", _PRIVATE),
        # Local-use NAT64 (RFC 8215): the operator picks the sub-prefix length, so the position
        # of the embedded IPv4 address is unknown; it is never global, so refuse it whole.
        ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)", _PRIVATE),
        ("100::/64", "discard-only (100::/64)", _ALWAYS),
        ("2001:2::/48", "benchmarking (2001:2::/48)", _PRIVATE),
        ("2001:10::/28", "reserved (deprecated ORCHID)", _ALWAYS),
        ("fc00::/7", "unique local (fc00::/7)", _PRIVATE),
        ("fe80::/10", "link-local", _PRIVATE),
        ("fec0::/10", "site-local (deprecated, fec0::/10)", _PRIVATE),
        ("ff00::/8", "multicast", _ALWAYS),
    ),
)

(_GLOBAL_UNICAST,) = _rows(128, (("2000::/3", "", _ALWAYS),))
_RESERVED_V6: Final = "reserved"


@attrs.frozen
class _Embedding:
    """An IPv6 form that carries an IPv4 address (or two, for Teredo)."""

    row: _Row
    description: str  # completes "embedded as a.b.c.d in ... address"
    extractors: tuple[Callable[[int], int], ...]
    # True for forms that are a normal way to reach a public IPv4 address even though they
    # lie outside 2000::/3 (dual-stack sockets, NAT64 networks). IPv4-compatible addresses are
    # deprecated (RFC 4291) and stay reserved whatever they carry.
    reaches_ipv4: bool


def _embedding(
    network: str, description: str, *extractors: Callable[[int], int], reaches_ipv4: bool
) -> _Embedding:
    (row,) = _rows(128, ((network, "", _ALWAYS),))
    return _Embedding(row, description, extractors, reaches_ipv4)


def _low32(value: int) -> int:
    return value & 0xFFFFFFFF


def _bits_16_to_47(value: int) -> int:  # 6to4: 2002:AABB:CCDD::/48
    return (value >> 80) & 0xFFFFFFFF


def _teredo_server(value: int) -> int:  # bits 32-63
    return (value >> 64) & 0xFFFFFFFF


def _teredo_client(value: int) -> int:  # the low 32 bits, stored inverted
    return ~value & 0xFFFFFFFF


_EMBEDDINGS: Final = (
    _embedding("::ffff:0:0/96", "an IPv4-mapped (::ffff:0:0/96)", _low32, reaches_ipv4=True),
    _embedding("::/96", "an IPv4-compatible (::/96)", _low32, reaches_ipv4=False),
    _embedding("64:ff9b::/96", "a NAT64 (64:ff9b::/96)", _low32, reaches_ipv4=True),
    # 6to4 and Teredo lie inside 2000::/3 already; reaches_ipv4 does not matter for them.
    _embedding("2002::/16", "a 6to4 (2002::/16)", _bits_16_to_47, reaches_ipv4=True),
    _embedding(
        "2001::/32", "a Teredo (2001::/32)", _teredo_server, _teredo_client, reaches_ipv4=True
    ),
)


def _match(rows: tuple[_Row, ...], value: int) -> _Row | None:
    for row in rows:
        if value in row:
            return row
    return None


def _verdict(row: _Row, allow_private: bool) -> str | None:
    return None if (row.private and allow_private) else row.reason


def _same_address(a: IPAddress, b: IPAddress) -> bool:
    # Compare what the kernel would connect to: ::ffff:a.b.c.d is a.b.c.d on a dual-stack
    # socket, and an IPv6 scope id does not make the address a different host.
    a, b = unwrap_mapped(a), unwrap_mapped(b)
    return a.version == b.version and int(a) == int(b)


@functools.lru_cache(maxsize=4096)
def ip_literal(text: str) -> IPAddress | None:
    """``text`` as an IP address, or ``None`` when it is a name. Cached: every connection
    parses its client's address and its route's target, and a failed parse (a name) costs two
    exceptions."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def ip_of(text: str) -> IPAddress:
    """An address the kernel gave (``accept``, ``recvfrom``, ``getsockname``), parsed through
    the cache of :func:`ip_literal`.

    Raises:
        ValueError: ``text`` is not an IP address.
    """
    ip = ip_literal(text)
    if ip is None:
        raise ValueError(f"not an IP address: {text!r}")
    return ip


def unwrap_mapped(ip: IPAddress) -> IPAddress:
    """Return the IPv4 address inside ``::ffff:a.b.c.d``, or ``ip`` unchanged.

    A dual-stack socket shows IPv4 peers as IPv4-mapped IPv6 addresses, and connecting to one
    reaches the IPv4 host; comparisons, access lists and limits must see the IPv4 address.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def refusal_reason(
    ip: IPAddress,
    *,
    own_addresses: Collection[tuple[IPAddress, int]] = (),
    port: int | None = None,
    allow_private: bool = False,
) -> str | None:
    """Say why the proxy must not connect to ``ip``, or return None if it may.

    Args:
        ip: a resolved destination address.
        own_addresses: the proxy's listen addresses as concrete ``(address, port)`` pairs. A
            listener on ``0.0.0.0`` or ``::`` listens on every local address, so the caller
            expands it to the host's addresses; this function never looks at interfaces.
        port: the destination port. With a port, only a connection to an own ``(address,
            port)`` is refused as a loop (the same host's other ports are judged by the
            table like any address); without one, any own address is refused.
        allow_private: set from the matched rule's ``allow_private``; lifts the loopback,
            RFC 1918, unique-local, site-local, CGNAT, link-local, local-use NAT64 and
            benchmarking rows (also when embedded), never the rest and never the own-address
            check.

    Returns:
        A short reason for the log line (``"loopback"``, ``"private (RFC 1918)"``,
        ``"link-local"``, ...), or None. For an address with an IPv4 address inside, the
        reason names both, e.g. ``"loopback, embedded as 127.0.0.1 in an IPv4-mapped
        (::ffff:0:0/96) address"``.
    """
    for own, own_port in own_addresses:
        if _same_address(ip, own) and (port is None or port == own_port):
            return OWN_ADDRESS
    value = int(ip)
    if ip.version == 4:
        row = _match(_IPV4_ROWS, value)
        return None if row is None else _verdict(row, allow_private)
    row = _match(_IPV6_ROWS, value)
    if row is not None:
        # Decided here, lifted or not: ::1 must not fall through to the IPv4-compatible check
        # (0.0.0.1), nor fc00::/7 to the "outside 2000::/3" check.
        return _verdict(row, allow_private)
    for embedding in _EMBEDDINGS:
        if value in embedding.row:
            for extract in embedding.extractors:
                inner = extract(value)
                inner_row = _match(_IPV4_ROWS, inner)
                inner_reason = None if inner_row is None else _verdict(inner_row, allow_private)
                if inner_reason is not None:
                    embedded = ipaddress.IPv4Address(inner)
                    return (
                        f"{inner_reason}, embedded as {embedded} in {embedding.description} address"
                    )
            if embedding.reaches_ipv4:
                return None
            break
    if value not in _GLOBAL_UNICAST:
        return _RESERVED_V6
    return None


def format_endpoint(endpoint: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``host:port``, or ``[host]:port`` for IPv6 (a socket address as logs show it)."""
    host, port = endpoint[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
