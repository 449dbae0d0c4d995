"""Prometheus metrics for one :class:`~trio_sni.server.Proxy`, in its own registry.

Theory of operation
-------------------

Nothing here polls and nothing runs per packet. Two kinds of numbers feed the registry:

- **Finished connections.** The proxy hands every access-log record (one per connection, at
  its end) to :meth:`ProxyMetrics.observe`, which adds it to plain counters and histogram
  buckets: a few dict updates per connection.
- **Live state, read at scrape time.** A custom collector reads the live connection table,
  the resolver's :meth:`~trio_sni.resolver.Resolver.statistics` and the acceleration status
  only when ``/metrics`` is scraped.

Byte counters combine both: the total is the bytes of finished connections plus the bytes
live connections have moved so far. A connection's bytes move from the live part to the
finished part in one synchronous step (the handler removes it from the live table and writes
its record with no checkpoint in between), so the sum never goes backwards and a long
transfer shows up while it runs, not only when it ends. ``connections_accepted_total`` works
the same way: every accepted connection is either live or has written its record.

Each :class:`ProxyMetrics` has its own ``CollectorRegistry`` (never prometheus_client's global
one), so two proxies in one process (tests) never share or clash over numbers.

Label cardinality is bounded by construction: ``reason`` and ``mode`` come from fixed
vocabularies, ``rule`` is a configured rule's label (``"none"`` when no rule matched), and
``direction`` is ``to_upstream`` or ``to_client``.
"""

from __future__ import annotations

import bisect
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ._version import __version__
from .features import PER_CPU_FEATURES, AccelerationStatus
from .forward import Mode

if TYPE_CHECKING:
    from .connection import ConnectionContext

#: Label value for a connection that never got a forwarding mode or a rule (refused early).
NONE_LABEL = "none"
DIRECTIONS = ("to_upstream", "to_client")

#: Connection durations in seconds: from refused-at-once (ms) to long-lived streams (hours).
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    14400.0,
)
#: Stage latencies in seconds (waiting for the ClientHello, resolving, connecting): loopback
#: and cache hits take well under a millisecond, a distant target or a slow client seconds.
STAGE_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025),
    *(bound for bound in DURATION_BUCKETS if bound <= 10.0),
)
#: The access-log fields of each stage's time, and their histograms' names and help.
STAGES = (
    (
        "hello_time",
        "trio_sni_client_hello_wait_seconds",
        "From accept to a whole ClientHello (or request head), connections that sent one.",
    ),
    (
        "resolve_time",
        "trio_sni_resolve_seconds",
        "Resolving the target's name (cache hits included), connections that needed it.",
    ),
    (
        "connect_time",
        "trio_sni_connect_seconds",
        "Connecting to the target (a SOCKS5 handshake included), connections that did.",
    ),
)
#: ClientHello sizes in bytes: classic hellos are 200-600 bytes, post-quantum key shares
#: (X25519MLKEM768) push them to about 1.8 KB, and the configurable cap goes up to 64 KiB.
HELLO_SIZE_BUCKETS = (256, 512, 1024, 1536, 2048, 4096, 8192, 16384, 32768, 65536)


class _Histogram:
    """Cumulative-on-export bucket counts, a sum and a count; observed in O(log buckets)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else _format_bound(bound), running))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


def _format_bound(bound: float) -> str:
    return repr(float(bound))


class ConfigReloads:
    """The outcome of the latest config (re)load, for ``trio_sni_config_last_reload_*`` (the
    names Prometheus and Alertmanager use for their own reloads)."""

    def __init__(self) -> None:
        self.successful = True
        self.last_success = time.time()  # the start counts: the config in effect since then

    def succeeded(self) -> None:
        self.successful, self.last_success = True, time.time()

    def failed(self) -> None:
        self.successful = False

    def families(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "trio_sni_config_last_reload_successful",
            "1 if the latest config reload (SIGHUP) was applied, 0 if it was refused.",
        )
        ok.add_metric([], 1 if self.successful else 0)
        yield ok
        when = GaugeMetricFamily(
            "trio_sni_config_last_reload_success_timestamp_seconds",
            "When the config in effect was applied (the start, or the latest good reload).",
        )
        when.add_metric([], self.last_success)
        yield when


def build_info() -> Metric:
    """``trio_sni_build_info{version, python}`` 1: what runs, for dashboards and alerts."""
    info = GaugeMetricFamily(
        "trio_sni_build_info",
        "Always 1; the labels say which trio_sni and which Python run.",
        labels=["version", "python"],
    )
    info.add_metric([__version__, platform.python_version()], 1)
    return info


class ProxyMetrics:
    """The metrics of one proxy: ``observe(record)`` per finished connection, ``registry`` to
    export.

    Args:
        context: the proxy's connection context (its ``live`` table and ``resolver`` are read
            at scrape time).
        acceleration: returns the current acceleration status (feature states and, once the
            kernel layer provides them, its counters summed across CPUs); called at scrape
            time only.
    """

    def __init__(
        self,
        context: ConnectionContext,
        *,
        acceleration: Callable[[], AccelerationStatus] | None = None,
    ) -> None:
        self._context = context
        self._acceleration = acceleration
        self.finished = 0
        self.closed: dict[tuple[str, str], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}
        self.rule_connections: dict[str, int] = {}
        self.rule_bytes: dict[tuple[str, str], int] = {}
        #: (mode asked for, mode used) -> connections forwarded by a fallback mode.
        self.fallbacks: dict[tuple[str, str], int] = {}
        self.duration = _Histogram(DURATION_BUCKETS)
        self.hello_size = _Histogram(HELLO_SIZE_BUCKETS)
        self.stages = {field: _Histogram(STAGE_BUCKETS) for field, _, _ in STAGES}
        self.listener_connections: dict[str, int] = {}
        #: Finished QUIC flows' datagrams, by direction.
        self.quic_datagrams: dict[str, int] = {}
        #: Set by whoever reloads the config (the command line's SIGHUP handler).
        self.reloads = ConfigReloads()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=self.registry)

    def observe(self, record: Mapping[str, object]) -> None:
        """Count one finished connection from its access-log record. Cheap and never raises
        for a record with missing fields (they count under ``"none"``/are skipped)."""
        mode = _label(record.get("mode"))
        rule = _label(record.get("rule"))
        reason = _label(record.get("reason"))
        self.finished += 1
        key = (reason, mode)
        self.closed[key] = self.closed.get(key, 0) + 1
        self.rule_connections[rule] = self.rule_connections.get(rule, 0) + 1
        fallback_from = record.get("fallback_from")
        if fallback_from is not None:
            fkey = (_label(fallback_from), mode)
            self.fallbacks[fkey] = self.fallbacks.get(fkey, 0) + 1
        for direction in DIRECTIONS:
            value = record.get(f"bytes_{direction}")
            if isinstance(value, int) and value:
                bkey = (direction, mode)
                self.bytes[bkey] = self.bytes.get(bkey, 0) + value
                rkey = (rule, direction)
                self.rule_bytes[rkey] = self.rule_bytes.get(rkey, 0) + value
        duration = record.get("duration")
        if isinstance(duration, (int, float)):
            self.duration.observe(float(duration))
        hello_size = record.get("hello_size")
        if isinstance(hello_size, int):
            self.hello_size.observe(hello_size)
        for field, histogram in self.stages.items():
            seconds = record.get(field)
            if isinstance(seconds, float):
                histogram.observe(seconds)
        listener = _label(record.get("listener"))
        self.listener_connections[listener] = self.listener_connections.get(listener, 0) + 1
        if record.get("transport") == "quic":
            for direction in DIRECTIONS:
                value = record.get(f"datagrams_{direction}")
                if isinstance(value, int):
                    self.quic_datagrams[direction] = self.quic_datagrams.get(direction, 0) + value

    def wrap(
        self, write_access_log: Callable[[dict[str, object]], None]
    ) -> Callable[[dict[str, object]], None]:
        """An access-log callback that counts each record, then passes it on."""

        def write(record: dict[str, object]) -> None:
            self.observe(record)
            write_access_log(record)

        return write

    def acceleration_status(self) -> AccelerationStatus | None:
        return self._acceleration() if self._acceleration is not None else None

    @property
    def context(self) -> ConnectionContext:
        return self._context


def _label(value: object) -> str:
    return NONE_LABEL if value is None or value == "" else str(value)


class _Collector:
    """Builds every metric family at scrape time from the counters and the live state."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        live = list(m.context.live.values())

        accepted = CounterMetricFamily(
            "trio_sni_connections_accepted",
            "Client connections accepted (finished ones plus the live ones).",
        )
        accepted.add_metric([], m.finished + len(live))
        yield accepted

        active = GaugeMetricFamily("trio_sni_connections_active", "Client connections open now.")
        active.add_metric([], len(live))
        yield active

        quic_active = GaugeMetricFamily(
            "trio_sni_quic_flows_active",
            "QUIC flows open now (also counted in trio_sni_connections_active).",
        )
        quic_active.add_metric([], sum(1 for info in live if info.transport == "quic"))
        yield quic_active

        quic_datagrams = CounterMetricFamily(
            "trio_sni_quic_datagrams",
            "Datagrams relayed by finished QUIC flows, by direction.",
            labels=["direction"],
        )
        for direction, count in sorted(m.quic_datagrams.items()):
            quic_datagrams.add_metric([direction], count)
        yield quic_datagrams
        quic_dropped = CounterMetricFamily(
            "trio_sni_quic_flows_dropped",
            "New QUIC flows dropped because the flow table was full (max_connections flows).",
        )
        quic_dropped.add_metric([], m.context.quic_flows_dropped)
        yield quic_dropped

        closed = CounterMetricFamily(
            "trio_sni_connections_closed",
            "Finished connections by termination reason and forwarding mode "
            '(mode "none": refused before forwarding).',
            labels=["reason", "mode"],
        )
        for (reason, mode), count in sorted(m.closed.items()):
            closed.add_metric([reason, mode], count)
        yield closed

        byte_totals = dict(m.bytes)
        rule_bytes = dict(m.rule_bytes)
        for info in live:
            mode, rule = _label(info.forwarded_mode), _label(info.rule)
            for direction, value in (
                ("to_upstream", info.counters.to_upstream),
                ("to_client", info.counters.to_client),
            ):
                if value:
                    byte_totals[(direction, mode)] = byte_totals.get((direction, mode), 0) + value
                    rule_bytes[(rule, direction)] = rule_bytes.get((rule, direction), 0) + value

        total_bytes = CounterMetricFamily(
            "trio_sni_bytes",
            "Bytes forwarded, by direction and forwarding mode (live connections included).",
            labels=["direction", "mode"],
        )
        for (direction, mode), count in sorted(byte_totals.items()):
            total_bytes.add_metric([direction, mode], count)
        yield total_bytes

        yield m.duration.family(
            "trio_sni_connection_duration_seconds",
            "Connection lifetime from accept to close, finished connections.",
        )
        yield m.hello_size.family(
            "trio_sni_client_hello_bytes",
            "Size of the ClientHello (all its TLS records), connections that sent a whole one.",
        )
        for field, name, documentation in STAGES:
            yield m.stages[field].family(name, documentation)

        per_listener = CounterMetricFamily(
            "trio_sni_listener_connections",
            "Connections per listener (its name, or host:port), finished and live.",
            labels=["listener"],
        )
        listener_counts = dict(m.listener_connections)
        for info in live:
            listener_counts[info.listener] = listener_counts.get(info.listener, 0) + 1
        for listener, count in sorted(listener_counts.items()):
            per_listener.add_metric([listener], count)
        yield per_listener

        # A live connection counts under its rule once routed; one still routing is left out
        # (it may yet match a rule, and "none" must not go backwards when it does).
        rule_connections = dict(m.rule_connections)
        for info in live:
            if info.rule is not None:
                rule_connections[info.rule] = rule_connections.get(info.rule, 0) + 1
        per_rule = CounterMetricFamily(
            "trio_sni_rule_connections",
            'Connections per domain rule, live ones included (rule "none": refused before a '
            "rule matched).",
            labels=["rule"],
        )
        for rule, count in sorted(rule_connections.items()):
            per_rule.add_metric([rule], count)
        yield per_rule

        per_rule_bytes = CounterMetricFamily(
            "trio_sni_rule_bytes",
            "Bytes forwarded per domain rule and direction (live connections included).",
            labels=["rule", "direction"],
        )
        for (rule, direction), count in sorted(rule_bytes.items()):
            per_rule_bytes.add_metric([rule, direction], count)
        yield per_rule_bytes

        fallbacks = CounterMetricFamily(
            "trio_sni_forwarding_fallbacks",
            "Finished connections forwarded by another mode than the one asked for "
            "(unavailable at startup, or given up for that connection), by both modes.",
            labels=["requested", "mode"],
        )
        for (requested, mode), count in sorted(m.fallbacks.items()):
            fallbacks.add_metric([requested, mode], count)
        yield fallbacks

        splice = m.context.forwarders.get(Mode.SPLICE)
        if splice is not None and splice.mode is Mode.SPLICE:
            small_pipes = splice.statistics().small_pipes
            family = CounterMetricFamily(
                "trio_sni_splice_small_pipes",
                "splice-mode pipes the kernel gave less than forwarding.pipe_size "
                "(F_SETPIPE_SZ refused: pipe-max-size or the user's pipe-page allowance).",
            )
            family.add_metric([], small_pipes)
            yield family

        yield from _resolver_families(m)
        yield build_info()
        yield from m.reloads.families()
        status = m.acceleration_status()
        if status is not None:
            yield from _acceleration_families(status)


def _resolver_families(m: ProxyMetrics) -> Iterable[Metric]:
    stats = m.context.resolver.statistics()
    lookups = CounterMetricFamily(
        "trio_sni_resolver_lookups",
        "Name lookups by where the answer came from: cache_hit, negative_hit (cached failure), "
        "miss (sent DNS queries), coalesced (waited for a lookup in flight), static (hosts).",
        labels=["result"],
    )
    for result, value in (
        ("cache_hit", stats.hits),
        ("negative_hit", stats.negative_hits),
        ("miss", stats.misses),
        ("coalesced", stats.coalesced),
        ("static", stats.static_hits),
    ):
        lookups.add_metric([result], value)
    yield lookups
    entries = GaugeMetricFamily(
        "trio_sni_resolver_cache_entries", "Names in the in-process resolver cache now."
    )
    entries.add_metric([], stats.entries)
    yield entries


def _acceleration_families(status: AccelerationStatus) -> Iterable[Metric]:
    yield feature_state_family(status.features)
    yield from ebpf_counter_families(status.counters)


def feature_state_family(features: Mapping[str, str]) -> Metric:
    """``trio_sni_ebpf_feature_state``: 1 for each feature's state."""
    family = GaugeMetricFamily(
        "trio_sni_ebpf_feature_state",
        "1 for each kernel feature's current state (active, disabled or unavailable).",
        labels=["feature", "state"],
    )
    for name, state in features.items():
        family.add_metric([name, state], 1)
    return family


def ebpf_counter_families(counters: Mapping[str, int]) -> Iterable[Metric]:
    """``trio_sni_ebpf_<stem>_total``: one family per counter stem, its variants as labels
    (labels, not one name per case)."""
    families: dict[str, tuple[tuple[str, ...], list[tuple[tuple[str, ...], int]]]] = {}
    for key, value in counters.items():
        stem, names, values = _counter_shape(key)
        known_names, rows = families.setdefault(stem, (names, []))
        if known_names != names:
            raise ValueError(f"counter {key}: labels {names} differ from {stem}'s {known_names}")
        rows.append((values, value))
    for stem, (names, rows) in sorted(families.items()):
        family = CounterMetricFamily(
            f"trio_sni_ebpf_{stem}",
            _EBPF_HELP.get(stem, f"eBPF counter {stem}")
            + (", summed across CPUs." if stem.split("_", 1)[0] in PER_CPU_FEATURES else "."),
            labels=list(names) or None,
        )
        for values, value in sorted(rows):
            family.add_metric(list(values), value)
        yield family


#: HELP texts for the kernel forwarder's counters (``AccelerationStatus.counters`` keys,
#: ``sockmap_`` + ``accel.layout.Counter`` names lower-cased, direction split off).
_EBPF_HELP = {
    "sockmap_bytes": "Bytes the sk_skb verdict program redirected between the sockets",
    "sockmap_skbs": "Packets (skbs) the sk_skb verdict program redirected",
    "sockmap_redirect_failures": "Redirects refused (peer leaving the sockhash; bytes kept)",
    "sockmap_peer_misses": "Packets from a socket with no peer entry (passed to userspace)",
    "sockmap_zero_length": "Zero-length packets the verdict program dropped",
    "sockmap_budget_stops": "Directions that reached their in-flight bound in the kernel",
    "sockmap_passed_bytes": "Bytes passed to userspace instead of redirected",
    "sockmap_fallbacks": "Connections that fell back from kernel to copy forwarding",
    "sockmap_userspace_directions": "Directions moved to userspace by the in-flight bound",
    "sockmap_quic_redirected": "QUIC datagrams the kernel redirected between a flow's sockets",
    "sockmap_quic_redirected_bytes": "Their payload bytes",
    "sockmap_quic_redirect_failures": "QUIC datagrams dropped: their peer socket had left the "
    "sockhash",
    "sockmap_quic_no_peer": "QUIC datagrams dropped: their socket had no peer entry",
    "sockmap_quic_empty": "Empty UDP datagrams dropped",
    "sockmap_quic_pull_failures": "QUIC datagrams dropped: no memory to make them linear",
    "xdp_passed": "Packets the XDP guard passed to the stack",
    "xdp_dropped": "Packets the XDP guard dropped, by reason (not_allowed, denied, syn_flood, "
    "syn_flood_global, quic)",
    "xdp_quic_answered": "QUIC packets the XDP guard answered with ICMP port unreachable",
    "xdp_syn_offenders": "Sources (as the guard tracks them) that went over the SYN limit",
    "xdp_aborted": "Packets the XDP guard aborted on an internal error",
    "tc_packets": "Packets the TC shaper passed or dropped toward clients, by QoS class "
    "(exempt: clients in ebpf.tc.exempt; other: not the proxy's traffic to a client)",
    "tc_bytes": "Bytes the TC shaper passed or dropped toward clients, by QoS class",
    "dns_cache_hits": "Lookups in the shared DNS cache map that found a live entry (this process)",
    "dns_cache_misses": "Lookups in the shared DNS cache map that found none, an expired one or "
    "one lacking an address family (this process)",
    "dns_cache_evictions": "Entries the kernel evicted from the shared DNS cache map, host-wide "
    "(inserts - deletes - entries; every process on the host reports the same number)",
    "dns_cache_corrupt": "Undecodable shared DNS cache entries this process deleted",
    "dns_cache_errors": "Failed operations on the shared DNS cache map (this process)",
}

#: How a flat counter name (``AccelerationStatus.counters``) becomes a family and labels; the
#: first pattern that matches wins, a name that matches none is a family without labels.
_COUNTER_SHAPES = (
    # accel.tc.TcShaper.counters: tc_<packets|bytes>_<verdict>_<class>
    re.compile(r"^(?P<stem>tc_(?:packets|bytes))_(?P<verdict>passed|dropped)_(?P<class>\w+)$"),
    # accel.xdp: xdp_dropped_<reason>
    re.compile(r"^(?P<stem>xdp_dropped)_(?P<reason>\w+)$"),
    # the kernel forwarder: <counter>_to_upstream / _to_client
    re.compile(r"^(?P<stem>\w+?)_(?P<direction>to_upstream|to_client)$"),
)


def _counter_shape(key: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """``(family stem, label names, label values)`` of counter ``key``:
    ``("sockmap_bytes", ("direction",), ("to_client",))``."""
    for shape in _COUNTER_SHAPES:
        match = shape.match(key)
        if match:
            labels = {k: v for k, v in match.groupdict().items() if k != "stem"}
            return match["stem"], tuple(labels), tuple(labels.values())
    return key, (), ()
