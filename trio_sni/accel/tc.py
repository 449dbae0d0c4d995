"""The TC shaper: ``tc_shaper.bpf.o`` on the egress of the interface the clients are behind.

Theory of operation (the program's side is in ``bpf/tc_shaper.bpf.c``): the proxy's traffic
toward a client is every TCP packet leaving the interface from one of the listening ports
(``ports``, written once at start). Its class is the socket priority the connection handler
set from the rule's ``qos`` (:data:`~trio_sni.sansio.config.QOS_PRIORITY`), which the kernel
copies into every packet the client socket sends, whichever forwarder produced the bytes. Each
(client, class) pair has a token bucket in an LRU hash; a packet that finds too few tokens is
dropped and TCP sends it again later (no ``fq`` qdisc here to pace with:
docs/kernel-facts.md, fact 19).

Python owns the configuration maps (``rates`` per class, the ``exempt`` LPM trie) and rewrites
them on reload while the program stays attached; it only reads ``counters`` (per CPU, summed
at scrape time) and the number of buckets.

The TCX link (Linux 6.6+) is detached when :meth:`TcShaper.close` runs, and by the kernel if
the process dies first: nothing outlives the proxy.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from types import TracebackType

import trio_sni_loader as loader

from ..sansio.config import TcConfig
from .objects import prebuilt_spec

#: ``enum tc_slot``: the classes (which also index ``rates``), then exempt clients' traffic
#: and traffic that is not the proxy's toward a client.
SLOTS = ("high", "normal", "bulk", "exempt", "other")
CLASSES = SLOTS[:3]
#: ``struct class_rate {u64 bytes_per_sec; u64 burst; u64 fill_ns;}``
CLASS_RATE = struct.Struct("<QQQ")
#: ``struct tc_stats {u64 passed_packets, passed_bytes, dropped_packets, dropped_bytes;}``
TC_STATS = struct.Struct("<QQQQ")
#: ``struct lpm_key {u32 prefixlen; u8 addr[16];}``, IPv4 as ``::ffff:a.b.c.d``.
LPM_KEY = struct.Struct("<I16s")

TC_MAPS = ("buckets", "rates", "ports", "exempt", "counters")
TC_PROGRAM = "tc_shaper"

NSEC_PER_SEC = 1_000_000_000


def class_rate(bps: int, burst: int) -> bytes:
    """The ``rates`` entry for a cap of ``bps`` bit/s (0: not capped) and a burst in bytes."""
    if bps == 0:
        return CLASS_RATE.pack(0, burst, 0)
    bytes_per_sec = max(bps // 8, 1)
    fill_ns = -(-burst * NSEC_PER_SEC // bytes_per_sec)  # rounded up: never short of a burst
    return CLASS_RATE.pack(bytes_per_sec, burst, fill_ns)


def lpm_key(network: str) -> bytes:
    """The ``exempt`` key for a CIDR (IPv4 stored as ``::ffff:0:0/96`` plus its prefix)."""
    net = ipaddress.ip_network(network, strict=False)
    if isinstance(net, ipaddress.IPv4Network):
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + net.network_address.packed)
        return LPM_KEY.pack(96 + net.prefixlen, mapped.packed)
    return LPM_KEY.pack(net.prefixlen, net.network_address.packed)


class TcShaper:
    """The loaded shaper, attached to ``interface``'s egress; :meth:`close` detaches it.

    Start it with :meth:`start`. Raises from there: ``FileNotFoundError`` (no prebuilt
    object), :class:`loader.NotSupportedError` (no TCX: Linux older than 6.6) and any other
    :class:`loader.LoaderError` (privilege, verifier, no such interface); nothing is left
    attached or open when it raises.
    """

    def __init__(self, collection: loader.Collection, interface: str) -> None:
        self._collection = collection
        self._link: loader.Link | None = None
        self.interface = interface
        maps = collection.maps
        self.buckets = maps["buckets"]
        self.rates = maps["rates"]
        self.ports = maps["ports"]
        self.exempt = maps["exempt"]
        self.counters_map = maps["counters"]
        self.rates.key_codec = self.counters_map.key_codec = loader.Int()
        self.ports.key_codec = self.ports.value_codec = self.exempt.value_codec = loader.Int()

    @classmethod
    def load(cls, config: TcConfig, ports: Iterable[int]) -> TcShaper:
        """Load the program and fill its maps for ``config`` and the listening ``ports``,
        without attaching it (:meth:`attach`; tests run it with ``BPF_PROG_TEST_RUN``)."""
        ports = sorted(set(ports))
        spec = prebuilt_spec("tc_shaper.bpf.o", TC_MAPS, [TC_PROGRAM])
        if len(ports) > spec.maps["ports"].max_entries:  # a proxy with very many listeners
            spec = spec.copy(
                maps={**spec.maps, "ports": spec.maps["ports"].copy(max_entries=len(ports))}
            )
        shaper = cls(loader.Collection.load(spec), config.interface)
        try:
            for port in ports:
                shaper.ports.update(port, 1)
            shaper.configure(config)
        except BaseException:
            shaper.close()
            raise
        return shaper

    @classmethod
    def start(cls, config: TcConfig, ports: Iterable[int]) -> TcShaper:
        """:meth:`load`, then attach to the egress of ``config.interface``.

        The maps are filled before the link exists, so the first packet already sees the
        configured caps.
        """
        shaper = cls.load(config, ports)
        try:
            shaper.attach()
        except BaseException:
            shaper.close()
            raise
        return shaper

    def attach(self) -> None:
        """Attach to the egress of :attr:`interface` with a TCX link (Linux 6.6+)."""
        self._link = loader.attach_tcx(self.program, self.interface, "egress")

    @property
    def link(self) -> loader.Link | None:
        """The TCX link while attached."""
        return self._link

    @property
    def program(self) -> loader.Program:
        return self._collection.programs[TC_PROGRAM]

    def configure(self, config: TcConfig) -> None:
        """Apply the class rates, burst and exempt list (on reload: live, no detach).

        Buckets keep their tokens; a bucket above the new burst is cut down on its next packet.
        """
        for index, name in enumerate(CLASSES):
            bps = config.class_bps()[name]
            self.rates.update(index, class_rate(bps, config.class_burst(bps)))
        wanted = {lpm_key(network) for network in config.exempt}
        for key in list(self.exempt.keys()):
            if key not in wanted:
                self.exempt.delete(key)
        for key in wanted:
            self.exempt.update(key, 1)

    def counters(self) -> dict[str, int]:
        """``{"tc_bytes_passed_high": n, ...}``: packets and bytes passed and dropped per slot,
        summed over CPUs (one syscall per slot: read at scrape time, not per packet)."""
        out: dict[str, int] = {}
        for index, slot in enumerate(SLOTS):
            totals = [0, 0, 0, 0]
            for value in self.counters_map.lookup(index) or []:  # one value per possible CPU
                totals = [t + v for t, v in zip(totals, TC_STATS.unpack(value), strict=True)]
            passed_packets, passed_bytes, dropped_packets, dropped_bytes = totals
            out[f"tc_packets_passed_{slot}"] = passed_packets
            out[f"tc_bytes_passed_{slot}"] = passed_bytes
            out[f"tc_packets_dropped_{slot}"] = dropped_packets
            out[f"tc_bytes_dropped_{slot}"] = dropped_bytes
        return out

    def bucket_count(self) -> int:
        """Token buckets in use ((client, class) pairs seen; the LRU evicts the oldest)."""
        return len(self.buckets.lookup_batch(1024))

    @property
    def closed(self) -> bool:
        return self._collection.programs[TC_PROGRAM].closed

    def close(self) -> None:
        """Detach and close every fd; idempotent."""
        if self._link is not None:
            self._link.close()
        self._collection.close()

    def __enter__(self) -> TcShaper:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
