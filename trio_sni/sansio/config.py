"""The configuration tree: frozen attrs classes, validated on construction.

The JSON format is the user's design (``listen_addr``, ``max_connections``, ``ebpf``,
``fallback_mode``) extended with ``listeners``, ``rules``, ``clients``, ``limits``,
``timeouts``, ``resolver``, ``forwarding``, ``log`` and ``status``. Loading from a mapping
(with every problem reported at once) lives in :mod:`.config_load`; this module only holds the
shapes and their invariants, so a ``Config`` that exists is a ``Config`` that can be served.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Literal, TypeVar

import attrs

from .hostname import is_valid_hostname

#: Hard ceiling for ``limits.max_client_hello_size``: a ClientHello is one handshake
#: message of at most 2^16 bytes of extensions in practice; buffering more is a DoS lever.
MAX_CLIENT_HELLO_CAP = 65536

ForwardingMode = Literal["auto", "kernel", "splice", "copy"]
FallbackMode = Literal["auto", "copy", "none"]
Family = Literal["any", "ipv4", "ipv6", "prefer_ipv4", "prefer_ipv6"]
Action = Literal["allow", "deny"]
ListenerProtocol = Literal["tls", "http", "quic"]
Via = Literal["direct", "socks5"]
ProxyProtocolVersion = Literal["v1", "v2"]
QosClass = Literal["high", "normal", "bulk"]

#: The socket priority (``SO_PRIORITY``) the proxy gives a client socket for its rule's QoS
#: class; the kernel copies it into every packet the socket sends, and the TC shaper
#: (``bpf/tc_shaper.bpf.c``: ``PRIO_HIGH``, ``PRIO_BULK``) classifies by it. The values are
#: Linux's TC_PRIO_INTERACTIVE and TC_PRIO_BULK, which an unprivileged socket may set (0..6)
#: and which a ``prio`` or HTB qdisc understands too.
QOS_PRIORITY: dict[str, int] = {"high": 6, "normal": 0, "bulk": 2}


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``"host:port"``, ``"[v6]:port"`` or (with a default) a bare host.

    Raises:
        ValueError: with a message naming what is wrong.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        if rest.startswith(":"):
            port_text = rest[1:]
        elif rest == "" and default_port is not None:
            return host, default_port
        else:
            raise ValueError(f"{text!r}: expected '[address]:port'")
    elif text.count(":") > 1:
        # A bare IPv6 address: only valid without a port.
        if default_port is None:
            raise ValueError(f"{text!r}: write IPv6 addresses with a port as '[address]:port'")
        return text, default_port
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if default_port is None:
                raise ValueError(f"{text!r}: expected 'host:port'")
            return text, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    if not host:
        raise ValueError(f"{text!r}: missing host")
    return host, int(port_text)


def _port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 < value < 65536:
        raise ValueError(f"{attribute.name}: must be from 1 to 65535, got {value}")


#: A numeric field's type: the range validators below serve ``int`` and ``float`` fields alike
#: (``attrs.Attribute`` is invariant, so one typed for ``float`` does not fit an ``int`` field).
_Number = TypeVar("_Number", int, float)


def _positive(instance: object, attribute: attrs.Attribute[_Number], value: _Number) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be greater than 0, got {value}")


def _non_negative(instance: object, attribute: attrs.Attribute[_Number], value: _Number) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must not be negative, got {value}")


def _ip_address(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{attribute.name}: {value!r} is not an IP address") from None


def _cidrs(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    problems = []
    for i, text in enumerate(value):
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            problems.append(
                ValueError(f"{attribute.name}[{i}]: {text!r} is not an IP network (CIDR)")
            )
            continue
        if network.network_address != ipaddress.ip_address(text.split("/")[0]):
            # 10.0.0.1/8 is most likely a typo for a host (/32) or for 10.0.0.0/8.
            problems.append(
                ValueError(
                    f"{attribute.name}[{i}]: {text!r} has host bits set: write "
                    f"{str(network)!r} for the network, or the address alone for one host"
                )
            )
    _raise_all(attribute.name, problems)


def _raise_all(name: str, problems: list[ValueError]) -> None:
    """Report every bad item of a list at once (``--check-config`` lists them all)."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ExceptionGroup(f"{name}: {len(problems)} problems", problems)


@attrs.frozen
class Listener:
    """One listening socket and the port its connections are forwarded to.

    ``target_port`` lets ``listen 8443 -> connect 443`` (the common unprivileged setup).
    ``protocol`` is what clients speak first: ``"tls"`` (route by the ClientHello's SNI) or
    ``"http"`` (route plain HTTP/1.x by the first request's ``Host`` header) or ``"quic"`` (a
    UDP port: route each QUIC flow by the ClientHello in its Initial packets, without
    terminating it); ``target_port`` defaults to 443, or 80 for ``http``.
    ``accept_proxy_protocol`` makes the listener expect a PROXY protocol v1 or v2 header first
    (behind a load balancer) and use the client address it carries for policy, limits and
    logs; a connection without one is refused.
    ``proxy_protocol_from`` lists the networks (CIDR) of the load balancers allowed to send
    such headers; a connection from anywhere else is refused before its header is read (empty:
    anyone who reaches the listener may claim any client address; a warning says so).
    ``optional``: if the host does not have the listener's address (IPv6 turned off, as in
    many containers), the proxy starts without it, with a warning, instead of not starting.
    """

    host: str = attrs.field(validator=_ip_address)
    port: int = attrs.field()  # 0 asks the OS for a free port (tests, ad-hoc runs)
    # Keyword-only so that positional Listener(host, port, target_port) keeps working; it is
    # declared before target_port because target_port's default depends on it.
    protocol: ListenerProtocol = attrs.field(default="tls", kw_only=True)
    target_port: int = attrs.field(
        default=attrs.Factory(lambda self: 80 if self.protocol == "http" else 443, takes_self=True),
        validator=_port,
    )
    name: str = ""
    accept_proxy_protocol: bool = False
    proxy_protocol_from: tuple[str, ...] = attrs.field(default=(), validator=_cidrs)
    optional: bool = False

    def __attrs_post_init__(self) -> None:
        if self.protocol == "quic" and self.accept_proxy_protocol:
            raise ValueError("accept_proxy_protocol: a QUIC (UDP) listener cannot take one")

    @port.validator
    def _check_port(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value < 65536:
            raise ValueError(f"port: must be from 0 to 65535, got {value}")

    @property
    def label(self) -> str:
        """The name used in logs and metrics: ``name`` or ``host:port``."""
        return self._label

    @functools.cached_property
    def _label(self) -> str:
        # Computed once: every connection's record keeps it while the connection lives.
        if self.name:
            return self.name
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _check_alpn(
    instance: object,
    attribute: attrs.Attribute[tuple[str, ...] | None],
    value: tuple[str, ...] | None,
) -> None:
    if value is None:
        return
    if not value:
        raise ValueError("alpn: an empty list matches no client; leave 'alpn' out instead")
    for protocol in value:
        if not protocol or len(protocol.encode("utf-8", "backslashreplace")) > 255:
            raise ValueError(f"alpn: {protocol!r} is not an ALPN protocol id (1-255 bytes)")


def _check_target(
    instance: object, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is None:
        return
    try:
        # No port: the listener's target_port (policy.Policy resolves it per connection).
        host, _port_number = parse_host_port(value, default_port=0)
    except ValueError as exc:
        raise ValueError(f"target: {exc}") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not is_valid_hostname(host):
            raise ValueError(f"target: {host!r} is neither an IP address nor a host name") from None


@attrs.frozen
class Rule:
    """A domain rule. Exactly one of ``match``, ``suffix`` or ``regex`` is set.

    - ``match``: ``a.example.com`` (exactly that name) or ``*.example.com`` (one or more labels
      below ``example.com``, never ``example.com`` itself).
    - ``suffix``: ``example.com`` and every name below it, matched on label boundaries
      (``notexample.com`` does not match).
    - ``regex``: anchored at both ends and case-insensitive, matched on the normalised name.

    ``target`` routes to a fixed ``host:port`` instead of the SNI name. ``allow_private`` lets
    this rule reach loopback/private/link-local destinations, which the SSRF guard refuses
    otherwise. Deny rules win over allow rules.

    ``via`` chooses how the target is reached: ``"direct"``, ``"socks5"`` (through the
    top-level ``socks5`` server), or ``null`` for the global default (SOCKS5 if a ``socks5``
    section exists, direct otherwise). ``proxy_protocol`` (``"v1"``/``"v2"``) sends a PROXY
    protocol header to the target first, so that it sees the real client address.
    ``mode`` (``"auto"``, ``"kernel"``, ``"splice"``, ``"copy"``) overrides
    ``forwarding.mode`` for this rule. ``qos`` (``"high"``, ``"normal"``, ``"bulk"``) is the
    class the TC shaper (``ebpf.tc``) gives the traffic toward the client.

    ``alpn`` narrows the rule to clients that offer at least one of these ALPN protocol ids
    (``["acme-tls/1"]`` sends TLS-ALPN-01 challenges to a certificate manager while the same
    name's other connections match a later rule), as HAProxy's ``req.ssl_alpn`` does.
    """

    match: str | None = None
    suffix: str | None = None
    regex: str | None = None
    action: Action = "allow"
    target: str | None = attrs.field(default=None, validator=_check_target)
    allow_private: bool = False
    name: str = ""
    via: Via | None = None
    proxy_protocol: ProxyProtocolVersion | None = None
    #: The forwarding mode for this rule's connections; ``null``: ``forwarding.mode``.
    mode: ForwardingMode | None = None
    #: The QoS class of this rule's connections toward the client (``ebpf.tc``).
    qos: QosClass = "normal"
    #: Only for clients offering one of these ALPN ids; ``null``: whatever they offer.
    alpn: tuple[str, ...] | None = attrs.field(default=None, validator=_check_alpn)

    def __attrs_post_init__(self) -> None:
        given = [k for k in ("match", "suffix", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a rule needs exactly one of 'match', 'suffix' or 'regex'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.match is not None:
            bare = self.match[2:] if self.match.startswith("*.") else self.match
            if not is_valid_hostname(bare.lower()):
                raise ValueError(
                    f"match: {self.match!r} is not a host name or '*.' followed by a host name"
                )
        if self.suffix is not None and not is_valid_hostname(self.suffix.lower().lstrip(".")):
            raise ValueError(f"suffix: {self.suffix!r} is not a host name")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex: {self.regex!r} does not compile: {exc}") from None

    @property
    def label(self) -> str:
        """The name used in logs and metrics (bounded: one per configured rule)."""
        return self.name or self.match or self.suffix or f"regex:{self.regex}"


@attrs.frozen
class Clients:
    """Client-IP access lists (CIDR, IPv4 and IPv6). Deny wins; an empty allow list allows all."""

    allow: tuple[str, ...] = attrs.field(default=(), validator=_cidrs)
    deny: tuple[str, ...] = attrs.field(default=(), validator=_cidrs)


@attrs.frozen
class Limits:
    """Connection limits. Zero disables a per-client limit.

    The per-client token bucket admits ``per_client_burst`` new connections at once and
    ``per_client_rate`` per second after that.
    """

    per_client_connections: int = attrs.field(default=256, validator=_non_negative)
    per_client_rate: float = attrs.field(default=50.0, validator=_non_negative)
    per_client_burst: int = attrs.field(default=100, validator=_non_negative)
    max_client_hello_size: int = attrs.field(default=16384)

    @max_client_hello_size.validator
    def _check_hello_size(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not 512 <= value <= MAX_CLIENT_HELLO_CAP:
            raise ValueError(
                f"max_client_hello_size: must be from 512 to {MAX_CLIENT_HELLO_CAP}, got {value}"
            )


@attrs.frozen
class Timeouts:
    """Deadlines in seconds.

    ``client_hello`` is a total deadline for the whole ClientHello (not per read), so a client
    trickling bytes cannot hold a slot; ``idle`` closes a connection with no bytes either way;
    ``drain`` is how long live connections may finish after SIGTERM.
    """

    client_hello: float = attrs.field(default=10.0, validator=_positive)
    resolve: float = attrs.field(default=5.0, validator=_positive)
    connect: float = attrs.field(default=10.0, validator=_positive)
    idle: float = attrs.field(default=600.0, validator=_positive)
    drain: float = attrs.field(default=30.0, validator=_non_negative)
    #: A QUIC flow with no datagram either way for this long ends (QUIC's own idle timeouts
    #: are usually 30 s).
    quic_idle: float = attrs.field(default=30.0, validator=_positive)


def _nameservers(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    problems = []
    for i, text in enumerate(value):
        host, _ = parse_host_port(text, default_port=53)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            problems.append(ValueError(f"nameservers[{i}]: {text!r} is not an IP address[:port]"))
    _raise_all(attribute.name, problems)


def _hosts(
    instance: object,
    attribute: attrs.Attribute[dict[str, tuple[str, ...]]],
    value: dict[str, tuple[str, ...]],
) -> None:
    for name, addresses in value.items():
        if not is_valid_hostname(name.lower().rstrip(".")):
            raise ValueError(f"hosts: {name!r} is not a host name")
        for address in addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f'hosts["{name}"]: {address!r} is not an IP address') from None


@attrs.frozen
class Resolver:
    """DNS settings. No ``nameservers`` means the system's (``/etc/resolv.conf``).

    TTLs from answers are clamped to ``[min_ttl, max_ttl]``; failures (NXDOMAIN, no answer) are
    cached for ``negative_ttl``. ``hosts`` are static overrides that never touch DNS.
    """

    nameservers: tuple[str, ...] = attrs.field(default=(), validator=_nameservers)
    min_ttl: float = attrs.field(default=5.0, validator=_non_negative)
    max_ttl: float = attrs.field(default=3600.0, validator=_non_negative)
    negative_ttl: float = attrs.field(default=30.0, validator=_non_negative)
    cache_size: int = attrs.field(default=10000, validator=_positive)
    family: Family = "any"
    hosts: dict[str, tuple[str, ...]] = attrs.field(factory=dict, validator=_hosts)

    def __attrs_post_init__(self) -> None:
        if self.min_ttl > self.max_ttl:
            raise ValueError(f"min_ttl: {self.min_ttl} is greater than max_ttl ({self.max_ttl})")


@attrs.frozen
class Forwarding:
    """Userspace forwarding: ``buffer_size`` is the most one recv() may return.

    256 KiB keeps the per-byte Python overhead small on bulk transfers without pinning much
    memory per idle connection (buffers are allocated per call, not per connection).
    """

    buffer_size: int = attrs.field(default=262144)
    #: The default forwarding mode: ``auto``, ``kernel``, ``splice`` or ``copy`` (a rule's
    #: ``mode`` overrides it). See :func:`trio_sni.forward.choose_forwarder`.
    mode: ForwardingMode = "auto"
    #: ``splice`` mode: the size asked for each of the two pipes of a connection (the
    #: kernel's default size is kept when F_SETPIPE_SZ is refused). At most
    #: ``ebpf.sockmap.max_in_flight``: a pipe holds a direction's bytes in flight.
    pipe_size: int = attrs.field(default=1048576)

    @buffer_size.validator
    def _check_buffer(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not 4096 <= value <= 16 * 1024 * 1024:
            raise ValueError(f"buffer_size: must be from 4096 to 16777216, got {value}")

    @pipe_size.validator
    def _check_pipe_size(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not 4096 <= value <= 256 * 1024 * 1024:
            raise ValueError(f"pipe_size: must be from 4096 to 268435456, got {value}")


@attrs.frozen
class Log:
    """``access_log``: ``"stderr"``, ``"stdout"``, a file path, or ``null`` for none.

    The operational log (start-up, reloads, warnings) goes to stderr, or to ``file`` (opened
    again by itself when logrotate has moved it), as text or as one JSON object per line
    (``format: "json"``).
    """

    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: str | None = "stderr"
    format: Literal["text", "json"] = "text"
    file: str | None = None


@attrs.frozen
class Status:
    """The status/metrics HTTP endpoint; ``listen: null`` turns it off."""

    listen: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.listen is not None:
            try:
                parse_host_port(self.listen)
            except ValueError as exc:
                raise ValueError(f"listen: {exc}") from None


@attrs.frozen
class SockmapConfig:
    """Kernel forwarding (BPF sockhash).

    ``max_in_flight`` bounds, per connection and direction, the bytes the kernel has taken from
    one socket but the other has not yet taken into its send queue (the kernel itself has no
    backpressure there; the BPF program enforces it); a direction that reaches it is copied in
    userspace from then on.
    """

    enabled: bool = True
    max_entries: int = attrs.field(default=65536, validator=_positive)
    max_in_flight: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)


def _absolute_path(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"{attribute.name}: must be an absolute path, got {value!r}")


@attrs.frozen
class DnsCacheConfig:
    """The DNS cache shared by every proxy on the host: a pinned BPF LRU map of
    ``max_entries`` names in the bpffs directory ``pin_path`` (behind the in-process cache,
    ``resolver.cache_size``). Every process sharing it must use the same ``max_entries``: a
    pinned map of another size is replaced."""

    enabled: bool = True
    max_entries: int = attrs.field(default=10000, validator=_positive)
    pin_path: str = attrs.field(default="/sys/fs/bpf/trio_sni/dns_cache", validator=_absolute_path)


XdpMode = Literal["auto", "native", "generic"]


@attrs.frozen
class FloodGuard:
    """The XDP guard's SYN limits for the listening ports (token buckets; a rate of 0 turns
    that limit off).

    A source may send ``per_source_burst`` SYNs at once and ``per_source_rate`` per second
    after that; ``global_rate``/``global_burst`` cap all sources together. Retransmitted SYNs
    count too, so keep the per-source limit well above ``limits.per_client_rate``.
    ``tracked_sources`` is how many sources the kernel remembers (least recently seen ones
    are forgotten first).
    """

    per_source_rate: float = attrs.field(default=100.0, validator=_non_negative)
    per_source_burst: int = attrs.field(default=200, validator=_non_negative)
    global_rate: float = attrs.field(default=0.0, validator=_non_negative)
    global_burst: int = attrs.field(default=0, validator=_non_negative)
    tracked_sources: int = attrs.field(default=65536, validator=_positive)

    def __attrs_post_init__(self) -> None:
        for scope in ("per_source", "global"):
            if getattr(self, f"{scope}_rate") > 0 and getattr(self, f"{scope}_burst") < 1:
                raise ValueError(f"{scope}_burst: must be at least 1 when {scope}_rate is set")


@attrs.frozen
class XdpConfig:
    """The XDP edge guard on ``interface``: ``clients.allow``/``clients.deny`` and the SYN
    flood guard applied to the listening ports before the TCP stack sees a packet.

    ``mode``: ``auto`` (native if the driver supports it, else generic), ``native`` or
    ``generic``. ``reject_quic`` answers UDP to port 443 and to the listening ports with an
    ICMP port unreachable, so browsers fall back to TCP at once; UDP to a ``quic`` listener's
    port is the proxy's own and passes (after the address lists).
    """

    enabled: bool = False
    interface: str = "eth0"
    mode: XdpMode = "auto"
    reject_quic: bool = False
    flood_guard: FloodGuard = FloodGuard()


#: Smallest token-bucket burst. Egress packets are GSO skbs of 20-64 KiB: a 64 KiB burst held
#: a 10 Mbit/s cap to 0.4 Mbit/s, 256 KiB kept the flow at its rate (docs/kernel-facts.md,
#: "token-bucket burst").
TC_MIN_BURST = 256 * 1024
#: Largest configured burst. The shaper multiplies the refill time (at most the time to fill
#: the bucket) by the rate in 64 bits: exact while a bucket stays under 2^32 bytes, which this
#: and :data:`TC_MAX_BPS` (with :data:`TC_BURST_SECONDS`) guarantee.
TC_MAX_BURST = 1 << 30
#: Smallest non-zero cap, bit/s: the kernel counts whole bytes per second, and below 1 KB/s a
#: TCP connection spends its time in retransmit backoff.
TC_MIN_BPS = 8000
#: Largest cap, bit/s (100 Gbit/s).
TC_MAX_BPS = 100_000_000_000
#: Every bucket holds at least this many seconds of its rate. A packet dropped at egress is
#: not lost to TCP but refused: the socket keeps it and, once nothing is in flight, waits for
#: its probe timer (at least TCP_RTO_MIN, 200 ms) before sending again. A bucket that fills in
#: less time overflows during that wait, and the flow gets burst / 200 ms instead of its rate
#: (measured: 10.0 Mbit/s under a 20 Mbit/s cap with a 256 KiB bucket).
TC_BURST_SECONDS = 0.25
#: Size of the shaper's ``exempt`` LPM trie (``bpf/tc_shaper.bpf.c``).
TC_MAX_EXEMPT = 1024
#: Interface names are at most IFNAMSIZ - 1 bytes.
IFNAMSIZ = 16


def _bps(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value != 0 and not TC_MIN_BPS <= value <= TC_MAX_BPS:
        raise ValueError(
            f"{attribute.name}: must be 0 (no cap) or from {TC_MIN_BPS} to {TC_MAX_BPS} bit/s, "
            f"got {value}"
        )


def _interface(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    bad = "/" in value or any(c.isspace() for c in value)
    if not value or len(value.encode()) >= IFNAMSIZ or bad:
        raise ValueError(
            f"{attribute.name}: {value!r} is not a network interface name "
            f"(1 to {IFNAMSIZ - 1} bytes, no '/' or spaces)"
        )


@attrs.frozen
class TcConfig:
    """The TC shaper: a per-client bandwidth cap per QoS class on traffic toward clients.

    Attached to the egress of ``interface`` (the one the clients are behind). Each client IP
    gets a token bucket per class: ``per_client_bps`` for rules with ``qos: "normal"`` (the
    default), ``high_bps`` and ``bulk_bps`` for the others; 0 means not capped (by default
    ``high`` is not, so streaming goes first). Buckets hold ``burst_bytes``, or
    :data:`TC_BURST_SECONDS` of their rate if that is more (:meth:`class_burst`). Clients in
    ``exempt`` (CIDRs) are never capped. Rates and lists are updated on reload.
    """

    enabled: bool = False
    interface: str = attrs.field(default="eth0", validator=_interface)
    per_client_bps: int = attrs.field(default=10_000_000, validator=_bps)
    high_bps: int = attrs.field(default=0, validator=_bps)
    bulk_bps: int = attrs.field(default=2_000_000, validator=_bps)
    burst_bytes: int = attrs.field(default=TC_MIN_BURST)
    exempt: tuple[str, ...] = attrs.field(default=(), validator=_cidrs)

    @exempt.validator
    def _check_exempt_size(
        self, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
    ) -> None:
        if len(value) > TC_MAX_EXEMPT:
            raise ValueError(f"exempt: at most {TC_MAX_EXEMPT} networks, got {len(value)}")

    @burst_bytes.validator
    def _check_burst(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not TC_MIN_BURST <= value <= TC_MAX_BURST:
            raise ValueError(
                f"burst_bytes: must be from {TC_MIN_BURST} (GSO packets are up to 64 KiB; a "
                f"smaller bucket starves them) to {TC_MAX_BURST}, got {value}"
            )

    def class_bps(self) -> dict[str, int]:
        """The per-client cap of each QoS class, bit/s (0: not capped)."""
        return {"high": self.high_bps, "normal": self.per_client_bps, "bulk": self.bulk_bps}

    def class_burst(self, bps: int) -> int:
        """The bucket size, bytes, for a cap of ``bps``: ``burst_bytes`` or
        :data:`TC_BURST_SECONDS` of the rate, whichever is more."""
        return max(self.burst_bytes, int(bps / 8 * TC_BURST_SECONDS))


@attrs.frozen
class StatsConfig:
    enabled: bool = True
    per_cpu: bool = True


@attrs.frozen
class EbpfConfig:
    """The design's ``ebpf`` section; each feature degrades on its own when unavailable."""

    enabled: bool = True
    sockmap: SockmapConfig = SockmapConfig()
    dns_cache: DnsCacheConfig = DnsCacheConfig()
    xdp: XdpConfig = XdpConfig()
    tc: TcConfig = TcConfig()
    stats: StatsConfig = StatsConfig()


def _credential(
    instance: object, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    # RFC 1929: one length byte, and zero-length fields are not allowed.
    if value is not None and not 1 <= len(value.encode("utf-8")) <= 255:
        raise ValueError(f"{attribute.name}: must be 1 to 255 bytes of UTF-8")


@attrs.frozen
class Socks5:
    """The SOCKS5 server (RFC 1928) that ``via: "socks5"`` rules connect through.

    ``address`` is ``"ip:port"`` or ``"[v6]:port"``: an IP literal, so reaching the SOCKS
    server needs no DNS. ``username``/``password`` (RFC 1929) are sent only if both are set.

    ``remote_dns: true`` sends the target *name* (ATYP domain) and lets the SOCKS server
    resolve it; the proxy's SSRF guard then never sees the address, so protecting private
    networks is the SOCKS server's job (its ruleset), and ``allow_private`` has no effect.
    ``remote_dns: false`` resolves locally, applies the SSRF guard, and sends the checked IP
    address, so the guard holds exactly as in direct mode.
    """

    address: str = attrs.field()
    username: str | None = attrs.field(default=None, validator=_credential)
    password: str | None = attrs.field(default=None, validator=_credential)
    remote_dns: bool = True

    @address.validator
    def _check_address(self, attribute: attrs.Attribute[str], value: str) -> None:
        try:
            host, _port_number = parse_host_port(value)
        except ValueError as exc:
            raise ValueError(f"address: {exc}") from None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"address: {host!r} is not an IP address; give the SOCKS5 server as "
                "'ip:port' or '[ipv6]:port'"
            ) from None

    def __attrs_post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ValueError("username: give both 'username' and 'password', or neither")

    @property
    def endpoint(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        """The server's address and port, parsed."""
        host, port = parse_host_port(self.address)
        return ipaddress.ip_address(host), port


def _check_listeners_distinct(listeners: tuple[Listener, ...]) -> None:
    """Two listeners on one address and port would fail at start (EADDRINUSE), as would one
    on a specific address beside one on the wildcard of its family (0.0.0.0, ::)."""
    seen: dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], int] = {}
    for i, listener in enumerate(listeners):
        if listener.port == 0:
            continue  # any free port: never a clash
        if listener.protocol == "quic":
            continue  # UDP: beside a TCP listener on the same port is the point
        address = ipaddress.ip_address(listener.host)
        wildcard = ipaddress.ip_address("0.0.0.0" if address.version == 4 else "::")
        for key in ((address, listener.port), (wildcard, listener.port)):
            if key in seen:
                other = listeners[seen[key]]
                raise ValueError(
                    f"listeners[{i}]: {listener.host} port {listener.port} clashes with "
                    f"listeners[{seen[key]}] ({other.host} port {other.port}); the second "
                    "could not be bound"
                )
        seen[(address, listener.port)] = i
        if address == wildcard:  # every specific address of its family seen so far clashes
            for (known, port), j in list(seen.items()):
                if port == listener.port and known.version == address.version and j != i:
                    raise ValueError(
                        f"listeners[{i}]: {listener.host} port {listener.port} clashes with "
                        f"listeners[{j}] ({listeners[j].host} port {port}); the second could "
                        "not be bound"
                    )


#: The most worker processes ``workers`` may ask for.
MAX_WORKERS = 256


def _workers(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= MAX_WORKERS:
        raise ValueError(f"workers: must be from 0 (one per CPU) to {MAX_WORKERS}, got {value}")


@attrs.frozen
class Config:
    """The whole configuration. ``listen_addr`` is the design's one-listener shorthand."""

    listeners: tuple[Listener, ...] = ()
    listen_addr: str | None = None
    max_connections: int = attrs.field(default=50000, validator=_positive)
    #: Worker processes sharing the listeners (``0``: one per CPU this process may run on).
    workers: int = attrs.field(default=0, validator=_workers)
    rules: tuple[Rule, ...] = ()
    clients: Clients = Clients()
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    resolver: Resolver = Resolver()
    forwarding: Forwarding = Forwarding()
    log: Log = Log()
    status: Status = Status()
    ebpf: EbpfConfig = EbpfConfig()
    fallback_mode: FallbackMode = "auto"
    socks5: Socks5 | None = None

    def __attrs_post_init__(self) -> None:
        if self.socks5 is None:
            for i, rule in enumerate(self.rules):
                if rule.via == "socks5":
                    raise ValueError(
                        f'rules[{i}]: "via": "socks5" needs a top-level "socks5" '
                        "section with the SOCKS5 server's address"
                    )
        if self.forwarding.pipe_size > self.ebpf.sockmap.max_in_flight:
            # One bound on the bytes a connection holds in flight per direction, in every mode.
            raise ValueError(
                f"forwarding.pipe_size ({self.forwarding.pipe_size}) exceeds "
                f"ebpf.sockmap.max_in_flight ({self.ebpf.sockmap.max_in_flight}), the "
                "per-connection bound on bytes in flight in every mode: lower pipe_size or "
                "raise max_in_flight"
            )
        if self.listen_addr is not None and self.listeners:
            raise ValueError("give either 'listen_addr' or 'listeners', not both")
        _check_listeners_distinct(self.listeners)
        quic = [lst for lst in self.listeners if lst.protocol == "quic"]
        if self.workers != 1 and any(lst.port == 0 for lst in quic):
            raise ValueError(
                'a "quic" listener with workers needs a port other than 0: each worker binds '
                "its own socket to it (SO_REUSEPORT, so that a flow's datagrams all reach the "
                "worker that routed it)"
            )
        if self.listen_addr is None and not self.listeners:
            raise ValueError("no listener: set 'listen_addr' or 'listeners'")
        if self.listen_addr is not None:
            try:
                host, _port_number = parse_host_port(self.listen_addr)
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise ValueError(f"listen_addr: {exc}") from None

    @property
    def effective_listeners(self) -> tuple[Listener, ...]:
        """``listeners``, or the one listener ``listen_addr`` stands for."""
        if self.listen_addr is None:
            return self.listeners
        host, port = parse_host_port(self.listen_addr)
        return (Listener(host=host, port=port),)
