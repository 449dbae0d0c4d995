"""The XDP edge guard: ``xdp_guard.bpf.o`` attached to one interface with a BPF link.

Theory of operation (see ``bpf/xdp_guard.bpf.c`` for the program's decisions):
:meth:`XdpGuard.start` loads the object, writes the guarded ports, the address lists and the
settings, and only then attaches, so the first packet already meets the configured guard.
:meth:`XdpGuard.update` changes lists and settings in place while the program stays attached
(a config reload never detaches): new entries are added, then the settings are written, then
stale entries are removed, so for a moment the guard applies the union of the old and the new
lists, never an empty one. :meth:`XdpGuard.close` detaches (closing the link); a link is also
detached by the kernel when the process exits (docs/kernel-facts.md, fact 15), so a crash
cannot leave the guard behind.

Attach mode ``auto`` asks for native (driver) mode and falls back to generic (skb) mode when
the driver refuses: the same choice the kernel makes for flags 0 (docs/kernel-facts.md,
fact 16), but this way the mode in use is known and reported.
"""

from __future__ import annotations

import enum
import errno
import logging
import struct
from collections.abc import Iterable
from types import TracebackType

import attrs
import trio_sni_loader as loader

from ..sansio.config import Clients, XdpConfig
from ..sansio.xdp_tables import GuardSettings, LpmKeys, guard_settings, lpm_keys
from .counters import read_counters
from .objects import prebuilt_spec

log = logging.getLogger("trio_sni.accel.xdp")

OBJECT = "xdp_guard.bpf.o"
PROGRAM = "xdp_guard"
MAPS = (
    "allow_v4",
    "allow_v6",
    "deny_v4",
    "deny_v6",
    "ports",
    "config",
    "syn_sources",
    "syn_global",
    "counters",
)

#: ``struct guard_config {u32 flags; u32 _pad; u64 syn_interval_ns; u64 syn_burst_ns;
#: u64 global_interval_ns; u64 global_burst_ns;}``
GUARD_CONFIG = struct.Struct("<IIQQQQ")
#: The ``ports`` map's value bits (``PORT_TCP``/``PORT_QUIC`` in the program).
PORT_TCP = 1
PORT_QUIC = 2
#: ``struct syn_source {u64 tat; u64 dropped;}``
SYN_SOURCE = struct.Struct("<QQ")


class XdpCounter(enum.IntEnum):
    """``enum xdp_counter``: indices into the per-CPU ``counters`` array."""

    PASSED = 0
    NOT_ALLOWED = 1
    DENIED = 2
    SYN_FLOOD = 3
    SYN_FLOOD_GLOBAL = 4
    QUIC = 5
    QUIC_ANSWERED = 6
    SYN_OFFENDERS = 7
    ABORTED = 8


#: The drop reasons among the counters (``xdp_dropped_<reason>`` in the reports).
DROP_REASONS = frozenset(
    {
        XdpCounter.NOT_ALLOWED,
        XdpCounter.DENIED,
        XdpCounter.SYN_FLOOD,
        XdpCounter.SYN_FLOOD_GLOBAL,
        XdpCounter.QUIC,
    }
)


def counter_key(counter: XdpCounter) -> str:
    """The report name: ``xdp_passed``, ``xdp_dropped_denied``, ``xdp_syn_offenders``, ..."""
    name = counter.name.lower()
    return f"xdp_dropped_{name}" if counter in DROP_REASONS else f"xdp_{name}"


@attrs.frozen
class XdpStatus:
    """What a running guard reports: where, how, its list sizes and its counters."""

    interface: str
    mode: str  # "native" or "generic"
    allow_entries: int
    deny_entries: int
    list_capacity: int  # networks per list and address family
    ports: tuple[int, ...]
    quic_ports: tuple[int, ...]
    counters: dict[str, int]


class XdpGuard:
    """A loaded and attached guard. Start with :meth:`start`; :meth:`close` detaches."""

    def __init__(
        self,
        collection: loader.Collection,
        interface: str,
        ports: tuple[int, ...],
        quic_ports: tuple[int, ...] = (),
    ) -> None:
        self._collection = collection
        self._link: loader.Link | None = None
        self.interface = interface
        self.mode = ""
        self.ports = ports
        self.quic_ports = quic_ports
        self._allow = LpmKeys(frozenset(), frozenset())
        self._deny = LpmKeys(frozenset(), frozenset())
        self.maps = collection.maps
        self.maps["counters"].key_codec = loader.Int()
        self.maps["counters"].value_codec = loader.Int()

    @classmethod
    def start(
        cls,
        config: XdpConfig,
        clients: Clients,
        ports: Iterable[int],
        quic_ports: Iterable[int] = (),
    ) -> XdpGuard:
        """Load, fill and attach the guard for the TCP listening ``ports`` and the ``quic``
        listeners' UDP ``quic_ports`` (their UDP passes the address lists, never rejected).

        Raises:
            FileNotFoundError: the prebuilt object is missing.
            loader.LoaderError: no such interface, no privilege, the verifier refused, the
                driver refused both modes, a list does not fit its map. Nothing is left
                loaded or attached.
        """
        guard = cls.load(config, clients, ports, quic_ports)
        try:
            guard._attach(config)
        except BaseException:
            guard.close()
            raise
        return guard

    @classmethod
    def load(
        cls,
        config: XdpConfig,
        clients: Clients,
        ports: Iterable[int],
        quic_ports: Iterable[int] = (),
    ) -> XdpGuard:
        """Load and fill the guard without attaching it (:meth:`start` attaches; tests
        ``test_run`` the :attr:`program` as it is)."""
        spec = prebuilt_spec(OBJECT, MAPS, [PROGRAM])
        maps = dict(spec.maps)
        maps["syn_sources"] = maps["syn_sources"].copy(
            max_entries=config.flood_guard.tracked_sources
        )
        collection = loader.Collection.load(spec.copy(maps=maps))
        guard = cls(
            collection, config.interface, tuple(sorted(set(ports))), tuple(sorted(set(quic_ports)))
        )
        try:
            for port in sorted({*guard.ports, *guard.quic_ports}):
                kinds = (PORT_TCP if port in guard.ports else 0) | (
                    PORT_QUIC if port in guard.quic_ports else 0
                )
                guard.maps["ports"].update(port.to_bytes(2, "little"), bytes([kinds]))
            guard.update(config, clients)
        except BaseException:
            guard.close()
            raise
        return guard

    @property
    def program(self) -> loader.Program:
        return self._collection.programs[PROGRAM]

    def _attach(self, config: XdpConfig) -> None:
        program = self.program
        if config.mode != "auto":
            self._link = loader.attach_xdp(program, config.interface, mode=config.mode)
            self.mode = config.mode
            return
        try:
            self._link = loader.attach_xdp(program, config.interface, mode="native")
            self.mode = "native"
        except loader.BPFSyscallError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ERANGE, errno.ENOMEM):
                raise  # EBUSY (another program), EPERM: generic mode would fail the same way
            log.info(
                "XDP on %s: native mode refused (%s); using generic mode", config.interface, exc
            )
            self._link = loader.attach_xdp(program, config.interface, mode="generic")
            self.mode = "generic"

    def update(self, config: XdpConfig, clients: Clients) -> None:
        """Apply new lists and settings while attached (a reload); see the module docstring.

        Raises:
            loader.LoaderError: a list does not fit its map (the maps then hold the union of
                the old and as much of the new list as fitted; the caller should say so).
        """
        allow, deny = lpm_keys(clients.allow), lpm_keys(clients.deny)
        settings = guard_settings(clients, config.flood_guard, reject_quic=config.reject_quic)
        tries = (
            ("allow_v4", self._allow.v4, allow.v4),
            ("allow_v6", self._allow.v6, allow.v6),
            ("deny_v4", self._deny.v4, deny.v4),
            ("deny_v6", self._deny.v6, deny.v6),
        )
        for name, old, new in tries:
            for key in new - old:
                self._update_entry(name, key)
        self._write_settings(settings)
        for name, old, new in tries:
            for key in old - new:
                self.maps[name].delete(key)
        self._allow, self._deny = allow, deny

    def _update_entry(self, name: str, key: bytes) -> None:
        try:
            self.maps[name].update(key, b"\x01")
        except loader.BPFSyscallError as exc:
            if exc.errno in (errno.ENOSPC, errno.E2BIG):
                raise loader.LoaderError(
                    f"XDP map {name} is full ({self.maps[name].spec.max_entries} networks); "
                    "shorten clients.allow/clients.deny"
                ) from exc
            raise

    def _write_settings(self, s: GuardSettings) -> None:
        value = GUARD_CONFIG.pack(
            s.flags, 0, s.syn_interval_ns, s.syn_burst_ns, s.global_interval_ns, s.global_burst_ns
        )
        self.maps["config"].update(b"\0\0\0\0", value)

    def counters(self) -> dict[str, int]:
        """Every counter, summed over CPUs (one syscall each: call it at scrape time only)."""
        raw = read_counters(self.maps["counters"], XdpCounter)
        return {counter_key(c): raw[c.name.lower()] for c in XdpCounter}

    def status(self) -> XdpStatus:
        return XdpStatus(
            interface=self.interface,
            mode=self.mode,
            allow_entries=len(self._allow),
            deny_entries=len(self._deny),
            list_capacity=self.maps["allow_v4"].spec.max_entries,
            ports=self.ports,
            quic_ports=self.quic_ports,
            counters=self.counters(),
        )

    def link_info(self) -> loader.links.LinkInfo | None:
        return self._link.info() if self._link is not None else None

    @property
    def attached(self) -> bool:
        return self._link is not None and not self._link.closed

    def close(self) -> None:
        """Detach and close every fd; idempotent."""
        if self._link is not None:
            self._link.close()
        self._collection.close()

    def __enter__(self) -> XdpGuard:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
